"""How the next chunk (CALM) or token (AR baseline) is chosen, row by row.

Every function takes one PRNG key or one key per batch row; with row keys, row b's choice
depends on its key and its own inputs only (not on the batch size or the other rows), which is
what lets the generation engine (`calm.engine`) batch prompts without changing any of them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from calm import temperature as temp_lib
from calm.errors import CalmError
from calm.rng import is_key_batch


@dataclasses.dataclass(frozen=True)
class ChunkSampler:
  """How CALM picks each next chunk: T = 1 one head sample; T < 1 `exact` or `batch`."""

  temperature: float = 1.0
  kind: str = "exact"  # "exact" | "batch"
  num_candidates: int = 200
  max_attempts: int = 1000
  draws_per_step: int = 0  # exact sampler: draws per row per loop iteration; 0 = min(⌈1/T⌉, 8)

  def __post_init__(self):
    temp_lib.validate_temperature(self.temperature)
    if self.kind not in ("exact", "batch"):
      raise CalmError(f"sampler must be exact or batch, got {self.kind!r}")
    if self.num_candidates < 1 or self.max_attempts < 1 or self.draws_per_step < 0:
      raise CalmError("num_candidates and max_attempts must be >= 1, draws_per_step >= 0")

  @property
  def draws_per_iteration(self) -> int:
    return self.draws_per_step or temp_lib.default_draws_per_step(self.temperature)


def decode_candidates(calm, ae, h_BD: jax.Array, key: jax.Array, num: int) -> jax.Array:
  """`num` chunks per row: head samples decoded by the AE with argmax → int32 [B, num, K].

  Row b's randomness comes from its row key (`key[b]`, or fold_in(key, b) for one key), so a
  row's draws do not depend on the batch size. Any head: only `calm.draw` differs.
  """
  return ae.decode_ids(calm.draw(h_BD, key, num))


def next_chunk(calm, ae, h_BD: jax.Array, key: jax.Array,
               sampler: ChunkSampler) -> tuple[jax.Array, jax.Array]:
  """One chunk per row ∝ P(x)^{1/T} → (chunk_BK, draws_B); draws = candidates used per row."""
  B = h_BD.shape[0]
  if sampler.temperature == 1.0:
    return decode_candidates(calm, ae, h_BD, key, 1)[:, 0], jnp.ones((B,), jnp.int32)
  if sampler.kind == "batch":
    ck, sk = temp_lib.split_keys(key)
    cand_BNK = decode_candidates(calm, ae, h_BD, ck, sampler.num_candidates)
    draws_B = jnp.full((B,), sampler.num_candidates, jnp.int32)
    return temp_lib.batch_sample(cand_BNK, sk, sampler.temperature), draws_B
  draw = lambda k, num: decode_candidates(calm, ae, h_BD, k, num)
  chunk_BK, ok_B, draws_B = temp_lib.exact_sample(draw, key, sampler.temperature,
                                                  sampler.max_attempts, sampler.draws_per_iteration)
  return chunk_BK, jnp.where(ok_B, draws_B, -draws_B)  # negative: hit the cap


# ----------------------------------------------------------------------------- AR baseline


_ICDF_BLOCK = 256


def _inverse_cdf(w_BN: jax.Array, u_B: jax.Array) -> jax.Array:
  """Index i per row with probability w_i / Σw (w ≥ 0, Σw > 0), from one uniform u per row."""
  c_BN = jnp.cumsum(w_BN, axis=-1)
  i_B = jnp.sum(c_BN <= u_B[:, None] * c_BN[:, -1:], axis=-1)
  # u·Σw rounding up to Σw would step past the end: fall back to the last positive entry
  last_B = w_BN.shape[-1] - 1 - jnp.argmax((w_BN > 0)[:, ::-1], axis=-1)
  return jnp.minimum(i_B, last_B).astype(jnp.int32)


def categorical(key: jax.Array, logits_BV: jax.Array) -> jax.Array:
  """One token per row ∝ softmax(logits) (−inf excluded) → int32 [B].

  `key`: one key, or one per row. Two-level inverse CDF: a block of 256 vocabulary entries by its mass, then an entry within the
  block. Two uniforms per row instead of `jax.random.categorical`'s Gumbel noise on every entry
  (about 5× cheaper on a CPU at V = 32000); cumulative sums over at most V/256 and 256 terms
  keep float32 rounding around 1e-6 of a block's mass, not of the whole distribution's.
  (O: blocks, I: entries within a block.)
  """
  B, V = logits_BV.shape
  nb = -(-V // _ICDF_BLOCK)
  logits = logits_BV.astype(jnp.float32)
  p_BV = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  p_BOI = jnp.pad(p_BV, ((0, 0), (0, nb * _ICDF_BLOCK - V))).reshape(B, nb, _ICDF_BLOCK)
  u_B2 = (jax.vmap(lambda k: jax.random.uniform(k, (2,)))(key) if is_key_batch(key)
          else jax.random.uniform(key, (B, 2)))
  block_B = _inverse_cdf(p_BOI.sum(axis=-1), u_B2[:, 0])
  inner_BI = jnp.take_along_axis(p_BOI, block_B[:, None, None], axis=1)[:, 0]
  return block_B * _ICDF_BLOCK + _inverse_cdf(inner_BI, u_B2[:, 1])


def sample_logits(logits_BV: jax.Array, key: jax.Array, temperature: float | jax.Array = 1.0,
                  top_k: int = 0, top_p: float | jax.Array = 1.0,
                  nucleus: bool | None = None) -> jax.Array:
  """Temperature, then top-k (0 = off), then nucleus top-p → token ids [B].

  `temperature` and `top_p` may be traced; `top_k` fixes a shape and `nucleus` (default
  `top_p < 1`, needed when `top_p` is traced) whether the sort runs, so both are static.
  """
  logits = _top_k(logits_BV.astype(jnp.float32) / temperature, top_k)
  if nucleus if nucleus is not None else top_p < 1.0:
    logits = _nucleus(logits, top_p)
  return categorical(key, logits)


def _top_k(logits_BV: jax.Array, top_k: int) -> jax.Array:
  if top_k <= 0:
    return logits_BV
  kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
  return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def _nucleus(logits_BV: jax.Array, top_p: float | jax.Array) -> jax.Array:
  """Keeps the smallest prefix of tokens by probability whose mass reaches top_p (the first
  token always stays); `top_p` a scalar or [B, 1] (a row with top_p >= 1 keeps everything)."""
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  p_BV = jax.nn.softmax(sorted_BV, axis=-1)
  keep_BV = ((jnp.cumsum(p_BV, axis=-1) - p_BV) < top_p) | (top_p >= 1.0)
  cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)


# ----------------------------------------------------------------------------- rows that differ

# How a row of a `ChunkRows` batch picks its chunk.
ONE_DRAW, EXACT, BATCH = 0, 1, 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ChunkRows:
  """Per-row CALM sampler settings, for rows that differ in temperature and sampler (a server's
  decode slots), as arrays so one compiled step serves them all: `mode_B` (ONE_DRAW: T = 1,
  EXACT, BATCH), `n_B` + `alpha_B` (exact: 1/T = n + α), `inv_B` (batch: 1/T; inf = the most
  frequent of the candidates, what T = 0 means for CALM), `live_B` (rows that draw at all)."""

  mode_B: jax.Array
  n_B: jax.Array
  alpha_B: jax.Array
  inv_B: jax.Array
  live_B: jax.Array

  @staticmethod
  def build(rows: list[tuple[float, str] | None]) -> ChunkRows:
    """From (temperature, "exact" | "batch") per row (None: an empty row); T = 0 → batch
    sampler's limit (the mode of the candidates)."""
    mode, n, alpha, inv, live = [], [], [], [], []
    for r in rows:
      T, kind = r if r is not None else (1.0, "exact")
      if T == 0.0:
        m, ni, a, s = BATCH, 1, 0.0, float("inf")
      else:
        ni, a = temp_lib.split_inverse_temperature(T)
        m, s = (ONE_DRAW if T == 1.0 else EXACT if kind == "exact" else BATCH), 1.0 / T
      mode.append(m), n.append(ni), alpha.append(a), inv.append(s), live.append(r is not None)
    # one transfer from numpy (jnp.asarray of a list dispatches per element)
    return ChunkRows(*jax.device_put((
        np.asarray(mode, np.int32), np.asarray(n, np.int32), np.asarray(alpha, np.float32),
        np.asarray(inv, np.float32), np.asarray(live, bool))))


def next_chunk_rows(calm, ae, h_BD: jax.Array, key_B: jax.Array, rows: ChunkRows, *,
                    num_candidates: int, max_attempts: int, draws_per_step: int
                    ) -> tuple[jax.Array, jax.Array]:
  """One chunk per row at each row's own settings → (chunk_BK, draws_B; 0 for rows not live).

  Row b gets what `next_chunk` gives it with its temperature and sampler (same row key, same
  `num_candidates`, `max_attempts` and `draws_per_step`). A sampler no live row uses is skipped.
  """
  B = h_BD.shape[0]
  zeros_BK = jnp.zeros((B, ae.chunk_size), jnp.int32)
  zeros_B = jnp.zeros((B,), jnp.int32)
  use_B = [rows.live_B & (rows.mode_B == m) for m in (ONE_DRAW, EXACT, BATCH)]

  def one():
    return decode_candidates(calm, ae, h_BD, key_B, 1)[:, 0], jnp.ones((B,), jnp.int32)

  def exact():
    draw = lambda k, num: decode_candidates(calm, ae, h_BD, k, num)
    chunk_BK, ok_B, draws_B = temp_lib.exact_sample_rows(
        draw, key_B, rows.n_B, rows.alpha_B, max_attempts, draws_per_step, active_B=use_B[1])
    return chunk_BK, jnp.where(ok_B, draws_B, -draws_B)

  def batch():
    ck, sk = temp_lib.split_keys(key_B)
    cand_BNK = decode_candidates(calm, ae, h_BD, ck, num_candidates)
    logw_BN = temp_lib.batch_log_weights_rows(cand_BNK, rows.inv_B)
    return temp_lib.batch_pick(cand_BNK, sk, logw_BN), jnp.full((B,), num_candidates, jnp.int32)

  chunk_BK, draws_B = zeros_BK, zeros_B
  for use, fn in zip(use_B, (one, exact, batch)):
    c_BK, d_B = jax.lax.cond(jnp.any(use), fn, lambda: (zeros_BK, zeros_B))
    chunk_BK = jnp.where(use[:, None], c_BK, chunk_BK)
    draws_B = jnp.where(use, d_B, draws_B)
  return chunk_BK, draws_B


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenRows:
  """Per-row AR sampler settings: `temperature_B` (0 = greedy: the most likely token),
  `top_p_B`, `live_B`."""

  temperature_B: jax.Array
  top_p_B: jax.Array
  live_B: jax.Array

  @staticmethod
  def build(rows: list[tuple[float, float] | None]) -> TokenRows:
    """From (temperature, top_p) per row (None: an empty row)."""
    t, p = zip(*[r if r is not None else (1.0, 1.0) for r in rows])
    return TokenRows(*jax.device_put((np.asarray(t, np.float32), np.asarray(p, np.float32),
                                      np.asarray([r is not None for r in rows], bool))))


def next_token_rows(logits_BV: jax.Array, key_B: jax.Array, rows: TokenRows, top_k: int = 0
                    ) -> jax.Array:
  """One token per row at its own temperature and top-p → int32 [B]; row b gets what
  `sample_logits` gives it with the same key (and the most likely token at temperature 0)."""
  greedy_B = rows.temperature_B == 0.0
  t_B1 = jnp.where(greedy_B, 1.0, rows.temperature_B)[:, None]
  logits = _top_k(logits_BV.astype(jnp.float32) / t_B1, top_k)
  top_p_B1 = rows.top_p_B[:, None]
  logits = jax.lax.cond(jnp.any(rows.live_B & (rows.top_p_B < 1.0)),
                        lambda: _nucleus(logits, top_p_B1), lambda: logits)
  tok_B = categorical(key_B, logits)
  return jnp.where(greedy_B, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), tok_B)
