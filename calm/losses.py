"""Training objectives of the three stages (pure functions of modules, batch and PRNG key)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from calm.config import HeadConfig, ModelConfig
from calm.rng import is_key_batch

Metrics = dict[str, jax.Array]

# ----------------------------------------------------------------------------- pieces


def _pow_of_sq(sq: jax.Array, beta: float) -> jax.Array:
  """(max(sq, 0))^(β/2), with a finite (zero) gradient where sq ≤ 0."""
  pos = sq > 0
  safe = jnp.where(pos, sq, 1.0)
  val = jnp.sqrt(safe) if beta == 1.0 else safe ** (beta / 2)
  return jnp.where(pos, val, 0.0)


def energy_terms(x_NBSL: jax.Array, y_MBSL: jax.Array, beta: float
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(score, dist_xx, dist_xy), each [B, S], with

    dist_xx = Σ_{i≠j} ‖x_i − x_j‖^β / (N(N−1)),  dist_xy = mean_{i,j} ‖x_i − y_j‖^β,
    score = dist_xx − 2·dist_xy  (higher is better; maximised in expectation by x ~ law of y).

  The N(N−1)/2 sample pairs use exact differences; the N×M sample/target distances use
  ‖a−b‖² = ‖a‖² + ‖b‖² − 2a·b on vectors centred at the first target sample (full-precision
  matmul, clamped at 0), so no [N, M, B, S, L] tensor is formed. Distances do not depend on the
  centre, so it carries no gradient; both operands are laid out [B, S, ·, L] once, which keeps
  XLA from transposing the M targets inside the batched matmul and its gradient.
  """
  x = x_NBSL.astype(jnp.float32)
  y = y_MBSL.astype(jnp.float32)
  n = x.shape[0]
  iu, ju = np.triu_indices(n, 1)
  sq_pairs = jnp.sum(jnp.square(x[iu] - x[ju]), axis=-1)  # [P, B, S]
  dist_xx = 2.0 * jnp.sum(_pow_of_sq(sq_pairs, beta), axis=0) / (n * (n - 1))

  center_BSL = jax.lax.stop_gradient(y[0])
  x_BSNL = jnp.moveaxis(x - center_BSL, 0, -2)
  y_BSML = jnp.moveaxis(y - center_BSL, 0, -2)
  xx_BSN = jnp.sum(x_BSNL * x_BSNL, axis=-1)
  yy_BSM = jnp.sum(y_BSML * y_BSML, axis=-1)
  xy_BSNM = jnp.einsum("bsnl,bsml->bsnm", x_BSNL, y_BSML, precision=jax.lax.Precision.HIGHEST)
  sq_BSNM = xx_BSN[..., :, None] + yy_BSM[..., None, :] - 2.0 * xy_BSNM
  dist_xy = jnp.mean(_pow_of_sq(sq_BSNM, beta), axis=(-2, -1))
  return dist_xx - 2.0 * dist_xy, dist_xx, dist_xy


def energy_score(x_NBSL: jax.Array, y_MBSL: jax.Array, beta: float) -> jax.Array:
  """Energy score [B, S] of N model samples against M target samples (see `energy_terms`)."""
  return energy_terms(x_NBSL, y_MBSL, beta)[0]


# Randomness of the stage losses is drawn row by row: `key` is either one key (split into one
# key per batch row by `row_keys`) or already a batch of row keys [B]. The trainer passes
# fold_in(step key, global row), so a row sees the same noise whatever the micro-batching,
# accumulation or device count.


def row_keys(key: jax.Array, rows: int) -> jax.Array:
  """One key per batch row: `key` itself if it is already [rows] keys, else fold_in(key, row)."""
  if is_key_batch(key):
    if key.shape[0] != rows:
      raise ValueError(f"{key.shape[0]} row keys for a batch of {rows} rows")
    return key
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(rows, dtype=jnp.uint32))


def split_rows(keys_B: jax.Array, num: int) -> list[jax.Array]:
  """`num` independent batches of row keys from one."""
  parts = jax.vmap(lambda k: jax.random.split(k, num))(keys_B)
  return [parts[:, i] for i in range(num)]


def draw_rows(keys_B: jax.Array, draw, shape: tuple[int, ...], axis: int = 0) -> jax.Array:
  """draw(key, row_shape) row by row; the row axis of `shape` is `axis`."""
  row_shape = shape[:axis] + shape[axis + 1:]
  return jnp.moveaxis(jax.vmap(lambda k: draw(k, row_shape))(keys_B), 0, axis)


def token_dropout(ids: jax.Array, key: jax.Array, p: float) -> jax.Array:
  """Replaces each id by 0 with probability p (key: one key or one per row of ids)."""
  if p <= 0.0:
    return ids
  drop = draw_rows(row_keys(key, ids.shape[0]), lambda k, s: jax.random.bernoulli(k, p, s),
                   ids.shape)
  return jnp.where(drop, jnp.zeros_like(ids), ids)


def latent_dropout(z: jax.Array, key: jax.Array, p: float) -> jax.Array:
  """Inverted dropout: zero with probability p, survivors scaled by 1/(1−p)."""
  if p <= 0.0:
    return z
  keep = draw_rows(row_keys(key, z.shape[0]), lambda k, s: jax.random.bernoulli(k, 1.0 - p, s),
                   z.shape)
  return jnp.where(keep, z / (1.0 - p), jnp.zeros_like(z))


def kl_per_chunk(mu_BSL: jax.Array, logstd_BSL: jax.Array, clamp: float) -> jax.Array:
  """Σ_dims max(0.5(μ² + σ² − 1 − 2 log σ), clamp) → [B, S] (KL to N(0, I), floored per dim)."""
  kl = 0.5 * (jnp.square(mu_BSL) + jnp.exp(2.0 * logstd_BSL) - 1.0 - 2.0 * logstd_BSL)
  return jnp.sum(jnp.maximum(kl, clamp), axis=-1)


def cross_entropy(logits_V: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy (float32) and correctness of the argmax."""
  logits = logits_V.astype(jnp.float32)
  gold = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  ce = jax.nn.logsumexp(logits, axis=-1) - gold
  return ce, jnp.argmax(logits, axis=-1) == labels


def _chunks(ids_BT: jax.Array, k: int) -> jax.Array:
  b, t = ids_BT.shape
  if t % k:
    raise ValueError(f"sequence length {t} is not a multiple of chunk size {k}")
  return ids_BT.reshape(b, t // k, k)


# ----------------------------------------------------------------------------- stage losses


def autoencoder_loss(ae, ids_BT: jax.Array, key: jax.Array, cfg: ModelConfig
                     ) -> tuple[jax.Array, Metrics]:
  """K·CE + w·KL with token dropout on the input and dropout on the sampled latent."""
  a = cfg.autoencoder
  k_tok, k_eps, k_drop = split_rows(row_keys(key, ids_BT.shape[0]), 3)
  ids_BSK = _chunks(ids_BT, cfg.chunk_size)
  mu, logstd = ae.encode(token_dropout(ids_BSK, k_tok, a.token_dropout))
  z = mu + jnp.exp(logstd) * draw_rows(k_eps, lambda k, s: jax.random.normal(k, s, mu.dtype),
                                       mu.shape)
  logits = ae.decode(latent_dropout(z, k_drop, a.latent_dropout))
  ce, correct = cross_entropy(logits, ids_BSK)
  ce, kl = jnp.mean(ce), jnp.mean(kl_per_chunk(mu, logstd, a.kl_clamp))
  loss = cfg.chunk_size * ce + a.kl_weight * kl
  return loss, {"loss": loss, "ce": ce, "kl": kl, "token_acc": jnp.mean(correct),
                "logstd": jnp.mean(logstd)}


def calm_loss(model, ae, ids_BT: jax.Array, key: jax.Array, cfg: ModelConfig
              ) -> tuple[jax.Array, Metrics]:
  """The head's loss against draws of the frozen AE posterior of the next chunk.

  Position i reads chunk i and is scored against chunk i+1; `ae` receives no gradient. The head
  (`model.generator`, see `calm.heads`) says how many posterior draws it scores against and
  returns its loss per position and sample: the energy head −energy score of N head samples
  against M draws; flow / diffusion their regression loss on N draws, each with its own time and
  noise (as the reference). The loss is their mean.
  """
  head = model.generator
  k_noise, k_eps = split_rows(row_keys(key, ids_BT.shape[0]), 2)
  ids_BSK = _chunks(ids_BT, cfg.chunk_size)
  mu, logstd = jax.lax.stop_gradient(ae.encode(ids_BSK[:, 1:]))
  y_MBSL = mu + jnp.exp(logstd) * draw_rows(
      k_eps, lambda k, s: jax.random.normal(k, s, jnp.float32),
      (head.target_draws(cfg.head), *mu.shape), axis=1)
  hid, _ = model.hidden(ids_BSK[:, :-1])
  loss_per, extra = head.loss(hid, y_MBSL, k_noise)
  loss = jnp.mean(loss_per)
  return loss, {"loss": loss, **extra}


def next_chunk_posteriors(ae, ids_BT: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """(μ, log σ) [B, S−1, L] of the frozen AE posterior of chunks 1..S−1 (the CALM targets)."""
  mu, logstd = ae.encode(_chunks(ids_BT, chunk_size)[:, 1:])
  return (jax.lax.stop_gradient(mu).astype(jnp.float32),
          jax.lax.stop_gradient(logstd).astype(jnp.float32))


def reference_energy_losses(mu_BSL: jax.Array, logstd_BSL: jax.Array, pool_mu_PL: jax.Array,
                            pool_logstd_PL: jax.Array, key: jax.Array, h: HeadConfig
                            ) -> Metrics:
  """Energy losses of two context-free reference heads, with `calm_loss`'s estimator (same N, M,
  β and, for the same key — one, or one per row — the same M target draws):

    baseline: each of the N samples is drawn from the posterior of a uniformly random chunk of
      the pool (the evaluation set's marginal: the best a head can do without the context);
    oracle: the N samples are drawn from the true next chunk's posterior.
  """
  k_noise, k_eps = split_rows(row_keys(key, mu_BSL.shape[0]), 2)
  k_pick, k_base, k_orc = split_rows(k_noise, 3)
  sigma_BSL = jnp.exp(logstd_BSL)
  normal = lambda k, s: jax.random.normal(k, s, jnp.float32)
  y_MBSL = mu_BSL + sigma_BSL * draw_rows(k_eps, normal, (h.num_target_samples, *mu_BSL.shape),
                                          axis=1)
  shape_NBS = (h.num_samples, *mu_BSL.shape[:-1])
  pick_NBS = draw_rows(k_pick, lambda k, s: jax.random.randint(k, s, 0, pool_mu_PL.shape[0]),
                       shape_NBS, axis=1)
  base_NBSL = pool_mu_PL[pick_NBS] + jnp.exp(pool_logstd_PL[pick_NBS]) * draw_rows(
      k_base, normal, (*shape_NBS, mu_BSL.shape[-1]), axis=1)
  orc_NBSL = mu_BSL + sigma_BSL * draw_rows(k_orc, normal, (h.num_samples, *mu_BSL.shape),
                                            axis=1)
  return {"baseline_loss": -jnp.mean(energy_score(base_NBSL, y_MBSL, h.beta)),
          "oracle_loss": -jnp.mean(energy_score(orc_NBSL, y_MBSL, h.beta))}


def normalised_score(loss, baseline_loss, oracle_loss):
  """(baseline − loss) / (baseline − oracle): 0 = no use of the context, 1 = the oracle."""
  return (baseline_loss - loss) / (baseline_loss - oracle_loss)


def ar_loss(model, ids_BT: jax.Array) -> tuple[jax.Array, Metrics]:
  """Mean next-token cross-entropy over positions 1..T−1."""
  logits, _ = model(ids_BT)
  ce, correct = cross_entropy(logits[:, :-1], ids_BT[:, 1:])
  loss = jnp.mean(ce)
  return loss, {"loss": loss, "ce": loss, "token_acc": jnp.mean(correct)}
