"""Vocabulary argmax of the tied embedding: tiled, row-selected and lazy Brier decodes are exact
(the same ids as jnp.argmax of the full logits, ties and NaN included)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calm import brier, config, evaluate, scoring
from calm.models import layers
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM
from calm.sampling import decode_candidates

from conftest import ROOT

V, D = 300, 16


def _embed(seed=0):
  """Unit-norm rows with exact duplicates (7 = 200, 11 = 12 = 299): ties by construction."""
  e = layers.Embedding(V, D, dtype="float32", rngs=nnx.Rngs(seed))
  t = np.random.default_rng(seed).normal(size=(V, D))
  t /= np.linalg.norm(t, axis=1, keepdims=True)
  t[200], t[12], t[299] = t[7], t[11], t[11]
  e.table[...] = jnp.asarray(t)
  return e


def _tie_rows(e, n, seed=1):
  """Rows whose best logits tie exactly (a duplicated row) or nearly (the sum of two rows scores
  1 + t_a·t_b on both in exact arithmetic), plus random rows."""
  rng = np.random.default_rng(seed)
  t = np.asarray(e.table[...])
  a, b = rng.integers(0, V, n), rng.integers(0, V, n)
  x = np.where((np.arange(n) % 3 == 0)[:, None], t[rng.choice([7, 11, 200, 299], n)],
               np.where((np.arange(n) % 3 == 1)[:, None], t[a] + t[b],
                        rng.normal(size=(n, D))))
  return jnp.asarray(x, jnp.float32)


def _jit(fn, e):
  """fn(e, *args) jitted with the embedding's state as an argument (as in evaluation)."""
  graphdef, state = nnx.split(e)
  f = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
  return lambda *args: np.asarray(f(state, *args))


def _reference(e, x):
  return _jit(lambda e, x: jnp.argmax(e.attend(x), axis=-1), e)(x)


def test_first_argmax_is_jnp_argmax():
  rng = np.random.default_rng(0)
  l = rng.integers(0, 4, (50, 37)).astype(np.float32)  # many exact ties
  l[3, 5] = l[4, 0] = l[4, 9] = np.nan
  l[5] = -np.inf
  l[6, :] = np.inf
  got = np.asarray(jax.jit(layers.first_argmax)(jnp.asarray(l)))
  np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(l), axis=-1)))
  assert got[3] == 5 and got[4] == 0 and got[5] == 0 and got.dtype == np.int32


def test_tiled_attend_argmax_equals_full_argmax(monkeypatch):
  e = _embed()
  monkeypatch.setattr(layers, "ARGMAX_TILE_BYTES", 4 * V * 16)  # 16 rows a tile: 7 tiles
  x = _tie_rows(e, 100).reshape(4, 25, D)
  got = _jit(lambda e, x: e.attend_argmax(x), e)(x)
  ref = _reference(e, x)
  np.testing.assert_array_equal(got, ref)
  assert np.isin(ref, [7, 11]).sum() >= 30  # exact ties resolved to the first index
  assert not np.isin(ref, [200, 12, 299]).any()


@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_attend_argmax_where_decodes_only_selected_rows(frac):
  e = _embed()
  x_BRD = _tie_rows(e, 3 * 40).reshape(3, 40, D)
  where = jnp.asarray(np.random.default_rng(2).random((3, 40)) < frac)
  got = _jit(lambda e, x, w: e.attend_argmax_where(x, w, 6), e)(x_BRD, where)  # ≤ 7 products
  ref = _reference(e, x_BRD)
  np.testing.assert_array_equal(got, np.where(np.asarray(where), ref, -1))


def test_decoded_brier_equals_full_decode():
  """A trained-like case: samples often equal the truth and each other for 1..4 tokens."""
  e, rng = _embed(), np.random.default_rng(3)
  B, C, K = 3, 40, 5
  t = np.asarray(e.table[...])
  # tokens from a few of the vocabulary (duplicates included), truth from the same few
  common = np.array([7, 11, 12, 200, 40, 41])
  tok = rng.choice(common, (B, C, 2, K))
  tok[:, :, 1] = np.where(rng.random((B, C, 1, K)) < 0.7, tok[:, :, :1], tok[:, :, 1:])[:, :, 0]
  hid = t[tok] + 0.05 * rng.normal(size=(B, C, 2, K, D))  # a near-tie where two rows are close
  y = np.where(rng.random((B, C, K)) < 0.7, tok[:, :, 0], rng.choice(common, (B, C, K)))
  hid, y = jnp.asarray(hid, jnp.float32), jnp.asarray(y, jnp.int32)

  got = _jit(lambda e, h, y: evaluate.decoded_brier(e, h, y, 8), e)(hid, y)
  x = _reference(e, hid.reshape(-1, D)).reshape(B, C, 2, K)
  ref = np.asarray(brier.brier_terms_from_samples(x[:, :, 0], x[:, :, 1], y))
  np.testing.assert_array_equal(got, ref)
  for n in range(4):  # every depth has matches, collisions and neither
    assert set(np.unique(ref[..., n])) == {-1.0, 0.0, 1.0}, n


@pytest.fixture(scope="module")
def tiny():
  cfg = config.load(ROOT / "configs" / "tiny.yaml").model
  return CALM(cfg, rngs=nnx.Rngs(0)), Autoencoder(cfg, rngs=nnx.Rngs(1))


def _lazy_and_full(calm, ae, ids, key):
  (cdef, cstate), (adef, astate) = nnx.split(calm), nnx.split(ae)

  @functools.partial(jax.jit, static_argnums=0)
  def run(lazy, cstate, astate):
    c, a = nnx.merge(cdef, cstate), nnx.merge(adef, astate)
    draw = None if lazy else functools.partial(decode_candidates, c, a)
    return evaluate.calm_block_scores(c, a, ids, key, 5, draw=draw)[0]

  return np.asarray(run(True, cstate, astate)), np.asarray(run(False, cstate, astate))


@pytest.mark.parametrize("scale", [0.0, 0.03])
def test_calm_lazy_decode_equals_full_decode(tiny, scale):
  """scale 0: the head's zero-initialised output makes both samples the chunk 0000, so every
  token of both is decoded; chunks of the document start with 0..4 zeros (Brier-n = ±1 at every
  depth). scale 0.03: distinct samples, a few collisions (few tokens past the first decoded)."""
  calm, ae = tiny
  calm = nnx.clone(calm)
  w = calm.generator.out_fc2.kernel
  w[...] = scale * jax.random.normal(jax.random.key(9), w.shape)
  B, S, K = 6, 16, 4  # 6 × 2 × 4 rows per position: the full decode's product is token-major
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 512, (B, S, K))
  ids[np.arange(K) < rng.integers(0, K + 1, (B, S, 1))] = 0
  lazy, full = _lazy_and_full(calm, ae, jnp.asarray(ids.reshape(B, S * K), jnp.int32),
                              jax.random.key(5))
  np.testing.assert_array_equal(lazy, full)
  if scale == 0.0:
    assert all(set(np.unique(full[..., n])) == {-1.0, 1.0} for n in range(4))
  else:
    assert (full[..., 0] == -1).sum() >= 2 and (full[..., 0] == 0).sum() > 60


def test_score_documents_equal_with_full_decode(tiny, monkeypatch):
  calm, ae = tiny
  docs = [np.arange(5, 5 + 60) % 500, np.zeros(37, np.int64) + 3, np.arange(30) % 7 + 10]
  kw = dict(block_tokens=32, chunk_size=4, batch_size=6, seed=0, pad_id=0)
  lazy = evaluate.score_documents("calm", (calm, ae), docs, **kw)
  orig = scoring.calm_block_scores
  monkeypatch.setattr(scoring, "calm_block_scores", lambda c, a, *args: orig(
      c, a, *args, draw=functools.partial(decode_candidates, c, a)))
  evaluate._score_batch.clear_cache()
  full = evaluate.score_documents("calm", (calm, ae), docs, **kw)
  evaluate._score_batch.clear_cache()
  np.testing.assert_array_equal(lazy[0], full[0])
  np.testing.assert_array_equal(lazy[1], full[1])
  assert (full[0] != 0).any()


def test_attend_argmax_where_keeps_a_sharded_batch_on_its_devices():
  """Rows sharded over the batch: no device gathers another's rows (one scalar all-reduce, the
  loop's trip count), and the ids equal the unsharded ones."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  e = _embed()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  assert len(jax.devices()) > 1
  B = 2 * len(jax.devices())
  x_BRD = _tie_rows(e, B * 10).reshape(B, 10, D)
  where = jnp.asarray(np.random.default_rng(4).random((B, 10)) < 0.5)
  graphdef, state = nnx.split(e)
  f = jax.jit(lambda state, x, w: nnx.merge(graphdef, state).attend_argmax_where(x, w, 3))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec("data")))
  hlo = f.lower(state, put(x_BRD), put(where)).compile().as_text()
  assert "all-gather" not in hlo and hlo.count("all-reduce(") <= 1
  np.testing.assert_array_equal(np.asarray(f(state, put(x_BRD), put(where))),
                                np.asarray(f(state, x_BRD, where)))
