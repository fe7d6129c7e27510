"""Generation: cached == uncached recomputation, ragged prompts, samplers, AR top-k/top-p."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calm import config as config_lib
from calm import engine, sampling
from calm.errors import CalmError
from calm.models.ar import ARModel
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM

from conftest import ROOT

EOS, PAD = 3, 0


def context_sensitive(module: nnx.Module, seed: int) -> nnx.Module:
  """`module` with every matrix re-drawn ~ N(0, 1/fan_in) (embedding tables N(0, 1)), so
  activations neither vanish nor explode through the layers (the default 0.02 init leaves the
  energy head's output independent of its input to ~1e-7)."""
  graphdef, state = nnx.split(module)
  flat, treedef = jax.tree_util.tree_flatten_with_path(state)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  leaves = []
  for (path, x), k in zip(flat, keys):
    if x.ndim < 2:
      leaves.append(x)
      continue
    std = 1.0 if "table" in jax.tree_util.keystr(path) else float(np.prod(x.shape[:-1])) ** -0.5
    leaves.append(std * jax.random.normal(k, x.shape))
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@pytest.fixture(scope="module")
def models():
  cfg = config_lib.load(ROOT / "configs" / "tiny.yaml").model
  calm = context_sensitive(CALM(cfg, rngs=nnx.Rngs(1)), 11)
  # a small noise path: the context, not just the noise, decides the head's samples
  scale = calm.energy_head.noise_norm.scale
  scale[...] = 0.1 * scale[...]
  ae = context_sensitive(Autoencoder(cfg, rngs=nnx.Rngs(2)), 12)
  return cfg, calm, ae, ARModel(cfg, rngs=nnx.Rngs(3))


def naive_calm(calm, ae, prompt, key, steps, sampler):
  """Uncached: recompute the backbone over the whole sequence for every new chunk."""
  K = calm.chunk_size
  ids = [PAD] * (-len(prompt) % K) + list(prompt)
  chunks = jnp.asarray(ids, jnp.int32).reshape(1, -1, K)
  out = []
  for i in range(steps):
    h, _ = calm.hidden(chunks)
    # the engine's key of row 0 at step i: fold_in(row key fold_in(key, 0), i)
    step_key = jax.random.fold_in(jax.random.fold_in(key, 0), i)[None]
    c, _ = sampling.next_chunk(calm, ae, h[:, -1], step_key, sampler)
    out += np.asarray(c[0]).tolist()
    if EOS in out:
      break
    chunks = jnp.concatenate([chunks, c[:, None]], axis=1)
  return out


def test_calm_continuation_depends_on_the_whole_context(models):
  """Prompts that differ only before their last chunk continue differently (otherwise a cache
  that loses or misplaces the context would go unnoticed by the cached-vs-uncached test)."""
  _, calm, ae, _ = models
  key = jax.random.key(0)
  a, b = [5, 17, 99, 42, 7, 8], [300, 1, 99, 42, 7, 8]  # same last chunk [99, 42, 7, 8]
  for sampler in (sampling.ChunkSampler(1.0), sampling.ChunkSampler(0.7, "batch",
                                                                    num_candidates=16)):
    out_a, out_b = (naive_calm(calm, ae, p, key, 4, sampler) for p in (a, b))
    assert np.mean(np.asarray(out_a) != np.asarray(out_b)) >= 0.5, (out_a, out_b)


@pytest.mark.parametrize("sampler", [
    sampling.ChunkSampler(1.0),
    sampling.ChunkSampler(0.5, "exact", max_attempts=50),
    sampling.ChunkSampler(0.7, "batch", num_candidates=16)])
def test_calm_cached_equals_uncached(models, sampler):
  _, calm, ae, _ = models
  prompt = [5, 17, 99, 42, 7, 8]  # 6 tokens: left-padded to 8
  key = jax.random.key(0)
  got, stats = engine.generate_calm(calm, ae, [prompt], key, max_new_tokens=16,
                                      sampler=sampler, eos_id=EOS, pad_id=PAD)
  want = naive_calm(calm, ae, prompt, key, 4, sampler)
  assert got[0] == engine.trim(np.asarray(want), EOS)[:16]
  assert stats["chunks"] >= 3 and len(set(got[0])) > 1  # several chunks fed back


def test_calm_ragged_batch_matches_single_rows(models):
  _, calm, ae, _ = models
  prompts = [[5, 17, 99], [1, 2, 3 + 1, 4, 5, 6, 7, 8, 9, 10, 11]]
  key = jax.random.key(4)
  batch, _ = engine.generate_calm(calm, ae, prompts, key, max_new_tokens=12, eos_id=EOS,
                                    pad_id=PAD)
  for i, p in enumerate(prompts):
    # Row noise is keyed by the row index, so a single row is generated as row i of a batch.
    rows = [[1]] * i + [p]
    single, _ = engine.generate_calm(calm, ae, rows, key, max_new_tokens=12, eos_id=EOS,
                                       pad_id=PAD)
    assert single[i] == batch[i]


def test_calm_stops_at_eos(models):
  _, calm, ae, _ = models
  out, _ = engine.generate_calm(calm, ae, [[5, 6, 7, 8]], jax.random.key(1),
                                  max_new_tokens=40, eos_id=-1, pad_id=PAD)
  assert len(out[0]) == 40
  eos = out[0][5]  # pretend the sixth generated token is EOS: generation must end there
  out2, _ = engine.generate_calm(calm, ae, [[5, 6, 7, 8]], jax.random.key(1),
                                   max_new_tokens=40, eos_id=eos, pad_id=PAD)
  assert out2[0] == out[0][:out[0].index(eos) + 1]


def naive_ar_greedy(model, prompt, steps):
  ids = list(prompt)
  for _ in range(steps):
    logits, _ = model(jnp.asarray([ids], jnp.int32))
    ids.append(int(jnp.argmax(logits[0, -1])))
  return ids[len(prompt):]


def test_ar_cached_greedy_equals_uncached(models):
  _, _, _, ar = models
  prompts = [[5, 17, 99], [1, 2, 4, 4, 5, 6, 7]]
  got = engine.generate_ar(ar, prompts, jax.random.key(0), max_new_tokens=4, top_k=1,
                             eos_id=-1, pad_id=PAD)
  for g, p in zip(got, prompts):
    assert g == naive_ar_greedy(ar, p, 4)


def test_sample_logits_top_k_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(0)
  tok = np.asarray(sampling.sample_logits(logits, keys, 1.0, top_k=2))
  assert set(tok) == {0, 1} and abs((tok == 0).mean() - 0.5 / 0.8) < 0.03
  tok = np.asarray(sampling.sample_logits(logits, keys, 1.0, top_p=0.7))
  assert set(tok) == {0, 1}  # 0.5 < 0.7 ≤ 0.8
  tok = np.asarray(sampling.sample_logits(logits, keys, 1.0, top_p=0.5))
  assert set(tok) == {0}
  tok = np.asarray(sampling.sample_logits(logits, keys, 0.5))
  p = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
  assert abs((tok == 0).mean() - p[0] / p.sum()) < 0.03


@pytest.mark.parametrize("V", [7, 1000])  # one partial block; several blocks plus padding
def test_categorical_matches_softmax(V):
  rng = np.random.default_rng(V)
  logits = rng.normal(0, 2, V).astype(np.float32)
  logits[rng.choice(V, V // 5, replace=False)] = -np.inf  # masked entries are never drawn
  p = np.exp(logits - logits.max())
  p /= p.sum()
  n = 200_000
  tok = np.asarray(jax.jit(sampling.categorical)(
      jax.random.key(0), jnp.broadcast_to(jnp.asarray(logits), (n, V))))
  counts = np.bincount(tok, minlength=V)
  assert counts.shape == (V,) and counts[p == 0].sum() == 0
  # χ² over bins with ≥ 5 expected draws (the rest merged into one bin)
  e = n * p
  big = e >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(e[big], e[~big].sum())
  keep = exp > 0
  stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
  df = int(keep.sum()) - 1
  assert stat < df + 5 * np.sqrt(2 * df)  # ~5σ above the χ² mean


def test_invalid_sampler_settings():
  with pytest.raises(CalmError):
    sampling.ChunkSampler(1.5)
  with pytest.raises(CalmError):
    sampling.ChunkSampler(0.5, "greedy")


def test_generation_compiles_once_across_temperatures_and_callbacks(models):
  """Temperature and top-p are traced, the streaming callback is not part of the cache key."""
  cfg, calm, ae, ar = models
  seen = []
  gen_ar = lambda t, p, cb: engine.generate_ar(ar, [[5, 6, 7]], jax.random.key(0),
                                                 max_new_tokens=5, temperature=t, top_p=p,
                                                 eos_id=EOS, pad_id=PAD, on_tokens=cb)
  gen_ar(0.9, 0.95, seen.append)
  n = engine._ar_generate._cache_size()
  out_a = gen_ar(0.3, 0.5, lambda ids: seen.append(ids))
  assert engine._ar_generate._cache_size() == n
  assert len(seen) > 0 and all(np.asarray(x).shape == (1, 1) for x in seen)
  # the traced values still take effect: top-p 0.5 at T -> 0 keeps only the argmax (greedy)
  greedy = engine.generate_ar(ar, [[5, 6, 7]], jax.random.key(1), max_new_tokens=5,
                                temperature=1e-3, top_p=0.5, eos_id=-1, pad_id=PAD)
  assert engine._ar_generate._cache_size() == n + 1  # new max_new / eos: a new shape
  assert greedy[0] == naive_ar_greedy(ar, [5, 6, 7], 5)
  assert len(out_a[0]) >= 1

  sampler = sampling.ChunkSampler(1.0)
  gen_calm = lambda cb: engine.generate_calm(calm, ae, [[5, 6, 7]], jax.random.key(0),
                                               max_new_tokens=8, sampler=sampler, eos_id=EOS,
                                               pad_id=PAD, on_tokens=cb)
  gen_calm(seen.append)
  n = engine._calm_generate._cache_size()
  gen_calm(lambda ids: None)
  assert engine._calm_generate._cache_size() == n


def test_streaming_on_a_sharded_model_arrives_in_order(models):
  """Generation streams from a model whose weights are spread over 8 devices (ordered device
  callbacks cannot run there): every chunk / token reaches the host once, in order, and the
  streamed ids are the returned ones."""
  from calm import sharding
  cfg, calm, ae, ar = models
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, fsdp=8, tensor=1))

  def spread(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh)))

  seen = []
  out = engine.generate_calm(spread(calm), spread(ae), [[5, 6, 7], [8, 9]], jax.random.key(0),
                               max_new_tokens=12, eos_id=-1, pad_id=PAD, on_tokens=seen.append)
  streamed = np.concatenate(seen, axis=1)
  assert streamed.shape == (2, 12)
  assert [list(r) for r in streamed] == out[0]
  seen.clear()
  toks = engine.generate_ar(spread(ar), [[5, 6, 7]], jax.random.key(0), max_new_tokens=6,
                              eos_id=-1, pad_id=PAD, on_tokens=seen.append)
  assert [list(np.concatenate(seen, axis=1)[0])] == toks
