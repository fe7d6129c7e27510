"""Temperature samplers on a known discrete chunk distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm import temperature as tm
from calm.errors import CalmError

P = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
K = 4
# Six distinct K-token chunks; the first two share a prefix so equality must use all K tokens.
TABLE = jnp.array([[1, 2, 3, 4], [1, 2, 3, 5], [7, 0, 0, 0], [0, 7, 0, 0], [9, 9, 9, 9],
                   [2, 2, 3, 4]], jnp.int32)
# χ² critical value, df = 5 (six categories), significance 1e-3 (scipy.stats.chi2.ppf(0.999, 5)).
CHI2_DF5_999 = 20.515


def make_draw(probs, batch):
  """(key, R) -> R i.i.d. chunks per row [batch, R, K]."""
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  return lambda key, r: TABLE[jax.random.categorical(key, logits, shape=(batch, r))]


def chunk_index(chunks_BK):
  eq = np.all(np.asarray(chunks_BK)[:, None, :] == np.asarray(TABLE)[None], axis=-1)
  assert eq.any(axis=1).all(), "sampler returned a chunk that P never produces"
  return eq.argmax(axis=1)


def tempered(T):
  q = P ** (1.0 / T)
  return q / q.sum()


def chi2(counts, q):
  e = counts.sum() * q
  return float(((counts - e) ** 2 / e).sum())


@pytest.mark.parametrize("T,R", [(1.0, 1), (1 / 2, 1), (1 / 3, 1), (0.7, 1), (1 / 2, 2),
                                 (1 / 3, 5), (0.7, 3)])
def test_exact_sampler_matches_tempered_distribution(T, R):
  B = 20000
  fn = jax.jit(lambda key: tm.exact_sample(make_draw(P, B), key, T, 2000, draws_per_step=R))
  chunks, ok, attempts = fn(jax.random.key(1))
  assert bool(ok.all())
  counts = np.bincount(chunk_index(chunks), minlength=6)
  assert chi2(counts, tempered(T)) < CHI2_DF5_999
  # Sharpening is visible: the mode's frequency rises as T falls.
  n, alpha = tm.split_inverse_temperature(T)
  assert int(attempts.min()) >= n + (alpha > 0)
  if T == 1.0:
    assert int(attempts.max()) == 1


def test_exact_sampler_t1_is_single_draw():
  draw = make_draw(P, 5)
  chunks, ok, attempts = tm.exact_sample(draw, jax.random.key(3), 1.0, 10)
  key0 = jax.random.fold_in(jax.random.split(jax.random.key(3))[0], 0)
  np.testing.assert_array_equal(chunks, draw(key0, 1)[:, 0])
  assert bool(ok.all()) and attempts.tolist() == [1] * 5


def test_exact_sampler_reports_cap():
  B = 4000
  flat = np.full(6, 1 / 6)
  chunks, ok, attempts = jax.jit(
      lambda k: tm.exact_sample(make_draw(flat, B), k, 1 / 3, 3))(jax.random.key(0))
  ok, attempts = np.asarray(ok), np.asarray(attempts)
  # Success needs 3 identical draws in a row: probability 1/36 per row within 3 draws.
  assert 0 < ok.sum() < 0.06 * B
  assert (attempts[~ok] == 3).all() and (attempts <= 3).all()
  chunk_index(chunks)  # fallbacks are still valid chunks
  # With a single draw allowed no row can finish; the fallback is the row's first draw.
  chunks1, ok1, att1 = tm.exact_sample(make_draw(flat, 64), jax.random.key(5), 0.7, 1)
  assert not bool(ok1.any()) and att1.tolist() == [1] * 64
  key0 = jax.random.fold_in(jax.random.split(jax.random.key(5))[0], 0)
  np.testing.assert_array_equal(chunks1, make_draw(flat, 64)(key0, 1)[:, 0])


@pytest.mark.parametrize("R", [2, 4, 7])
def test_exact_sampler_blocks_count_consumed_draws(R):
  """Drawing R per iteration caps and counts the draws a row looks at, not the ones made."""
  B = 4000
  flat = np.full(6, 1 / 6)
  _, ok, attempts = jax.jit(
      lambda k: tm.exact_sample(make_draw(flat, B), k, 1 / 3, 5, draws_per_step=R))(
          jax.random.key(0))
  ok, attempts = np.asarray(ok), np.asarray(attempts)
  assert (attempts <= 5).all() and (attempts[~ok] == 5).all() and (attempts[ok] >= 3).all()
  # Success within 5 draws: x x x, or a mismatch at draw 2 (discarded) then x' x' x'.
  p = (1 / 36) * (1 + 5 / 6)
  assert abs(ok.mean() - p) < 4 * np.sqrt(p * (1 - p) / B)
  # The consumed-draw statistics do not depend on R.
  _, ok1, att1 = jax.jit(lambda k: tm.exact_sample(make_draw(flat, B), k, 1 / 3, 5))(
      jax.random.key(1))
  assert abs(np.asarray(att1).mean() - attempts.mean()) < 0.1


def test_chunk_counts_match_bruteforce():
  rng = np.random.default_rng(0)
  cand = rng.integers(0, 2, size=(7, 33, 3)).astype(np.int32)
  count, is_rep = tm.chunk_counts(jnp.asarray(cand))
  eq = np.all(cand[:, :, None] == cand[:, None, :], axis=-1)
  np.testing.assert_array_equal(count, eq.sum(-1))
  reps = np.asarray(is_rep)
  # Exactly one representative per distinct chunk in each row.
  for b in range(cand.shape[0]):
    assert reps[b].sum() == len({tuple(c) for c in cand[b]})
    assert len({tuple(c) for c in cand[b][reps[b]]}) == reps[b].sum()


def rb_distribution(T, N, rows=1000, seed=2):
  """Expected output distribution of the batch sampler (selection probabilities averaged)."""
  logits = jnp.log(jnp.asarray(P, jnp.float32))
  idx = jax.random.categorical(jax.random.key(seed), logits, shape=(rows, N))
  w = np.asarray(jax.nn.softmax(tm.batch_log_weights(TABLE[idx], T), axis=-1))
  probs = np.zeros(6)
  np.add.at(probs, np.asarray(idx).ravel(), w.ravel())
  return probs / rows


@pytest.mark.parametrize("T", [1 / 2, 1 / 3, 0.7])
def test_batch_sampler_bias_shrinks_with_candidates(T):
  tv = [0.5 * np.abs(rb_distribution(T, N) - tempered(T)).sum() for N in (8, 64, 512)]
  assert tv[0] > tv[1] > tv[2]
  assert tv[2] < 0.01


def test_batch_sampler_reference_rule_for_integer_inverse_temperature():
  # Counts: chunk A x3, B x2, C x1 → weights C(3,2)=3, C(2,2)=1, C(1,2)=0 at T=1/2;
  # at T=1/4 nobody reaches 4 → fall back to n=3: only A.
  a, b, c = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
  cand = jnp.asarray([[a, b, a, c, b, a]], jnp.int32)
  w = np.exp(np.asarray(tm.batch_log_weights(cand, 1 / 2)))[0]
  np.testing.assert_allclose(w, [3, 1, 0, 0, 0, 0], atol=1e-5)
  w = np.exp(np.asarray(tm.batch_log_weights(cand, 1 / 4)))[0]
  np.testing.assert_allclose(w, [1, 0, 0, 0, 0, 0], atol=1e-6)
  # T=1: weight ∝ count (i.e. a uniform pick among candidates).
  w = np.exp(np.asarray(tm.batch_log_weights(cand, 1.0)))[0]
  np.testing.assert_allclose(w, [3, 2, 0, 1, 0, 0], atol=1e-5)


@pytest.mark.parametrize("T", [1.0, 1 / 2, 1 / 3, 0.7])
def test_batch_sampler_chi2_at_large_n(T):
  rows, N = 2000, 512
  logits = jnp.log(jnp.asarray(P, jnp.float32))

  @jax.jit
  def draws(key):
    ck, sk = jax.random.split(key)
    cand = TABLE[jax.random.categorical(ck, logits, shape=(rows, N))]
    return tm.batch_sample(cand, sk, T)

  counts = sum(np.bincount(chunk_index(draws(jax.random.key(i))), minlength=6) for i in range(5))
  assert chi2(counts, tempered(T)) < CHI2_DF5_999


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -0.5, 1.5, float("inf"), "hot"])
def test_invalid_temperature(bad):
  with pytest.raises(CalmError, match="temperature"):
    tm.validate_temperature(bad)
  with pytest.raises(CalmError):
    tm.exact_sample(make_draw(P, 2), jax.random.key(0), bad, 10)
  with pytest.raises(CalmError):
    tm.batch_sample(jnp.zeros((1, 4, K), jnp.int32), jax.random.key(0), bad)


def test_split_inverse_temperature():
  assert tm.split_inverse_temperature(1 / 3) == (3, 0.0)
  n, a = tm.split_inverse_temperature(0.7)
  assert n == 1 and abs(a - (1 / 0.7 - 1)) < 1e-12


def test_exact_sampler_program_does_not_grow_with_draws_per_step():
  """The R draws of an iteration are consumed in a loop, not unrolled: the lowered program (and
  so its compile time) is the same size for R = 2 and R = 64."""
  def size(R):
    f = lambda k: tm.exact_sample(make_draw(P, 8), k, 0.01, 1000, draws_per_step=R)
    return len(jax.jit(f).lower(jax.random.key(0)).as_text())

  assert size(64) < 1.1 * size(2)


def test_default_draws_per_step_is_bounded():
  """⌈1/T⌉ draws per iteration, at most 8 however low T is (each draw of a flow or diffusion
  head is a whole ODE / denoising chain)."""
  assert [tm.default_draws_per_step(T) for T in (1.0, 0.7, 1 / 2, 1 / 3, 0.2)] == [1, 2, 2, 3, 5]
  assert [tm.default_draws_per_step(T) for T in (1 / 8, 0.1, 0.01, 1e-4)] == [8, 8, 8, 8]
