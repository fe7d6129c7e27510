"""BrierLM evaluation: shared-prefix branches, grouped == ungrouped, one compile per shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calm import config, evaluate
from calm.models.ar import ARModel
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM
from calm.models.transformer import BranchCache, KVCache

from conftest import ROOT


def _model_cfg(**changes):
  cfg = config.load(ROOT / "configs" / "tiny.yaml").model
  return config.replace(cfg, **changes) if changes else cfg


def _ids(B, T, V, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(3, V, (B, T)), jnp.int32)


@pytest.mark.slow
def test_branch_cache_equals_private_copies():
  """Branches over a shared prefix compute what per-branch copies of the cache compute."""
  model = ARModel(_model_cfg(), rngs=nnx.Rngs(0))
  B, T, G, V = 2, 12, 3, model.embed.table.shape[0]
  ids = _ids(B, T, V)
  _, cache = model(ids, cache=model.init_cache(B, T))
  prefix_BG = jnp.asarray([[3, 7, 12], [1, 5, 9]], jnp.int32)
  steps = _ids(B * G, 3, V, seed=1)
  branch = BranchCache.create(cache, prefix_BG, 3)
  rows = jnp.repeat(jnp.arange(B), G)
  pad = jnp.zeros(cache.k.shape[:2] + (3,) + cache.k.shape[3:], cache.k.dtype)
  copy = KVCache(jnp.concatenate([cache.k, pad], 2)[:, rows],
                 jnp.concatenate([cache.v, pad], 2)[:, rows], prefix_BG.reshape(-1))

  @jax.jit
  def run(branch, copy):  # one token at a time along both
    outs = []
    for j in range(3):
      a, branch = model(steps[:, j:j + 1], cache=branch)
      b, copy = model(steps[:, j:j + 1], cache=copy)
      outs.append((a, b))
    return outs, branch, copy

  outs, branch, copy = run(branch, copy)
  for a, b in outs:
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
  assert int(branch.length) == 3
  np.testing.assert_array_equal(copy.length, prefix_BG.reshape(-1) + 3)


def test_ar_grouped_equals_ungrouped():
  model = ARModel(_model_cfg(), rngs=nnx.Rngs(0))
  ids = _ids(2, 32, model.embed.table.shape[0])
  key = jax.random.key(3)
  f = jax.jit(lambda g: evaluate.ar_block_scores(model, ids, key, 4, group=g), static_argnums=0)
  whole = np.asarray(f(0))
  assert whole.shape == (2, 7, 4)
  for g in (3,):
    np.testing.assert_allclose(np.asarray(f(g)), whole, atol=1e-5, rtol=1e-5)
  # a proper estimate: Brier-1's accuracy term is exact and the collision term is positive
  assert np.all(whole[..., 0] <= 2.0) and np.all(whole[..., 0] >= -1.0)


@pytest.mark.parametrize("K", [4, 2])
def test_calm_grouped_equals_ungrouped(K):
  cfg = _model_cfg(chunk_size=K)
  calm, ae = CALM(cfg, rngs=nnx.Rngs(0)), Autoencoder(cfg, rngs=nnx.Rngs(1))
  # a real model would repeat itself; make the two samples collide sometimes
  ids = jnp.tile(_ids(2, 4 * K, cfg.vocab_size)[:, :2 * K], (1, 2))
  key = jax.random.key(5)
  f = jax.jit(lambda g: evaluate.calm_block_scores(calm, ae, ids, key, g)[0], static_argnums=0)
  whole = np.asarray(f(0))
  for g in (2,):
    np.testing.assert_array_equal(np.asarray(f(g)), whole)  # indicator sums: exact equality


def test_score_documents_compiles_once_for_two_calls():
  cfg = _model_cfg()
  model = ARModel(cfg, rngs=nnx.Rngs(0))
  docs = [np.arange(3, 40) % cfg.vocab_size, np.arange(20) % 50 + 3]
  kw = dict(block_tokens=16, chunk_size=4, batch_size=2, pad_id=0)
  jax.clear_caches()
  first = evaluate.score_documents("ar", (model,), docs, seed=0, **kw)
  n = evaluate._score_batch._cache_size()
  again = evaluate.score_documents("ar", (model,), docs[::-1], seed=1, **kw)
  assert n == 1 and evaluate._score_batch._cache_size() == 1
  assert first[0].shape == again[0].shape
