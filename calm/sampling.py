"""Batched generation with a KV cache for CALM (chunk by chunk) and the AR baseline (token by token).

Prompts of any length: a CALM prompt is LEFT-padded with the pad id to a multiple of K, so its
last chunk is complete and generation continues right after the real text (the reference
right-pads, which puts pad tokens between the prompt and the continuation). Rows of different
lengths share one batch: they are stored left-aligned, right-padded to the longest, and each
row's cache length is set to its own length after the prefill (padding slots are overwritten
before any query can see them). Each (batch, prompt length, max length, sampler) compiles once;
the decode loop is a `lax.while_loop` over fixed-shape buffers that stops when every row has
produced EOS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calm import temperature as temp_lib
from calm.errors import CalmError
from calm.models.transformer import KVCache


@dataclasses.dataclass(frozen=True)
class ChunkSampler:
  """How CALM picks each next chunk: T = 1 one head sample; T < 1 `exact` or `batch`."""

  temperature: float = 1.0
  kind: str = "exact"  # "exact" | "batch"
  num_candidates: int = 200
  max_attempts: int = 1000
  draws_per_step: int = 0  # exact sampler: draws per row per loop iteration; 0 = ⌈1/T⌉

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

  Row b's randomness comes from fold_in(key, b), so a row's draws do not depend on the batch
  size. Any head: only `calm.draw` differs.
  """
  return ae.decode_ids(calm.draw(h_BD, key, num))


def next_chunk(calm, ae, h_BD: jax.Array, key: jax.Array,
               sampler: ChunkSampler) -> tuple[jax.Array, jax.Array]:
  """One chunk per row ∝ P(x)^{1/T} → (chunk_BK, draws_B); draws = candidates used per row."""
  B = h_BD.shape[0]
  if sampler.temperature == 1.0:
    return decode_candidates(calm, ae, h_BD, key, 1)[:, 0], jnp.ones((B,), jnp.int32)
  if sampler.kind == "batch":
    ck, sk = jax.random.split(key)
    cand_BNK = decode_candidates(calm, ae, h_BD, ck, sampler.num_candidates)
    draws_B = jnp.full((B,), sampler.num_candidates, jnp.int32)
    return temp_lib.batch_sample(cand_BNK, sk, sampler.temperature), draws_B
  draw = lambda k, num: decode_candidates(calm, ae, h_BD, k, num)
  chunk_BK, ok_B, draws_B = temp_lib.exact_sample(draw, key, sampler.temperature,
                                                  sampler.max_attempts, sampler.draws_per_iteration)
  return chunk_BK, jnp.where(ok_B, draws_B, -draws_B)  # negative: hit the cap


class _Stream:
  """The host callback of the generation running now. The jitted loops call `emit(i, ids)` (a
  fixed function, so a new callback does not recompile); `to(fn)` installs `fn` for one call.
  The device callback is unordered (ordered effects do not run on several devices), so steps
  that arrive early wait here and `fn` sees them in step order."""

  fn: Callable[[np.ndarray], None] | None = None
  _next: int = 0
  _early: dict[int, np.ndarray] = {}

  @classmethod
  def emit(cls, i: np.ndarray, ids: np.ndarray) -> None:
    if cls.fn is None:
      return
    cls._early[int(i)] = np.asarray(ids)
    while cls._next in cls._early:
      cls.fn(cls._early.pop(cls._next))
      cls._next += 1

  @classmethod
  @contextlib.contextmanager
  def to(cls, fn: Callable[[np.ndarray], None] | None):
    cls.fn, cls._next, cls._early = fn, 0, {}
    try:
      yield
      if fn is not None:
        jax.effects_barrier()  # every streamed step delivered before the stream closes
    finally:
      cls.fn = None


def _ragged(rows: Sequence[Sequence[int]], pad_id: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads each row to a multiple of `multiple`, right-pads to the longest → (ids, lengths)."""
  if not rows or any(len(r) == 0 for r in rows):
    raise CalmError("every prompt needs at least one token")
  padded = [[pad_id] * (-len(r) % multiple) + list(r) for r in rows]
  lens = np.array([len(r) for r in padded], np.int32)
  out = np.full((len(rows), int(lens.max())), pad_id, np.int32)
  for i, r in enumerate(padded):
    out[i, :len(r)] = r
  return out, lens


@functools.partial(jax.jit, static_argnames=("calm_def", "ae_def", "max_chunks", "sampler",
                                             "eos_id", "pad_id", "stream"))
def _calm_generate(calm_def, calm_state, ae_def, ae_state, prompt_BSK, chunks_B, key, *,
                   max_chunks: int, sampler: ChunkSampler, eos_id: int, pad_id: int,
                   stream: bool = False):
  calm, ae = nnx.merge(calm_def, calm_state), nnx.merge(ae_def, ae_state)
  B, S, K = prompt_BSK.shape
  cache = calm.init_cache(B, S + max_chunks)
  h_BSD, cache = calm.hidden(prompt_BSK, cache=cache)
  cache = KVCache(cache.k, cache.v, chunks_B)
  h_BD = h_BSD[jnp.arange(B), chunks_B - 1]
  out_BJK = jnp.full((B, max_chunks, K), pad_id, jnp.int32)

  def cond(c):
    i, _, _, _, done_B, _ = c
    return (i < max_chunks) & ~jnp.all(done_B)

  def body(c):
    i, h_BD, cache, out_BJK, done_B, draws_BJ = c
    chunk_BK, draws_B = next_chunk(calm, ae, h_BD, jax.random.fold_in(key, i), sampler)
    chunk_BK = jnp.where(done_B[:, None], pad_id, chunk_BK)
    out_BJK = out_BJK.at[:, i].set(chunk_BK)
    draws_BJ = draws_BJ.at[:, i].set(jnp.where(done_B, 0, draws_B))
    if stream:  # hand each new chunk to the host as it is produced
      jax.debug.callback(_Stream.emit, i, chunk_BK)
    done_B = done_B | jnp.any(chunk_BK == eos_id, axis=-1)
    h_B1D, cache = calm.hidden(chunk_BK[:, None], cache=cache)
    return i + 1, h_B1D[:, 0], cache, out_BJK, done_B, draws_BJ

  init = (jnp.int32(0), h_BD, cache, out_BJK, jnp.zeros((B,), bool),
          jnp.zeros((B, max_chunks), jnp.int32))
  _, _, _, out_BJK, _, draws_BJ = jax.lax.while_loop(cond, body, init)
  return out_BJK, draws_BJ


def _trim(ids: np.ndarray, eos_id: int) -> list[int]:
  """Tokens up to and including the first EOS."""
  hits = np.flatnonzero(ids == eos_id)
  return ids[:hits[0] + 1].tolist() if hits.size else ids.tolist()


def generate_calm(calm, ae, prompts: Sequence[Sequence[int]], key: jax.Array, *,
                  max_new_tokens: int, sampler: ChunkSampler = ChunkSampler(), eos_id: int,
                  pad_id: int, on_tokens: Callable[[np.ndarray], None] | None = None
                  ) -> tuple[list[list[int]], dict]:
  """Continues each prompt (token ids) with CALM → (new tokens per row up to EOS, stats).

  `on_tokens(ids_BK)`, if given, receives every generated chunk on the host as it is produced.

  stats: draws per generated chunk (`mean_draws`) and the number of chunks whose exact sampler
  hit `max_attempts` (`capped`, returned as its fallback).
  """
  K = calm.chunk_size
  ids, lens = _ragged(prompts, pad_id, K)
  prompt_BSK = jnp.asarray(ids.reshape(len(prompts), -1, K))
  max_chunks = -(-max_new_tokens // K)
  calm_def, calm_state = nnx.split(calm)
  ae_def, ae_state = nnx.split(ae)
  with _Stream.to(on_tokens):
    out_BJK, draws_BJ = _calm_generate(
        calm_def, calm_state, ae_def, ae_state, prompt_BSK, jnp.asarray(lens // K), key,
        max_chunks=max_chunks, sampler=sampler, eos_id=eos_id, pad_id=pad_id,
        stream=on_tokens is not None)
    out = np.asarray(out_BJK).reshape(len(prompts), -1)
    draws = np.asarray(draws_BJ)
  used = draws != 0
  stats = {"mean_draws": float(np.abs(draws[used]).mean()) if used.any() else 0.0,
           "capped": int((draws < 0).sum()), "chunks": int(used.sum())}
  return [_trim(r, eos_id)[:max_new_tokens] for r in out], stats


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

  Two-level inverse CDF: a block of 256 vocabulary entries by its mass, then an entry within the
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
  u_B2 = jax.random.uniform(key, (B, 2))
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


@functools.partial(jax.jit, static_argnames=("model_def", "max_new", "top_k", "nucleus",
                                             "eos_id", "pad_id", "stream"))
def _ar_generate(model_def, state, prompt_BT, lens_B, key, temperature, top_p, *, max_new: int,
                 top_k: int, nucleus: bool, eos_id: int, pad_id: int, stream: bool = False):
  model = nnx.merge(model_def, state)
  B, T = prompt_BT.shape
  cache = model.init_cache(B, T + max_new)
  logits_BTV, cache = model(prompt_BT, cache=cache)
  cache = KVCache(cache.k, cache.v, lens_B)
  logits_BV = logits_BTV[jnp.arange(B), lens_B - 1]
  out_BJ = jnp.full((B, max_new), pad_id, jnp.int32)

  def cond(c):
    return (c[0] < max_new) & ~jnp.all(c[4])

  def body(c):
    i, logits_BV, cache, out_BJ, done_B = c
    tok_B = sample_logits(logits_BV, jax.random.fold_in(key, i), temperature, top_k, top_p,
                          nucleus)
    tok_B = jnp.where(done_B, pad_id, tok_B)
    out_BJ = out_BJ.at[:, i].set(tok_B)
    if stream:
      jax.debug.callback(_Stream.emit, i, tok_B[:, None])
    done_B = done_B | (tok_B == eos_id)
    logits_B1V, cache = model(tok_B[:, None], cache=cache)
    return i + 1, logits_B1V[:, 0], cache, out_BJ, done_B

  init = (jnp.int32(0), logits_BV, cache, out_BJ, jnp.zeros((B,), bool))
  return jax.lax.while_loop(cond, body, init)[3]


def generate_ar(model, prompts: Sequence[Sequence[int]], key: jax.Array, *, max_new_tokens: int,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int,
                pad_id: int, on_tokens: Callable[[np.ndarray], None] | None = None
                ) -> list[list[int]]:
  """Continues each prompt token by token → new tokens per row up to EOS (`on_tokens(ids_B1)`
  receives each step's tokens on the host as they are produced). One compilation serves every
  temperature and every top-p < 1."""
  if not (temperature > 0 and 0.0 < top_p <= 1.0 and top_k >= 0):
    raise CalmError("need temperature > 0, top_p in (0, 1], top_k >= 0")
  ids, lens = _ragged(prompts, pad_id, 1)
  model_def, state = nnx.split(model)
  with _Stream.to(on_tokens):
    out = _ar_generate(model_def, state, jnp.asarray(ids), jnp.asarray(lens), key,
                       jnp.float32(temperature), jnp.float32(top_p), max_new=max_new_tokens,
                       top_k=int(top_k), nucleus=bool(top_p < 1.0), eos_id=eos_id,
                       pad_id=pad_id, stream=on_tokens is not None)
    out = np.asarray(out)
  return [_trim(r, eos_id) for r in out]
