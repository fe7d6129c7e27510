"""Shapes, parameter counts, causality, KV cache and axis annotations of the models."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calm import config as config_lib
from calm.models.ar import ARModel
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM

from conftest import ROOT

LOGICAL = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "latent", "noise", "chunk",
           "norm", None}


@pytest.fixture(scope="module")
def cfg() -> config_lib.ModelConfig:
  return config_lib.load(ROOT / "configs" / "tiny.yaml").model


def build(make, cfg, seed: int = 0, randomise: bool = False) -> nnx.Module:
  """Constructs a model in one jitted call; `randomise` re-draws every parameter ~ N(0, 0.3²)
  (so zero-initialised layers do not hide anything)."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(cfg, rngs=nnx.Rngs(seed))))

  @jax.jit
  def init():
    state = nnx.state(make(cfg, rngs=nnx.Rngs(seed)))
    if randomise:
      leaves, treedef = jax.tree.flatten(state)
      keys = jax.random.split(jax.random.key(seed + 1000), len(leaves))
      state = jax.tree.unflatten(
          treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return state

  return nnx.merge(graphdef, init())


def _count(make, cfg) -> int:
  abstract = nnx.eval_shape(lambda: make(cfg, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _backbone_count(cfg: config_lib.ModelConfig) -> int:
  b = cfg.backbone
  d, f, h = b.hidden_dim, b.ffn_dim, b.head_dim
  attn = d * b.num_heads * h * 2 + d * b.num_kv_heads * h * 2
  return b.num_layers * (2 * d + attn + 3 * d * f) + d


def test_parameter_counts(cfg):
  V, K, L = cfg.vocab_size, cfg.chunk_size, cfg.latent_dim
  a = cfg.autoencoder
  d, f = a.hidden_dim, a.ffn_dim
  block = d + 3 * d * f
  ae_expected = (V * d + (a.num_encoder_layers + a.num_decoder_layers) * block
                 + (K * d * d + d) + d + (d * 2 * L + 2 * L)  # squeeze, norm, to_latent
                 + (L * d + d) + (d * K * d + K * d) + d)  # from_latent, expand, norm
  assert _count(Autoencoder, cfg) == ae_expected

  D, U, nb = cfg.backbone.hidden_dim, cfg.head.noise_dim, cfg.head.num_blocks
  compress = (K * D * 2 * D + 2 * D) + (2 * D * D + D) + 2 * D
  head_block = 2 * D + (2 * D * D + D) + (D * D + D) + (D * 2 * D + 2 * D) + (D * D + D)
  head = (U * D + D) + (D * D + D) + 4 * D + nb * head_block + 2 * D + (D * D + D) + (D * L + L)
  assert _count(CALM, cfg) == V * D + compress + _backbone_count(cfg) + head

  assert _count(ARModel, cfg) == 2 * V * D + _backbone_count(cfg)
  tied = dataclasses.replace(cfg, tie_ar_embeddings=True)
  assert _count(ARModel, tied) == V * D + _backbone_count(cfg)


@pytest.mark.parametrize("make", [Autoencoder, CALM, ARModel])
def test_every_param_has_logical_axes(cfg, make):
  abstract = nnx.eval_shape(lambda: make(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  assert len(params) > 10
  for path, var in params:
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.ndim, (path, names)
    assert set(names) <= LOGICAL, (path, names)
    assert var.dtype == jnp.float32, path


def test_shapes(cfg):
  B, S, K, V, L, N = 2, 5, cfg.chunk_size, cfg.vocab_size, cfg.latent_dim, 3
  ids = jax.random.randint(jax.random.key(0), (B, S, K), 0, V)
  ae = build(Autoencoder, cfg, 0)
  mu, logstd = jitted(ae, "encode")(ids)
  assert mu.shape == logstd.shape == (B, S, L)
  assert jitted(ae, "decode")(mu).shape == (B, S, K, V)
  np.testing.assert_array_equal(jitted(ae)(ids), jitted(ae, "decode")(mu))  # __call__ = decode(μ)
  model = build(CALM, cfg, 1)
  h, cache = jitted(model, "hidden")(ids)
  assert h.shape == (B, S, cfg.backbone.hidden_dim) and cache is None
  z = jitted(model, "sample", num=N)(h, jax.random.key(2))
  assert z.shape == (N, B, S, L)
  # the final layer starts at zero: every sample is 0 at initialisation
  np.testing.assert_array_equal(z, 0.0)
  logits, _ = jitted(build(ARModel, cfg, 2))(ids.reshape(B, S * K))
  assert logits.shape == (B, S * K, V)


def jitted(module: nnx.Module, method: str = "__call__", **static):
  """`module.method` as a jitted function of the split state (how the training / sampling code
  calls models); `static` keyword arguments are bound at trace time."""
  graphdef, state = nnx.split(module)

  @jax.jit
  def call(state, *args, **kwargs):
    return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs, **static)

  return lambda *args, **kwargs: call(state, *args, **kwargs)


@pytest.fixture(scope="module")
def calm(cfg):
  """A randomised CALM and its jitted `hidden` (shared so compilations are reused)."""
  model = build(CALM, cfg, 0, randomise=True)
  return model, jitted(model, "hidden")


@pytest.fixture(scope="module")
def ar(cfg):
  """A randomised AR model and its jitted forward."""
  model = build(ARModel, cfg, 1, randomise=True)
  return model, jitted(model)


def test_head_samples_differ_with_noise(cfg, calm):
  model, _ = calm
  h = jax.random.normal(jax.random.key(1), (2, 3, cfg.backbone.hidden_dim))
  z = jitted(model, "sample", num=4)(h, jax.random.key(2))
  assert float(jnp.min(jnp.abs(z[0] - z[1]))) > 0
  # the vectorised call equals one call per noise vector
  noise = jax.random.uniform(jax.random.key(3), (4, 2, 3, cfg.head.noise_dim), minval=-0.5,
                             maxval=0.5)
  head = jitted(model.generator)
  batched = head(h, noise)
  single = jnp.stack([head(h, noise[i]) for i in range(4)])
  np.testing.assert_allclose(batched, single, rtol=1e-6, atol=1e-6)


def test_calm_is_causal(cfg, calm):
  _, hidden = calm
  ids = jax.random.randint(jax.random.key(0), (2, 7, cfg.chunk_size), 0, cfg.vocab_size)
  edited = ids.at[:, 4].set((ids[:, 4] + 1) % cfg.vocab_size)
  h1, _ = hidden(ids)
  h2, _ = hidden(edited)
  np.testing.assert_allclose(h1[:, :4], h2[:, :4], rtol=1e-6, atol=1e-6)
  assert float(jnp.max(jnp.abs(h1[:, 4:] - h2[:, 4:]))) > 1e-3


def test_ar_is_causal(cfg, ar):
  _, call = ar
  ids = jax.random.randint(jax.random.key(0), (2, 10), 0, cfg.vocab_size)
  edited = ids.at[:, 7].set((ids[:, 7] + 1) % cfg.vocab_size)
  l1, _ = call(ids)
  l2, _ = call(edited)
  np.testing.assert_allclose(l1[:, :7], l2[:, :7], rtol=1e-6, atol=1e-6)
  assert float(jnp.max(jnp.abs(l1[:, 7:] - l2[:, 7:]))) > 1e-4


def test_ar_kv_cache_matches_full_forward(cfg, ar):
  model, step = ar
  ids = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
  full, _ = step(ids)
  cache = model.init_cache(2, 16)
  out, cache = step(ids[:, :4], cache=cache)  # prefill
  outs = [out]
  for t in range(4, 10):
    out, cache = step(ids[:, t:t + 1], cache=cache)
    outs.append(out)
  np.testing.assert_array_equal(cache.length, [10, 10])
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=2e-5, atol=2e-5)


def test_calm_kv_cache_matches_full_forward(cfg, calm):
  model, hidden = calm
  ids = jax.random.randint(jax.random.key(1), (2, 7, cfg.chunk_size), 0, cfg.vocab_size)
  full, _ = hidden(ids)
  cache = model.init_cache(2, 8)
  h, cache = hidden(ids[:, :3], cache=cache)
  outs = [h]
  for s in range(3, 7):
    h, cache = hidden(ids[:, s:s + 1], cache=cache)
    outs.append(h)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=2e-5, atol=2e-5)


def test_kv_cache_per_row_lengths(cfg, ar):
  """Rows at different lengths: row 1 keeps 1 valid slot; its stale slots 2, 3 must be masked."""
  model, call = ar
  ids = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)
  cache = model.init_cache(2, 16)
  _, cache = call(ids[:, :4], cache=cache)
  cache = dataclasses.replace(cache, length=jnp.array([4, 1], jnp.int32))
  nxt = jnp.stack([ids[0, 4], ids[1, 1] + 1])[:, None]
  out, cache = call(nxt, cache=cache)
  np.testing.assert_array_equal(cache.length, [5, 2])
  # reference: full forwards (same compiled shape) whose prefixes are the valid histories
  row0 = ids[0]
  row1 = jnp.concatenate([ids[1, :1], nxt[1], ids[1, 2:]])
  full, _ = call(jnp.stack([row0, row1]))
  np.testing.assert_allclose(out[0, 0], full[0, 4], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(out[1, 0], full[1, 1], rtol=2e-5, atol=2e-5)


def test_bfloat16_compute_close_to_float32(cfg, ar):
  m32, call32 = ar
  bf = dataclasses.replace(cfg, dtype="bfloat16")
  m16 = build(ARModel, bf, 1, randomise=True)
  ids = jax.random.randint(jax.random.key(3), (2, 10), 0, cfg.vocab_size)
  l32, _ = call32(ids)
  l16, _ = jitted(m16)(ids)
  assert l16.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(m16, nnx.Param)))
  rel = jnp.linalg.norm(l16.astype(jnp.float32) - l32) / jnp.linalg.norm(l32)
  assert float(rel) < 0.05


@pytest.mark.parametrize("B,S", [(1, 1), (3, 2), (20, 3)])  # few rows: vocab-major; many: token-major
def test_decode_ids_is_argmax_of_decode(cfg, B, S):
  from calm.models.layers import VOCAB_MAJOR_MAX_ROWS
  ae = build(Autoencoder, cfg, 3, randomise=True)
  z = jax.random.normal(jax.random.key(4), (B, S, cfg.latent_dim))
  ids = jitted(ae, "decode_ids")(z)
  assert ids.dtype == jnp.int32 and ids.shape == (B, S, cfg.chunk_size)
  np.testing.assert_array_equal(ids, jnp.argmax(jitted(ae, "decode")(z), axis=-1))
  assert (B * S * cfg.chunk_size > VOCAB_MAJOR_MAX_ROWS) == (B == 20)  # both paths are covered
