"""BrierLM: likelihood-free Brier-n estimates and their aggregation.

Brier(P, y) = 2 P(y) − Σ_x P(x)² (higher is better; a strictly proper score). Brier-n applies it
to the next n tokens as one outcome; BrierLM = 100 · (Brier-1 · Brier-2 · Brier-3 · Brier-4)^¼.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NGRAMS = 4  # Brier-1..4


def brier_terms_from_samples(x1_PJ: jax.Array, x2_PJ: jax.Array, y_PJ: jax.Array) -> jax.Array:
  """Per-position Brier-1..4 estimates from two model samples and the truth (any leading dims).

  x1, x2: two independent sampled continuations of ≥ 4 tokens from the model at each scored
  position (CALM K ≥ 4: two head samples decoded by argmax; K < 4: continuations); y: the true
  next ≥ 4 tokens. Brier-n ≈ 1{x1[:n]=y[:n]} + 1{x2[:n]=y[:n]} − 1{x1[:n]=x2[:n]}, unbiased for
  2 P(y[:n]) − Σ_x P(x)² because E 1{x1=y} = P(y) and E 1{x1=x2} = Σ_x P(x)².

  Returns:
    float32 [..., 4].
  """
  def prefix_match(a, b):
    eq = (a[..., :NGRAMS] == b[..., :NGRAMS]).astype(jnp.float32)
    return jnp.cumprod(eq, axis=-1)

  return prefix_match(x1_PJ, y_PJ) + prefix_match(x2_PJ, y_PJ) - prefix_match(x1_PJ, x2_PJ)


def brier_terms_from_logits(logits_true_P4V: jax.Array, y_P4: jax.Array,
                            logits_path_P4V: jax.Array, x1_P3: jax.Array) -> jax.Array:
  """Per-position Brier-1..4 for a model with token likelihoods (the AR baseline).

  Args:
    logits_true_P4V: logits for the next 4 tokens along the TRUE prefix: step k predicts y_k
      given context + y_<k.
    y_P4: the true next 4 tokens.
    logits_path_P4V: logits along sample 1's path: step k is the distribution given context +
      x1_<k (step 0 equals logits_true[..., 0, :]).
    x1_P3: sample 1's first 3 tokens, x1_k drawn from step k of logits_path.

  Estimator (unbiased, lower variance than two indicator samples):
  - accuracy term exact: 2 ∏_{k<n} p(y_k | y_<k);
  - collision term: ∏_{k<n−1} p(x1_k | x1_<k) · Σ_v p(v | x1_<n−1)². Since
    E_{x1~P}[P(x1_<n−1)] = Σ_u P(u)² over (n−1)-grams u, and Σ_v p(v|u)² is the exact
    collision of the last step, its expectation is Σ_u P(u)² Σ_v p(v|u)² = Σ_x P(x)² over
    n-grams. The reference multiplies indicators 1{x1_k = x2_k} of a second sample drawn along
    sample 1's path by the same last-step Σp²; conditioning on x1 turns each indicator into
    p(x1_k | x1_<k), so this is its Rao-Blackwellisation (same mean, less variance).

  Returns:
    float32 [..., 4].
  """
  logp_true_P4V = jax.nn.log_softmax(logits_true_P4V.astype(jnp.float32), axis=-1)
  logp_y_P4 = jnp.take_along_axis(logp_true_P4V, y_P4[..., None], axis=-1)[..., 0]
  logp_path_P4V = jax.nn.log_softmax(logits_path_P4V.astype(jnp.float32), axis=-1)
  logp_x1_P3 = jnp.take_along_axis(logp_path_P4V[..., :3, :], x1_P3[..., None], axis=-1)[..., 0]
  log_sumsq_P4 = jax.nn.logsumexp(2.0 * logp_path_P4V, axis=-1)
  return brier_terms_from_logprobs(logp_y_P4, logp_x1_P3, log_sumsq_P4)


def brier_terms_from_logprobs(logp_y_P4: jax.Array, logp_x1_P3: jax.Array,
                              log_sumsq_P4: jax.Array) -> jax.Array:
  """`brier_terms_from_logits` from its vocabulary reductions (nothing of size V needed).

  Args:
    logp_y_P4: log p(y_k | y_<k) along the true prefix.
    logp_x1_P3: log p(x1_k | x1_<k) of sample 1's first 3 tokens along its own path.
    log_sumsq_P4: log Σ_v p(v | x1_<k)² at each step of sample 1's path.
  """
  acc_P4 = 2.0 * jnp.exp(jnp.cumsum(logp_y_P4, axis=-1))
  log_prefix_P4 = jnp.concatenate(
      [jnp.zeros_like(logp_x1_P3[..., :1]), jnp.cumsum(logp_x1_P3, axis=-1)], axis=-1)
  return acc_P4 - jnp.exp(log_prefix_P4 + log_sumsq_P4)


# ----------------------------------------------------------------------------- aggregation


def brierlm(brier_4: Any) -> float:
  """100 · (∏_n max(Brier-n, 0))^¼."""
  b = np.maximum(np.asarray(brier_4, np.float64), 0.0)
  return float(100.0 * np.prod(b) ** (1.0 / NGRAMS))


def summarize(brier_P4: Any, doc_ids_P: Any, *, num_bootstrap: int = 1000,
              seed: int = 0) -> dict:
  """Position-weighted means with document-clustered uncertainty.

  The scores are the means over all scored positions (as the reference averages them). Scores at
  positions of one document are correlated, so uncertainty treats documents as the independent
  unit: standard errors of Brier-n are cluster-robust (ratio estimator over documents), and
  BrierLM's standard error (delta method) and 95% CI (percentile bootstrap resampling whole
  documents) follow from them.

  Args:
    brier_P4: per-position estimates (host array).
    doc_ids_P: document index of each position.

  Returns:
    dict with brier (4 means), brier_se (4), brierlm, brierlm_se, brierlm_ci95 (lo, hi),
    positions, documents. Where BrierLM is 0 (a Brier-n mean <= 0) its standard error is the
    bootstrap's; brierlm_se / brierlm_ci95 are None where no estimate exists (BrierLM 0 from a
    single document).
  """
  b_P4 = np.asarray(brier_P4, np.float64).reshape(-1, NGRAMS)
  docs = np.asarray(doc_ids_P).reshape(-1)
  if b_P4.shape[0] == 0:
    raise ValueError("no scored positions")
  _, doc_P = np.unique(docs, return_inverse=True)
  D = int(doc_P.max()) + 1
  sums_D4 = np.zeros((D, NGRAMS))
  np.add.at(sums_D4, doc_P, b_P4)
  counts_D = np.bincount(doc_P, minlength=D).astype(np.float64)
  total = counts_D.sum()
  mean_4 = sums_D4.sum(0) / total
  # Cluster-robust variance of a ratio estimator: Σ_d (s_d − m n_d)² / (Σ n_d)² · D/(D−1).
  resid_D4 = sums_D4 - counts_D[:, None] * mean_4
  if D > 1:
    cov_44 = resid_D4.T @ resid_D4 / total**2 * D / (D - 1)
  else:  # one document: fall back to i.i.d. positions
    dev = b_P4 - mean_4
    cov_44 = dev.T @ dev / max(len(b_P4) - 1, 1) / len(b_P4)
  se_4 = np.sqrt(np.maximum(np.diag(cov_44), 0.0))
  score = brierlm(mean_4)
  boot_R = None
  if D > 1 and num_bootstrap > 0:
    rng = np.random.default_rng(seed)
    w_RD = rng.multinomial(D, np.full(D, 1.0 / D), size=num_bootstrap).astype(np.float64)
    boot_R4 = (w_RD @ sums_D4) / np.maximum(w_RD @ counts_D, 1.0)[:, None]
    boot_R = 100.0 * np.prod(np.maximum(boot_R4, 0.0), axis=1) ** (1.0 / NGRAMS)
  score_se = ci = None
  if score > 0:  # delta method: d BrierLM / d b_n = BrierLM / (4 b_n) where all b_n > 0
    grad_4 = score / (NGRAMS * mean_4)
    score_se = float(np.sqrt(max(grad_4 @ cov_44 @ grad_4, 0.0)))
  elif boot_R is not None:  # BrierLM = 0 (some Brier-n <= 0) has no derivative
    score_se = float(np.std(boot_R, ddof=1))
  if boot_R is not None:
    ci = [float(v) for v in np.percentile(boot_R, [2.5, 97.5])]
  elif score_se is not None:
    ci = [score - 1.96 * score_se, score + 1.96 * score_se]
  return {
      "brier": [float(v) for v in mean_4],
      "brier_se": [float(v) for v in se_4],
      "brierlm": score,
      "brierlm_se": score_se,
      "brierlm_ci95": ci,
      "positions": int(total),
      "documents": D,
  }
