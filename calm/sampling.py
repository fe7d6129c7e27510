"""How the next chunk (CALM) or token (AR baseline) is chosen, row by row.

Every function takes one PRNG key or one key per batch row; with row keys, row b's choice
depends on its key and its own inputs only (not on the batch size or the other rows), which is
what lets the generation engine (`calm.engine`) batch prompts without changing any of them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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
  logits = logits_BV.astype(jnp.float32) / temperature
  if top_k > 0:
    kth_B1 = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth_B1, -jnp.inf, logits)
  if nucleus if nucleus is not None else top_p < 1.0:
    sorted_BV = jnp.sort(logits, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    keep_BV = (cum_BV - jax.nn.softmax(sorted_BV, axis=-1)) < top_p
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff_B1, -jnp.inf, logits)
  return categorical(key, logits)
