"""Likelihood-free temperature sampling: draw chunks ∝ P(x)^{1/T} from a sampler of P alone.

CALM cannot evaluate P(x) for a K-token chunk x; it can only draw from it (head sample → AE
decode → argmax). Both samplers here use nothing but draws.

- `exact_sample`: the paper's rejection scheme, exact for any T ∈ (0, 1], variable cost.
- `batch_sample`: the reference's approximate scheme from N fixed candidates, fixed cost.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from calm.config import validate_temperature
from calm.rng import is_key_batch
from calm.errors import CalmError

DrawFn = Callable[[jax.Array, int], jax.Array]  # (key, R) -> chunks_BRK int32, R i.i.d. draws per row


def fold_keys(key: jax.Array, i) -> jax.Array:
  """fold_in(key, i), key by key for a batch of keys."""
  if is_key_batch(key):
    return jax.vmap(lambda k: jax.random.fold_in(k, i))(key)
  return jax.random.fold_in(key, i)


def split_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Two independent keys (two batches of row keys for a batch of keys)."""
  if is_key_batch(key):
    both = jax.vmap(jax.random.split)(key)
    return both[:, 0], both[:, 1]
  a, b = jax.random.split(key)
  return a, b


def _uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniforms of `shape` [B, ...]; with a batch of keys, row b's from key b."""
  if is_key_batch(key):
    return jax.vmap(lambda k: jax.random.uniform(k, shape[1:]))(key)
  return jax.random.uniform(key, shape)


def split_inverse_temperature(temperature: float) -> tuple[int, float]:
  """1/T = n + α with integer n ≥ 1 and α ∈ [0, 1); 1/T within 1e-9 of an integer snaps to it."""
  inv = 1.0 / validate_temperature(temperature)
  r = round(inv)
  if abs(inv - r) < 1e-9:
    return int(r), 0.0
  n = math.floor(inv)
  return int(n), float(inv - n)


# ----------------------------------------------------------------------------- exact sampler

# Per-row phases of the exact sampler's state machine.
_AGREE, _FACTORY, _DONE = 0, 1, 2


# Cap on the default draws per iteration: each draw of a flow or diffusion head runs its whole
# ODE / denoising chain, so a block of ⌈1/T⌉ draws would make memory grow with 1/T.
MAX_DEFAULT_DRAWS_PER_STEP = 8


def default_draws_per_step(temperature: float) -> int:
  """⌈1/T⌉ (the fewest draws any chunk can take at temperature T), at most 8."""
  n, alpha = split_inverse_temperature(temperature)
  return min(n + (alpha > 0.0), MAX_DEFAULT_DRAWS_PER_STEP)


def exact_sample(draw_fn: DrawFn, key: jax.Array, temperature: float, max_attempts: int,
                 draws_per_step: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws one chunk per row exactly ∝ P(x)^{1/T} using only i.i.d. draws from P.

  With 1/T = n + α: collect n identical draws x (a mismatch restarts with fresh draws), then a
  Bernoulli factory for P(x)^α: for k = 1, 2, …: draw y; y == x accepts x; else restart with
  probability α/k, otherwise continue. A round accepts x with probability P(x)^n · P(x)^α.

  All rows advance in lock-step. Each loop iteration makes one `draw_fn` call of R =
  `draws_per_step` draws per row and feeds them to every unfinished row in order; draws left
  over when a row finishes are never looked at, so the result stays exact for any R. R > 1
  trades wasted draws for fewer iterations (at batch 1 on a CPU the decode's cost barely
  grows with R); the R draws are consumed in a `lax.scan`, so compile time does not grow with
  R (the memory of a block of draws does). A row that consumes `max_attempts` draws without
  accepting returns a fallback and ok=False: the last candidate that reached n-fold agreement
  if it had one (a draw ∝ P^n, already sharpened), else its first draw (a plain T=1 sample).

  Args:
    draw_fn: (key, R) -> chunks_BRK int32, i.i.d. draws from P, R per row.
    key: PRNG key, or one key per row (then `draw_fn` receives one key per row and row b's
      draws and coins come from its own key only: its result does not depend on the others).
    temperature: Python float in (0, 1]; static (n and α are derived from it).
    max_attempts: cap on draws consumed per row (static).
    draws_per_step: R, draws per row per loop iteration (static).

  Returns:
    (chunk_BK, ok_B, attempts_B): the samples, whether each was accepted before the cap, and the
    number of draws each row consumed.
  """
  n, alpha = split_inverse_temperature(temperature)
  if max_attempts < 1 or draws_per_step < 1:
    raise CalmError(f"max_attempts and draws_per_step must be >= 1, got {max_attempts}, "
                    f"{draws_per_step}")
  if n == 1 and alpha == 0.0:  # T = 1: one draw is exact
    draw_key, _ = split_keys(key)
    first_BK = draw_fn(fold_keys(draw_key, 0), 1)[:, 0]
    B = first_BK.shape[0]
    return first_BK, jnp.ones((B,), bool), jnp.ones((B,), jnp.int32)
  return exact_sample_rows(draw_fn, key, n, alpha, max_attempts, draws_per_step)


def exact_sample_rows(draw_fn: DrawFn, key: jax.Array, n: int | jax.Array,
                      alpha: float | jax.Array, max_attempts: int, draws_per_step: int = 1,
                      active_B: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`exact_sample` with 1/T = n + α given per row (`n` int32 [B], `alpha` float32 [B], or
  scalars; from `split_inverse_temperature`), so one compiled sampler serves rows at different
  temperatures. Rows outside `active_B` draw nothing (they return draw 0 and 0 attempts). A row
  gets exactly what `exact_sample` gives it at its temperature (same key, same R)."""
  draw_key, coin_key = split_keys(key)
  R = draws_per_step
  first_BRK = draw_fn(fold_keys(draw_key, 0), R)
  B = first_BRK.shape[0]
  alpha_B = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), (B,))
  n_B = jnp.broadcast_to(jnp.asarray(n, jnp.int32), (B,))

  def update(state, y_BK, u_B):
    phase_B, x_BK, agree_B, k_B, fallback_BK, attempts_B = state
    active_B = (phase_B != _DONE) & (attempts_B < max_attempts)
    attempts_B = attempts_B + active_B.astype(jnp.int32)
    match_B = jnp.all(y_BK == x_BK, axis=-1)
    # Agreement phase: agree_B counts identical draws so far (0 = no candidate yet).
    in_agree_B = active_B & (phase_B == _AGREE)
    # A mismatching draw is discarded, not reused: conditioned on y != x it is not a draw from P.
    start_B = in_agree_B & (agree_B == 0)
    x_BK = jnp.where(start_B[:, None], y_BK, x_BK)
    agree_B = jnp.where(in_agree_B,
                        jnp.where(start_B, 1, jnp.where(match_B, agree_B + 1, 0)), agree_B)
    reached_B = in_agree_B & (agree_B >= n_B)
    fallback_BK = jnp.where(reached_B[:, None], x_BK, fallback_BK)
    # Bernoulli factory for P(x)^α; k_B is the factory's step index.
    in_factory_B = active_B & (phase_B == _FACTORY)
    accept_B = in_factory_B & match_B
    reject_B = in_factory_B & ~match_B & (u_B < alpha_B / jnp.maximum(k_B, 1).astype(u_B.dtype))
    k_B = jnp.where(in_factory_B, k_B + 1, jnp.where(reached_B, 1, k_B))
    done_B = accept_B | (reached_B & (alpha_B == 0.0))
    phase_B = jnp.where(done_B, _DONE,
                        jnp.where(reject_B, _AGREE,
                                  jnp.where(reached_B, _FACTORY, phase_B)))
    agree_B = jnp.where(reject_B, 0, agree_B)
    return phase_B, x_BK, agree_B, k_B, fallback_BK, attempts_B

  def consume(state, it, y_BRK):
    u_BR = _uniform(fold_keys(coin_key, it), (B, R))
    # the R draws one after another in a loop, so the program does not grow with R
    step = lambda state, y_u: (update(state, *y_u), None)
    return jax.lax.scan(step, state, (jnp.moveaxis(y_BRK, 1, 0), u_BR.T))[0]

  zeros_B = jnp.zeros((B,), jnp.int32)
  phase0_B = zeros_B + _AGREE if active_B is None else jnp.where(active_B, _AGREE, _DONE)
  state = consume((phase0_B, first_BRK[:, 0], zeros_B, zeros_B, first_BRK[:, 0], zeros_B),
                  0, first_BRK)

  def unfinished(state):
    return (state[0] != _DONE) & (state[5] < max_attempts)

  def cond(carry):
    it, state = carry
    return jnp.any(unfinished(state))

  def body(carry):
    it, state = carry
    return it + 1, consume(state, it, draw_fn(fold_keys(draw_key, it), R))

  _, state = jax.lax.while_loop(cond, body, (jnp.int32(1), state))
  phase_B, x_BK, _, _, fallback_BK, attempts_B = state
  ok_B = phase_B == _DONE
  return jnp.where(ok_B[:, None], x_BK, fallback_BK), ok_B, attempts_B


# ----------------------------------------------------------------------------- batch sampler


def chunk_counts(candidates_BNK: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Multiplicity of each candidate within its row, and a mask of one representative per value.

  Sort-based (O(N log N) per row): rows are sorted lexicographically over the K tokens, runs of
  equal chunks are delimited, and each candidate gets its run's length.

  Returns:
    (count_BN int32, is_rep_BN bool) in the candidates' original order.
  """
  B, N, K = candidates_BNK.shape
  iota_BN = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N))
  cols = tuple(candidates_BNK[..., k] for k in range(K))
  *sorted_cols, order_BN = jax.lax.sort(cols + (iota_BN,), dimension=1, num_keys=K)
  sorted_BNK = jnp.stack(sorted_cols, axis=-1)
  new_BN = jnp.concatenate(
      [jnp.ones((B, 1), bool), jnp.any(sorted_BNK[:, 1:] != sorted_BNK[:, :-1], axis=-1)], axis=1)
  last_BN = jnp.concatenate([new_BN[:, 1:], jnp.ones((B, 1), bool)], axis=1)
  start_BN = jax.lax.cummax(jnp.where(new_BN, iota_BN, 0), axis=1)
  end_BN = jax.lax.cummin(jnp.where(last_BN, iota_BN, N - 1), axis=1, reverse=True)
  count_sorted_BN = end_BN - start_BN + 1
  rows_B1 = jnp.arange(B)[:, None]
  count_BN = jnp.zeros((B, N), jnp.int32).at[rows_B1, order_BN].set(count_sorted_BN)
  is_rep_BN = jnp.zeros((B, N), bool).at[rows_B1, order_BN].set(new_BN)
  return count_BN, is_rep_BN


def batch_log_weights(candidates_BNK: jax.Array, temperature: float) -> jax.Array:
  """Log selection weight of each distinct candidate chunk (−inf on duplicates), see below.

  With s = 1/T and c a chunk's count among the N candidates, the weight is the (generalised)
  binomial coefficient C(c, e) = Γ(c+1) / (Γ(e+1) Γ(c−e+1)) with e = min(s, c_max):
  - integer s: E[C(c, s)] = C(N, s) P(x)^s, so the weights are unbiased for P^s up to a common
    factor (the reference's rule);
  - fractional s = n + α: C(c, s) ~ c^s / Γ(s+1) as c grows with c/N → P(x), so the weights are
    ∝ P(x)^s (1 + O(1/(N P(x)))) — consistent as N → ∞, exact at α = 0. Only chunks with
    c ≥ ⌊e⌋ are eligible (there the coefficient is positive);
  - if no chunk reaches s (c_max < s), e = c_max: uniform over the most frequent chunks, which is
    exactly the reference's fall-back "for n = 1/T down to 1, use chunks seen ≥ n times".
  The normalised selection is a ratio of estimates, hence slightly biased at finite N; the bias
  vanishes as N grows.
  """
  return batch_log_weights_rows(candidates_BNK, 1.0 / validate_temperature(temperature))


def batch_log_weights_rows(candidates_BNK: jax.Array, inverse_temperature: float | jax.Array
                           ) -> jax.Array:
  """`batch_log_weights` with s = 1/T per row (float32 [B] or a scalar). s = inf (T → 0) is
  uniform over each row's most frequent chunks: the mode of the N candidates."""
  count_BN, is_rep_BN = chunk_counts(candidates_BNK)
  c_BN = count_BN.astype(jnp.float32)
  cmax_B1 = jnp.max(c_BN, axis=1, keepdims=True)
  s_B1 = jnp.reshape(jnp.broadcast_to(jnp.asarray(inverse_temperature, jnp.float32),
                                      c_BN.shape[:1]), (-1, 1))
  e_B1 = jnp.minimum(s_B1, cmax_B1)
  eligible_BN = is_rep_BN & (c_BN >= jnp.floor(e_B1))
  safe_BN = jnp.where(eligible_BN, c_BN - e_B1 + 1.0, 1.0)
  logw_BN = jax.lax.lgamma(c_BN + 1.0) - jax.lax.lgamma(e_B1 + 1.0) - jax.lax.lgamma(safe_BN)
  return jnp.where(eligible_BN, logw_BN, -jnp.inf)


def batch_sample(candidates_BNK: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
  """Picks one chunk per row from N candidates (i.i.d. from P) approximately ∝ P(x)^{1/T}.

  Each distinct chunk (not each duplicate) is chosen with probability ∝ its weight from
  `batch_log_weights`. T = 1 returns the first candidate (already an exact draw). `key`: one
  key, or one per row.
  """
  if validate_temperature(temperature) == 1.0:
    return candidates_BNK[:, 0]
  return batch_pick(candidates_BNK, key, batch_log_weights(candidates_BNK, temperature))


def batch_pick(candidates_BNK: jax.Array, key: jax.Array, logw_BN: jax.Array) -> jax.Array:
  """One candidate per row ∝ exp(logw) (`key`: one key, or one per row)."""
  if is_key_batch(key):
    idx_B = jax.vmap(lambda k, lw: jax.random.categorical(k, lw))(key, logw_BN)
  else:
    idx_B = jax.random.categorical(key, logw_BN, axis=-1)
  return jnp.take_along_axis(candidates_BNK, idx_B[:, None, None], axis=1)[:, 0]
