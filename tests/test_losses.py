"""Maths of the losses: energy score, KL clamp, dropouts, stage losses, FLOP counts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calm import config as config_lib
from calm import losses, metrics
from calm.models.ar import ARModel
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM

from conftest import ROOT
from test_models import build, jitted


@pytest.fixture(scope="module")
def cfg() -> config_lib.ModelConfig:
  return config_lib.load(ROOT / "configs" / "tiny.yaml").model


def naive_energy_terms(x, y, beta):
  """Direct [N, N, ...] and [N, M, ...] differences (the reference's formulation)."""
  n = x.shape[0]
  dxx = jnp.sum(jnp.square(x[:, None] - x[None, :]), -1)
  dxx = jnp.where(jnp.eye(n, dtype=bool)[:, :, None, None], 0.0, dxx) ** (beta / 2)
  dxx = jnp.sum(dxx, axis=(0, 1)) / (n * (n - 1))
  dxy = jnp.mean(jnp.sum(jnp.square(x[:, None] - y[None, :]), -1) ** (beta / 2), axis=(0, 1))
  return dxx - 2 * dxy, dxx, dxy


# ----------------------------------------------------------------------------- energy score


@pytest.mark.parametrize("beta", [1.0, 0.5, 1.5])
def test_energy_score_matches_naive_values_and_gradients(beta):
  kx, ky = jax.random.split(jax.random.key(0))
  x = 3.0 + jax.random.normal(kx, (6, 2, 3, 5))  # offset: exercises the centring
  y = 3.2 + 0.7 * jax.random.normal(ky, (9, 2, 3, 5))
  weights = jax.random.normal(jax.random.key(1), (2, 3))

  def terms_and_grads(fn):
    loss = lambda x, y: jnp.sum(weights * fn(x, y, beta)[0])
    return jax.jit(lambda x, y: (fn(x, y, beta), jax.grad(loss, (0, 1))(x, y)))(x, y)

  got, (gx, gy) = terms_and_grads(losses.energy_terms)
  want, (nx, ny) = terms_and_grads(naive_energy_terms)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gx, nx, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gy, ny, rtol=1e-4, atol=1e-6)


def test_energy_score_gradient_finite_for_identical_samples():
  x = jnp.zeros((4, 1, 2, 3))  # collapsed head (e.g. zero-initialised): all distances 0
  y = jnp.concatenate([jnp.zeros((1, 1, 2, 3)), jnp.ones((3, 1, 2, 3))])  # one target == x
  g = jax.grad(lambda x: jnp.sum(losses.energy_score(x, y, 1.0)))(x)
  assert bool(jnp.all(jnp.isfinite(g)))
  # pairwise term contributes nothing; each sample is pulled towards the three y = 1 targets
  np.testing.assert_allclose(g, jnp.full_like(g, 2 * 3 / (4 * 4 * math.sqrt(3))), rtol=1e-5)


def _expected_abs_normal(mean: float, std: float) -> float:
  """E|Z| for Z ~ N(mean, std²)."""
  phi = 0.5 * (1 + math.erf(-mean / (std * math.sqrt(2))))
  return std * math.sqrt(2 / math.pi) * math.exp(-mean**2 / (2 * std**2)) + mean * (1 - 2 * phi)


def test_energy_score_closed_form_one_dimensional_gaussians():
  """x ~ N(m1, s1²), y ~ N(m2, s2²): score = E|X−X'| − 2E|X−Y| in closed form."""
  m1, s1, m2, s2 = 0.3, 1.2, -0.4, 0.8
  kx, ky = jax.random.split(jax.random.key(2))
  x = m1 + s1 * jax.random.normal(kx, (3000, 1, 1, 1))
  y = m2 + s2 * jax.random.normal(ky, (3000, 1, 1, 1))
  _, dxx, dxy = losses.energy_terms(x, y, 1.0)
  want_xx = 2 * s1 / math.sqrt(math.pi)
  want_xy = _expected_abs_normal(m1 - m2, math.hypot(s1, s2))
  assert abs(float(dxx[0, 0]) - want_xx) < 0.03
  assert abs(float(dxy[0, 0]) - want_xy) < 0.03


def test_energy_score_is_maximised_at_the_target_distribution():
  """Averaged over many positions, N=8 samples from the target beat shifted / scaled ones."""
  B, S, L, N, M = 1, 400, 4, 8, 100
  keys = jax.random.split(jax.random.key(3), 2)
  y = jax.random.normal(keys[0], (M, B, S, L))
  eps = jax.random.normal(keys[1], (N, B, S, L))
  candidates = {"target": eps, "shifted": eps + 0.5, "wider": 1.5 * eps, "narrower": 0.6 * eps}
  scores = {k: float(jnp.mean(losses.energy_score(x, y, 1.0))) for k, x in candidates.items()}
  best = max(scores, key=scores.get)
  assert best == "target", scores


# ----------------------------------------------------------------------------- AE pieces


def test_kl_clamped_per_dimension_with_zero_gradient_below_the_floor():
  mu = jnp.array([[[0.0, 2.0, 0.5]]])
  logstd = jnp.zeros_like(mu)
  # per-dim KL: 0, 2, 0.125 → clamped at 0.5: 0.5 + 2 + 0.5
  np.testing.assert_allclose(losses.kl_per_chunk(mu, logstd, 0.5), [[3.0]])
  g = jax.grad(lambda m: jnp.sum(losses.kl_per_chunk(m, logstd, 0.5)))(mu)
  np.testing.assert_allclose(g, [[[0.0, 2.0, 0.0]]])
  # unclamped: the exact Gaussian KL, e.g. μ=0, σ=e: 0.5(e² − 1 − 2)
  np.testing.assert_allclose(losses.kl_per_chunk(jnp.zeros((1, 1, 1)), jnp.ones((1, 1, 1)), 0.0),
                             [[0.5 * (math.e**2 - 3)]], rtol=1e-6)


def test_token_dropout_rate():
  ids = jnp.full((200, 500), 7, jnp.int32)
  out = losses.token_dropout(ids, jax.random.key(4), 0.15)
  dropped = np.asarray(out == 0)
  assert abs(dropped.mean() - 0.15) < 0.005
  assert set(np.unique(np.asarray(out))) == {0, 7}
  np.testing.assert_array_equal(losses.token_dropout(ids, jax.random.key(4), 0.0), ids)


def test_latent_dropout_rate_and_scaling():
  z = jnp.ones((200, 500))
  out = np.asarray(losses.latent_dropout(z, jax.random.key(5), 0.15))
  assert abs((out == 0).mean() - 0.15) < 0.005
  np.testing.assert_allclose(out[out != 0], 1 / 0.85, rtol=1e-6)
  assert abs(out.mean() - 1.0) < 0.01


# ----------------------------------------------------------------------------- stage losses


def _loss_and_grad(fn, module, *args):
  graphdef, state = nnx.split(module)

  @jax.jit
  def run(state, *args):
    return jax.value_and_grad(lambda s: fn(nnx.merge(graphdef, s), *args), has_aux=True)(state)

  return run(state, *args)


def test_autoencoder_loss(cfg):
  ae = build(Autoencoder, cfg, 0)
  ids = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
  (loss, m), grads = _loss_and_grad(
      lambda ae, ids, key: losses.autoencoder_loss(ae, ids, key, cfg), ae, ids, jax.random.key(1))
  a = cfg.autoencoder
  np.testing.assert_allclose(loss, cfg.chunk_size * m["ce"] + a.kl_weight * m["kl"], rtol=1e-6)
  # random init: CE ≈ log V, KL ≥ floor · latent dims
  assert abs(float(m["ce"]) - math.log(cfg.vocab_size)) < 0.5
  assert float(m["kl"]) >= a.kl_clamp * cfg.latent_dim - 1e-4
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def _ae_loss_with_masks(ae, ids_BSK, tok_drop_BSK, eps_BSL, keep_BSL, p_lat, cfg):
  """K·CE + w·KL (float64 CE) for given token-dropout / latent-keep masks and ε."""
  a = cfg.autoencoder
  mu, logstd = ae.encode(jnp.where(tok_drop_BSK, 0, ids_BSK))
  z = mu + jnp.exp(logstd) * eps_BSL
  z = jnp.where(keep_BSL, z / (1.0 - p_lat), 0.0)
  logits = np.asarray(ae.decode(z), np.float64)
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
  ce = -np.mean(np.take_along_axis(logp, np.asarray(ids_BSK)[..., None], -1))
  kl = np.mean(np.asarray(losses.kl_per_chunk(mu, logstd, a.kl_clamp)))
  return cfg.chunk_size * ce + a.kl_weight * kl


def test_autoencoder_loss_applies_the_configured_dropouts(cfg):
  """The loss equals a reference computed with the token / latent masks drawn from its keys,
  and that reference differs from the one without dropout (so a dropout lost inside the loss
  cannot pass)."""
  a = cfg.autoencoder
  assert a.token_dropout > 0 and a.latent_dropout > 0
  ae = build(Autoencoder, cfg, 0, randomise=True)
  ids_BT = jax.random.randint(jax.random.key(0), (4, 32), 1, cfg.vocab_size)
  key = jax.random.key(1)
  graphdef, state = nnx.split(ae)
  loss, _ = jax.jit(lambda st, ids, key: losses.autoencoder_loss(
      nnx.merge(graphdef, st), ids, key, cfg))(state, ids_BT, key)

  # row b draws from split(fold_in(key, b), 3) = (token mask, posterior noise, latent mask)
  rows = [jax.random.split(jax.random.fold_in(key, b), 3) for b in range(4)]
  ids_BSK = ids_BT.reshape(4, -1, cfg.chunk_size)
  shape_SL = (ids_BSK.shape[1], cfg.latent_dim)
  drop_BSK = jnp.stack([jax.random.bernoulli(r[0], a.token_dropout, ids_BSK.shape[1:])
                        for r in rows])
  keep_BSL = jnp.stack([jax.random.bernoulli(r[2], 1.0 - a.latent_dropout, shape_SL)
                        for r in rows])
  eps_BSL = jnp.stack([jax.random.normal(r[1], shape_SL) for r in rows])
  assert 0 < float(jnp.mean(drop_BSK)) < 0.5 and 0.5 < float(jnp.mean(keep_BSL)) < 1
  want = _ae_loss_with_masks(ae, ids_BSK, drop_BSK, eps_BSL, keep_BSL, a.latent_dropout, cfg)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  no_drop = jnp.zeros_like(drop_BSK)
  all_keep = jnp.ones_like(keep_BSL)
  for other in (_ae_loss_with_masks(ae, ids_BSK, no_drop, eps_BSL, keep_BSL, a.latent_dropout, cfg),
                _ae_loss_with_masks(ae, ids_BSK, drop_BSK, eps_BSL, all_keep, 0.0, cfg)):
    assert abs(other - want) > 1e-4 * abs(want), (other, want)  # 100× the tolerance above


def test_calm_loss_scores_each_position_against_the_next_chunk(cfg):
  """Recomputed position by position: the hidden state of chunks 0..i (a prefix on its own)
  drives N head samples that are scored against M posterior draws of chunk i+1 alone."""
  h = cfg.head
  model = build(CALM, cfg, 0, randomise=True)
  ae = build(Autoencoder, cfg, 1, randomise=True)
  B, S, K = 2, 5, cfg.chunk_size
  ids_BSK = jax.random.randint(jax.random.key(0), (B, S, K), 0, cfg.vocab_size)
  key = jax.random.key(2)
  gd_m, st_m = nnx.split(model)
  gd_a, st_a = nnx.split(ae)
  loss, _ = jax.jit(lambda sm, sa, ids, key: losses.calm_loss(
      nnx.merge(gd_m, sm), nnx.merge(gd_a, sa), ids, key, cfg))(
          st_m, st_a, ids_BSK.reshape(B, -1), key)

  # row b draws from split(fold_in(key, b)) = (head noise, target noise)
  rows = [jax.random.split(jax.random.fold_in(key, b)) for b in range(B)]
  noise_NBSU = jnp.stack([jax.random.uniform(r[0], (h.num_samples, S - 1, h.noise_dim),
                                             jnp.float32, -0.5, 0.5) for r in rows], axis=1)
  eps_MBSL = jnp.stack([jax.random.normal(r[1], (h.num_target_samples, S - 1, cfg.latent_dim))
                        for r in rows], axis=1)
  scores = []
  for i in range(S - 1):
    hid_BD = model.hidden(ids_BSK[:, :i + 1])[0][:, -1]
    x_NBL = np.asarray(model.generator(hid_BD, noise_NBSU[:, :, i]), np.float64)
    mu_BL, logstd_BL = ae.encode(ids_BSK[:, i + 1])
    y_MBL = np.asarray(mu_BL + jnp.exp(logstd_BL) * eps_MBSL[:, :, i], np.float64)
    n = x_NBL.shape[0]
    dxx = np.linalg.norm(x_NBL[:, None] - x_NBL[None, :], axis=-1).sum((0, 1)) / (n * (n - 1))
    dxy = np.linalg.norm(x_NBL[:, None] - y_MBL[None, :], axis=-1).mean((0, 1))
    scores.append(dxx - 2 * dxy)
  assert h.beta == 1.0
  np.testing.assert_allclose(loss, -np.mean(scores), rtol=1e-4)


def test_calm_loss_trains_the_model_not_the_autoencoder(cfg):
  model = build(CALM, cfg, 0)
  ae = build(Autoencoder, cfg, 1)
  ids = jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.vocab_size)
  key = jax.random.key(2)
  gd_m, st_m = nnx.split(model)
  gd_a, st_a = nnx.split(ae)

  @jax.jit
  def grads(st_m, st_a):
    f = lambda sm, sa: losses.calm_loss(nnx.merge(gd_m, sm), nnx.merge(gd_a, sa), ids, key, cfg)
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(st_m, st_a)

  (loss, m), (g_model, g_ae) = grads(st_m, st_a)
  np.testing.assert_allclose(-loss, m["energy_score"], rtol=1e-6)
  np.testing.assert_allclose(m["energy_score"], m["dist_xx"] - 2 * m["dist_xy"], rtol=1e-5)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_ae))
  # zero-initialised output layer: all samples equal at init, but it receives a gradient
  assert float(m["dist_xx"]) == 0.0
  assert float(jnp.max(jnp.abs(g_model["energy_head"]["out_fc2"]["bias"][...]))) > 0


def test_ar_loss_is_next_token_cross_entropy(cfg):
  model = build(ARModel, cfg, 0)
  ids = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
  graphdef, state = nnx.split(model)
  loss, m = jax.jit(lambda st, ids: losses.ar_loss(nnx.merge(graphdef, st), ids))(state, ids)
  logits = np.asarray(jitted(model)(ids)[0], np.float64)[:, :-1]
  logp = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
  want = -np.mean(np.take_along_axis(logp, np.asarray(ids)[:, 1:, None], -1))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  acc = np.mean(np.argmax(logits, -1) == np.asarray(ids)[:, 1:])
  np.testing.assert_allclose(m["token_acc"], acc)


def test_flops_per_token(cfg):
  """AR: ≈ 6 × (non-embedding matmul params + LM head) + causal attention."""
  b, V, T = cfg.backbone, cfg.vocab_size, 64
  d, f, h = b.hidden_dim, b.ffn_dim, b.head_dim
  matmul = b.num_layers * (d * h * (2 * b.num_heads + 2 * b.num_kv_heads) + 3 * d * f) + d * V
  attn = b.num_layers * 2 * (T / 2) * b.num_heads * h
  assert metrics.model_flops_per_token(cfg, "ar", T) == pytest.approx(6 * (matmul + attn))
  for stage in ("autoencoder", "calm"):
    assert metrics.model_flops_per_token(cfg, stage, T) > 0
  with pytest.raises(ValueError):
    metrics.model_flops_per_token(cfg, "nope", T)
  full = config_lib.load(ROOT / "configs" / "tiny.yaml", ["stage=ar", "data.block_tokens=64"])
  assert metrics.model_flops_per_token(full) == metrics.model_flops_per_token(cfg, "ar", T)


# ----------------------------------------------------------------------------- reference lines


def _head(n, m):
  return config_lib.HeadConfig(num_samples=n, num_target_samples=m)


def test_reference_lines_of_point_masses_closed_form():
  """Point-mass posteriors: the oracle scores 0 and the no-context baseline scores the mean
  distance between two chunks drawn from the set (2·E‖A−y‖ − E‖A−A'‖ averaged over targets y)."""
  pool_PL = jax.random.normal(jax.random.key(0), (64, 3)) * jnp.array([1.0, 2.0, 0.5])
  logstd_PL = jnp.full_like(pool_PL, -30.0)
  mu_BSL = jnp.tile(pool_PL.reshape(1, 64, 3), (8, 1, 1))  # each target 8 times
  ls_BSL = jnp.full_like(mu_BSL, -30.0)
  ref = jax.jit(lambda k: losses.reference_energy_losses(mu_BSL, ls_BSL, pool_PL, logstd_PL, k,
                                                          _head(16, 4)))(jax.random.key(1))
  want = float(jnp.mean(jnp.linalg.norm(pool_PL[:, None] - pool_PL[None], axis=-1)))
  np.testing.assert_allclose(ref["baseline_loss"], want, rtol=0.03)
  np.testing.assert_allclose(ref["oracle_loss"], 0.0, atol=1e-5)


@pytest.mark.parametrize("latent_dim", [1, 8])
def test_reference_lines_of_gaussians_closed_form(latent_dim):
  """N(μ_t, σ²I) posteriors: oracle = E‖X−X'‖ = 2σ·Γ((L+1)/2)/Γ(L/2); with two far-apart
  means in equal shares the baseline adds half the gap, D/2."""
  sigma, gap, L = 0.3, 40.0, latent_dim
  mu_PL = jnp.zeros((128, L)).at[::2, 0].set(gap)
  logstd_PL = jnp.full_like(mu_PL, math.log(sigma))
  mu_BSL, ls_BSL = mu_PL.reshape(4, 32, L), logstd_PL.reshape(4, 32, L)
  f = jax.jit(lambda k: losses.reference_energy_losses(mu_BSL, ls_BSL, mu_PL, logstd_PL, k,
                                                        _head(16, 16)))
  # averaged over 8 keys: one estimate's baseline has a standard deviation of ~4% (which of the
  # 2048 picks land on the far mean)
  ref = {k: float(np.mean([f(jax.random.key(i))[k] for i in range(8)]))
         for k in ("oracle_loss", "baseline_loss")}
  pair = 2 * sigma * math.exp(math.lgamma((L + 1) / 2) - math.lgamma(L / 2))
  np.testing.assert_allclose(ref["oracle_loss"], pair, rtol=0.03)
  # 2·E‖X−y‖ − E‖X−X'‖ with X a fair mixture: far pairs contribute the gap, near ones `pair`
  # (40 keys average 2.3% below this at L = 8, old and new draws alike: a finite-N effect)
  np.testing.assert_allclose(ref["baseline_loss"], pair + gap / 2, rtol=0.05)


def test_normalised_score_is_0_for_a_context_free_head_and_1_for_the_oracle():
  """Heads drawn independently of the reference lines: one from the set's marginal, one from the
  true posterior, scored by the same energy loss as training."""
  kp, kmu, ks = jax.random.split(jax.random.key(3), 3)
  mu_PL = 2.0 * jax.random.normal(kmu, (256, 4))
  logstd_PL = jnp.log(jax.random.uniform(ks, (256, 4), minval=0.2, maxval=0.6))
  mu_BSL, ls_BSL = mu_PL.reshape(8, 32, 4), logstd_PL.reshape(8, 32, 4)
  head = _head(8, 16)
  refs = {k: float(v) for k, v in losses.reference_energy_losses(
      mu_BSL, ls_BSL, mu_PL, logstd_PL, jax.random.key(4), head).items()}
  assert refs["baseline_loss"] > refs["oracle_loss"] + 1.0

  k1, k2, k3, k4 = jax.random.split(jax.random.key(5), 4)
  y_MBSL = mu_BSL + jnp.exp(ls_BSL) * jax.random.normal(k1, (16, 8, 32, 4))
  pick = jax.random.randint(k2, (8, 8, 32), 0, 256)
  marginal_NBSL = mu_PL[pick] + jnp.exp(logstd_PL[pick]) * jax.random.normal(k3, (8, 8, 32, 4))
  posterior_NBSL = mu_BSL + jnp.exp(ls_BSL) * jax.random.normal(k4, (8, 8, 32, 4))
  score = lambda x: float(losses.normalised_score(
      -jnp.mean(losses.energy_score(x, y_MBSL, 1.0)), **refs))
  assert abs(score(marginal_NBSL)) < 0.05
  assert abs(score(posterior_NBSL) - 1.0) < 0.05
  assert score(jnp.broadcast_to(mu_BSL.mean((0, 1)), (8, 8, 32, 4))) < 0  # one mean latent

