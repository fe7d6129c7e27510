"""Brier-n estimators against closed forms on a known Markov-chain "language"."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm import brier

V = 3
PI = np.array([0.5, 0.3, 0.2])  # data distribution of the first token
A = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])  # data transitions


def temper(pi, a, tau):
  """Per-step tempered chain: τ < 1 over-confident, τ > 1 under-confident."""
  p = pi ** (1 / tau)
  t = a ** (1 / tau)
  return p / p.sum(), t / t.sum(axis=1, keepdims=True)


def seq_prob(pi, a, x):
  p = pi[x[0]]
  for u, v in zip(x[:-1], x[1:]):
    p *= a[u, v]
  return p


def exact_brier(model, data=(PI, A)):
  """E_{y~data}[2 P(y[:n])] − Σ_x P(x[:n])², n = 1..4, by enumeration."""
  out = []
  for n in range(1, 5):
    grams = list(itertools.product(range(V), repeat=n))
    pm = np.array([seq_prob(*model, g) for g in grams])
    pd = np.array([seq_prob(*data, g) for g in grams])
    out.append(2 * (pd * pm).sum() - (pm ** 2).sum())
  return np.array(out)


def sample_chain(key, pi, a, shape):
  k0, *ks = jax.random.split(key, 4)
  x = [jax.random.categorical(k0, jnp.log(jnp.asarray(pi)), shape=shape)]
  la = jnp.log(jnp.asarray(a))
  for k in ks:
    x.append(jax.random.categorical(k, la[x[-1]]))
  return jnp.stack(x, axis=-1)


def chain_logits(pi, a, prev_P3):
  """Logits for 4 steps given the previous 3 tokens of a path (step 0 uses π)."""
  la = jnp.log(jnp.asarray(a, jnp.float32))
  first = jnp.broadcast_to(jnp.log(jnp.asarray(pi, jnp.float32)), prev_P3.shape[:-1] + (V,))
  return jnp.concatenate([first[..., None, :], la[prev_P3]], axis=-2)


def calm_estimates(key, model, n):
  ky, k1, k2 = jax.random.split(key, 3)
  y = sample_chain(ky, PI, A, (n,))
  x1 = sample_chain(k1, *model, (n,))
  x2 = sample_chain(k2, *model, (n,))
  return np.asarray(brier.brier_terms_from_samples(x1, x2, y))


def ar_estimates(key, model, n):
  ky, k1 = jax.random.split(key)
  y = sample_chain(ky, PI, A, (n,))
  x1 = sample_chain(k1, *model, (n,))
  return np.asarray(brier.brier_terms_from_logits(
      chain_logits(*model, y[:, :3]), y, chain_logits(*model, x1[:, :3]), x1[:, :3]))


def test_sample_estimator_by_hand():
  y = jnp.array([[1, 2, 3, 4, 9]])
  x1 = jnp.array([[1, 2, 0, 4, 9]])
  x2 = jnp.array([[1, 2, 3, 5, 0]])
  # n:       1  2  3  4
  # x1 = y:  1  1  0  0
  # x2 = y:  1  1  1  0
  # x1 = x2: 1  1  0  0
  np.testing.assert_array_equal(brier.brier_terms_from_samples(x1, x2, y), [[1, 1, 1, 0]])


@pytest.mark.parametrize("estimator", [calm_estimates, ar_estimates])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_estimators_unbiased(estimator, tau):
  model = temper(PI, A, tau)
  est = estimator(jax.random.key(0), model, 200_000)
  mean, se = est.mean(0), est.std(0) / np.sqrt(len(est))
  exact = exact_brier(model)
  assert np.all(np.abs(mean - exact) < 3 * se), (mean, exact, se)


def test_ar_estimator_has_lower_variance():
  model = temper(PI, A, 0.8)
  v_calm = calm_estimates(jax.random.key(1), model, 50_000).var(0)
  v_ar = ar_estimates(jax.random.key(1), model, 50_000).var(0)
  assert np.all(v_ar < v_calm)


def test_ar_logits_accuracy_term_exact():
  # Deterministic check: collision of a one-hot model is 1, accuracy 2·∏p(y).
  logits = jnp.log(jnp.array([[[0.5, 0.5, 0.0]] * 4]) + 1e-30)
  y = jnp.array([[0, 1, 0, 1]])
  x1 = jnp.array([[1, 1, 0]])
  out = np.asarray(brier.brier_terms_from_logits(logits, y, logits, x1))[0]
  acc = 2 * 0.5 ** np.arange(1, 5)
  coll = 0.5 ** np.arange(1, 5)  # Σ_x P(x)² over n-grams of a fair coin
  np.testing.assert_allclose(out, acc - coll, rtol=1e-5)


def test_properness_data_distribution_scores_best():
  scores = {}
  for tau in (0.7, 1.0, 1.6):
    exact = exact_brier(temper(PI, A, tau))
    est = ar_estimates(jax.random.key(3), temper(PI, A, tau), 100_000)
    scores[tau] = (brier.brierlm(exact), brier.summarize(est, np.arange(len(est)),
                                                         num_bootstrap=0))
  for tau in (0.7, 1.6):
    assert scores[1.0][0] > scores[tau][0]
    s_true, s_bad = scores[1.0][1], scores[tau][1]
    gap_se = np.hypot(s_true["brierlm_se"], s_bad["brierlm_se"])
    assert s_true["brierlm"] - s_bad["brierlm"] > 3 * gap_se


def test_brierlm_value_and_clamp():
  assert brier.brierlm([0.5, 0.5, 0.5, 0.5]) == pytest.approx(50.0)
  assert brier.brierlm([0.9, 0.4, 0.1, 0.025]) == pytest.approx(100 * (0.9 * 0.4 * 0.1 * 0.025)
                                                                ** 0.25)
  assert brier.brierlm([0.5, 0.3, -0.01, 0.1]) == 0.0


def test_summarize_cluster_standard_error():
  rng = np.random.default_rng(0)
  D, per = 20, 5
  doc_level = rng.normal(0.4, 0.1, size=(D, 1, 4))
  est = (doc_level + rng.normal(0, 0.05, size=(D, per, 4))).reshape(-1, 4)
  docs = np.repeat(np.arange(D), per)
  s = brier.summarize(est, docs, num_bootstrap=2000, seed=1)
  # Equal-size documents: the ratio estimator is the mean of document means and its
  # cluster-robust SE is their standard error.
  doc_means = est.reshape(D, per, 4).mean(1)
  np.testing.assert_allclose(s["brier"], doc_means.mean(0), rtol=1e-12)
  np.testing.assert_allclose(s["brier_se"], doc_means.std(0, ddof=1) / np.sqrt(D), rtol=1e-9)
  assert s["documents"] == D and s["positions"] == D * per
  lo, hi = s["brierlm_ci95"]
  assert lo < s["brierlm"] < hi
  # The bootstrap CI and the delta-method SE agree roughly.
  assert 0.5 < (hi - lo) / (2 * 1.96 * s["brierlm_se"]) < 2.0


def test_summarize_zero_brierlm_has_no_nan():
  """BrierLM = 0 (Brier-4 <= 0, as for an untrained model): its SE is the bootstrap's (the
  delta method needs all Brier-n > 0), or absent with one document; never NaN."""
  from calm import evaluate

  rng = np.random.default_rng(0)
  D, per = 12, 6
  est = rng.normal([0.3, 0.1, 0.02, -0.05], 0.05, size=(D * per, 4))
  docs = np.repeat(np.arange(D), per)
  s = brier.summarize(est, docs, num_bootstrap=500, seed=2)
  assert s["brierlm"] == 0.0
  w = np.random.default_rng(2).multinomial(D, np.full(D, 1 / D), size=500).astype(float)
  sums = est.reshape(D, per, 4).sum(1)
  boot = 100 * np.prod(np.maximum(w @ sums / (w.sum(1, keepdims=True) * per), 0), 1) ** 0.25
  np.testing.assert_allclose(s["brierlm_se"], boot.std(ddof=1), rtol=1e-9)
  assert s["brierlm_ci95"][0] == 0.0 and s["brierlm_ci95"][1] >= 0.0
  one = brier.summarize(est, np.zeros(len(est), int))
  assert one["brierlm_se"] is None and one["brierlm_ci95"] is None
  for summary in (s, one):
    table = evaluate.format_table(summary)
    assert "nan" not in table.lower() and "BrierLM" in table
  assert evaluate.format_table(one).splitlines()[-1].split()[1:] == ["0.000", "-"]


def test_fixture_parity_calm_brier():
  """Brier-1..4 of the reference from two head samples decoded by the AE (argmax)."""
  import json

  from flax import nnx

  from calm.models.autoencoder import Autoencoder
  from test_parity import FIXTURE, assign, fixture_configs, load_reference_state

  if not FIXTURE.is_file():
    pytest.skip(f"{FIXTURE} not present")
  npz = np.load(FIXTURE)
  cfgs = fixture_configs(json.loads(str(npz["meta"])))
  cfg = cfgs["autoencoder"]
  ae = Autoencoder(cfg, rngs=nnx.Rngs(0))
  assign(ae, load_reference_state(npz, cfgs)["autoencoder"])
  x1, x2 = jnp.argmax(ae.decode(jnp.asarray(npz["out/head_samples"][:2])), axis=-1)
  ids = npz["in/input_ids"]
  B, K = ids.shape[0], cfg.chunk_size
  for targets, want in ((ids[:, K:], npz["out/brier"]), (npz["in/brier_targets2"], npz["out/brier2"])):
    y = jnp.asarray(targets).reshape(B, -1, K)
    got = brier.brier_terms_from_samples(x1, x2, y).mean(axis=(0, 1))
    np.testing.assert_allclose(got, want, atol=1e-6)


# ----------------------------------------------------------------------------- model-level


def _tiny_cfg(**changes):
  from calm import config as config_lib
  from conftest import ROOT

  cfg = config_lib.load(ROOT / "configs" / "tiny.yaml").model
  return config_lib.replace(cfg, **changes) if changes else cfg


@pytest.mark.slow
def test_ar_block_scores_unbiased_against_enumeration():
  """AR estimator through the KV-cache continuation vs the exact Brier-n of a V=8 model."""
  from flax import nnx

  from calm import evaluate
  from calm.models.ar import ARModel

  V = 8
  model = ARModel(_tiny_cfg(vocab_size=V), rngs=nnx.Rngs(0))
  w = model.lm_head.kernel
  w[...] = 0.3 * jax.random.normal(jax.random.key(1), w.shape)  # a non-uniform model
  ids = jnp.asarray([[1, 5, 2, 7, 3, 3, 0, 6, 4, 2, 1, 5]], jnp.int32)
  T, stride = ids.shape[1], 4
  pos = evaluate.ar_positions(T, stride)
  fn = jax.jit(lambda k: evaluate.ar_block_scores(model, ids, k, stride))
  est = np.stack([np.asarray(fn(jax.random.key(i)))[0] for i in range(300)])  # [seeds, P, 4]
  for j, p in enumerate(pos):
    # exact: enumerate all continuations of the true prefix up to 4 tokens
    prefix = np.asarray(ids[0, :p])
    logp_paths = np.zeros((1,))
    paths = np.zeros((1, 0), np.int32)
    coll = []
    for n in range(4):
      seqs = np.concatenate([np.repeat(prefix[None], len(paths), 0), paths], 1)
      logits, _ = model(jnp.asarray(seqs))
      logp = np.asarray(jax.nn.log_softmax(logits[:, -1].astype(jnp.float32)), np.float64)
      joint = (logp_paths[:, None] + logp).reshape(-1)
      coll.append(np.exp(2 * joint).sum())
      paths = np.concatenate([np.repeat(paths, V, 0), np.tile(np.arange(V), len(paths))[:, None]],
                             1)
      logp_paths = joint
    full, _ = model(ids)
    lp = np.asarray(jax.nn.log_softmax(full[0].astype(jnp.float32)), np.float64)
    acc = 2 * np.exp(np.cumsum([lp[p - 1 + k, int(ids[0, p + k])] for k in range(4)]))
    exact = acc - np.array(coll)
    mean, se = est[:, j].mean(0), est[:, j].std(0) / np.sqrt(len(est)) + 1e-7
    np.testing.assert_allclose(est[:, j, 0], exact[0], rtol=1e-4)  # Brier-1 is exact
    assert np.all(np.abs(mean - exact) < 3 * se + 1e-6), (p, mean, exact, se)


@pytest.mark.parametrize("K", [4, 2])
def test_calm_document_scores(K):
  """End to end on random tiny models: positions counted per protocol, values are estimates."""
  from flax import nnx

  from calm import evaluate
  from calm.models.autoencoder import Autoencoder
  from calm.models.calm import CALM

  cfg = _tiny_cfg(chunk_size=K)
  calm, ae = CALM(cfg, rngs=nnx.Rngs(0)), Autoencoder(cfg, rngs=nnx.Rngs(1))
  docs = [np.arange(5, 5 + 37) % 500, np.arange(30) % 7 + 10, np.arange(3) + 1]
  est, doc_ids = evaluate.score_documents("calm", (calm, ae), docs, block_tokens=16,
                                          chunk_size=K, batch_size=2, seed=0, pad_id=0)
  m = -(-4 // K)
  expected = 0
  for d in docs[:2]:
    for start in range(0, len(d), 16):
      n = (min(16, len(d) - start) // K) * K
      expected += max(n // K - m, 0)
  assert len(est) == expected and set(np.unique(doc_ids)) == {0, 1}
  # indicator estimators take values in {-1, 0, 1, 2}
  assert est.shape[1] == 4 and set(np.unique(est)) <= {-1.0, 0.0, 1.0, 2.0}


class _IIDChunks:
  """Stands in for both CALM and its autoencoder: every next chunk is drawn i.i.d. from `table`
  with probabilities `q`, whatever the prefix (the head draws uniform noise; the "decoder"
  inverts q's CDF). Brier-n of such a model has a closed form."""

  def __init__(self, table, q):
    self.table = jnp.asarray(table, jnp.int32)
    self.cdf = jnp.cumsum(jnp.asarray(q, jnp.float32))
    self.chunk_size = self.table.shape[1]

  def init_cache(self, batch, max_len):
    from calm.models.transformer import KVCache

    z = jnp.zeros((1, batch, max_len, 1))  # [layers, B, W, kv_heads·head_dim]
    return KVCache(z, z, jnp.zeros((batch,), jnp.int32))

  def hidden(self, ids_BSK, *, cache):
    from calm.models.transformer import KVCache

    B, S = ids_BSK.shape[:2]
    return jnp.zeros((B, S, 1)), KVCache(cache.k, cache.v, cache.length + S)

  def draw(self, h_BD, key, num):
    keys_B = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(h_BD.shape[0]))
    return jax.vmap(lambda k: jax.random.uniform(k, (num, 1)))(keys_B)  # u ~ U(0, 1)

  def decode_ids(self, z):
    idx = jnp.minimum(jnp.sum(z >= self.cdf, axis=-1), self.cdf.shape[0] - 1)
    return self.table[idx]


def test_calm_block_scores_k2_unbiased_on_a_known_chunk_model():
  """K=2 (two chunks per 4-gram): the continued-path estimator averages to the exact Brier-n."""
  from calm import evaluate

  table = np.array([[1, 2], [1, 3], [4, 5], [6, 2]])
  q = np.array([0.4, 0.3, 0.2, 0.1])
  first = {t: q[table[:, 0] == t].sum() for t in np.unique(table[:, 0])}  # first-token marginal
  model = _IIDChunks(table, q)
  ids = np.concatenate([table[[0, 1, 0, 2, 3, 0, 1]], [[7, 7]]]).reshape(1, -1)  # one unseen
  fn = jax.jit(lambda k: evaluate.calm_block_scores(model, model, jnp.asarray(ids), k)[0])
  est = np.stack([np.asarray(fn(jax.random.key(i)))[0] for i in range(400)])  # [seeds, P, 4]
  chunks = ids.reshape(-1, 2)
  sq, sf = (q ** 2).sum(), sum(v ** 2 for v in first.values())
  coll = np.array([sf, sq, sq * sf, sq * sq])
  assert est.shape[1] == len(chunks) - 2
  for s in range(est.shape[1]):
    y1, y2 = chunks[s + 1], chunks[s + 2]
    p1 = q[np.all(table == y1, axis=1)].sum()
    p2 = q[np.all(table == y2, axis=1)].sum()
    prob = np.array([first.get(y1[0], 0.0), p1, p1 * first.get(y2[0], 0.0), p1 * p2])
    exact = 2 * prob - coll
    mean, se = est[:, s].mean(0), est[:, s].std(0) / np.sqrt(len(est)) + 1e-6
    assert np.all(np.abs(mean - exact) < 4 * se), (s, mean, exact, se)
