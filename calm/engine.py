"""The generation engine: compiled prefill, one decode step over a fixed number of rows, and the
whole decode loop, for CALM (a chunk of K tokens per step) and the AR baseline (one token).

`calm.open(...).generate`, `calm-sample` and the benchmarks all generate through it. Every row
carries its own PRNG key and step counter: the key of row b at its step i is fold_in(key_b, i),
so a row's text depends on its prompt, its key and the sampler only — not on the batch size or
on the other rows. Prompts of any length share a batch: a CALM prompt is LEFT-padded with the pad
id to a multiple of K (its last chunk is complete and generation continues right after the real
text; the reference right-pads, which puts pads between prompt and continuation), rows are stored
left-aligned and right-padded to the longest, and each row's cache length is its own after the
prefill (padding slots are overwritten before any query sees them). The loop is a
`lax.while_loop` over fixed-shape buffers that stops when every row has produced EOS. Each
(batch, prompt length, max length, sampler) compiles once; AR temperature and top-p are traced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calm import sampling
from calm.errors import CalmError, SettingError
from calm.models.transformer import KVCache
from calm.sampling import ChunkSampler


@dataclasses.dataclass(frozen=True)
class TokenSampler:
  """How the AR baseline picks each next token: temperature, then top-k (0 = off), then top-p."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not (self.temperature > 0 and 0.0 < self.top_p <= 1.0 and self.top_k >= 0):
      raise CalmError("need temperature > 0, top_p in (0, 1], top_k >= 0")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """The rows being decoded: KV cache, what the next step reads (CALM: the hidden state of the
  last chunk [B, D]; AR: the logits of the next token [B, V]), row keys, steps taken, done."""

  cache: KVCache
  carry_BX: jax.Array
  keys_B: jax.Array
  step_B: jax.Array  # int32 [B]
  done_B: jax.Array  # bool [B]

  def step_keys(self) -> jax.Array:
    return jax.vmap(jax.random.fold_in)(self.keys_B, self.step_B)


@dataclasses.dataclass
class Generated:
  """New tokens per row (up to and including EOS, at most `max_new_tokens`), whether each row
  ended with EOS, and sampler statistics (CALM: mean draws per chunk, chunks that hit the exact
  sampler's cap)."""

  tokens: list[list[int]]
  finished: list[bool]
  stats: dict[str, float]


class _Stream:
  """The host callback of the generation running now. The jitted loops call `emit(i, ids)` (a
  fixed function, so a new callback does not recompile); `to(fn)` installs `fn` for one call.
  The device callback is unordered (ordered effects do not run on several devices), so steps
  that arrive early wait here and `fn` sees them in step order. One generation streams at a
  time in a process."""

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


def ragged(rows: Sequence[Sequence[int]], pad_id: int, multiple: int
           ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads each row to a multiple of `multiple`, right-pads to the longest → (ids, lengths)."""
  if not rows or any(len(r) == 0 for r in rows):
    raise CalmError("every prompt needs at least one token")
  padded = [[pad_id] * (-len(r) % multiple) + list(r) for r in rows]
  lens = np.array([len(r) for r in padded], np.int32)
  out = np.full((len(rows), int(lens.max())), pad_id, np.int32)
  for i, r in enumerate(padded):
    out[i, :len(r)] = r
  return out, lens


def trim(ids: np.ndarray, eos_id: int) -> list[int]:
  """Tokens up to and including the first EOS."""
  hits = np.flatnonzero(ids == eos_id)
  return ids[:hits[0] + 1].tolist() if hits.size else ids.tolist()


_keys_of_seeds = jax.jit(jax.vmap(jax.random.key))


def row_keys(seeds: Sequence[int] | jax.Array) -> jax.Array:
  """One PRNG key per row from integer seeds (compiled: an eager vmap traces on every call,
  milliseconds on a server's admission path)."""
  if not isinstance(seeds, jax.Array):
    seeds = np.asarray(list(seeds), np.uint32)
  return _keys_of_seeds(seeds.astype(jnp.uint32))


class GraphDef:
  """A module's graph definition as a static jit argument, hashed once (a GraphDef's own hash
  walks the whole graph: milliseconds on every call of a decode step)."""

  __slots__ = ("graphdef", "_hash")

  def __init__(self, graphdef):
    self.graphdef, self._hash = graphdef, hash(graphdef)

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    return self is other or (isinstance(other, GraphDef) and self._hash == other._hash
                             and self.graphdef == other.graphdef)

  def merge(self, state):
    return nnx.merge(self.graphdef, state)


# ----------------------------------------------------------------------------- CALM


def _calm_prefill(calm, prompt_BSK, chunks_B, keys_B, capacity: int) -> DecodeState:
  B = prompt_BSK.shape[0]
  cache = calm.init_cache(B, capacity)
  h_BSD, cache = calm.hidden(prompt_BSK, cache=cache)
  cache = KVCache(cache.k, cache.v, chunks_B)
  return DecodeState(cache, h_BSD[jnp.arange(B), chunks_B - 1], keys_B,
                     jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool))


def _calm_step(calm, ae, st: DecodeState, sampler: ChunkSampler, eos_id: int, pad_id: int
               ) -> tuple[DecodeState, jax.Array, jax.Array]:
  """One chunk for every row → (state, chunk_BK, draws_B); a done row yields pads, 0 draws."""
  choose = lambda h_BD, keys_B: sampling.next_chunk(calm, ae, h_BD, keys_B, sampler)
  return _calm_advance(calm, st, choose, eos_id, pad_id)


def _calm_advance(calm, st: DecodeState, choose, eos_id: int, pad_id: int
                  ) -> tuple[DecodeState, jax.Array, jax.Array]:
  """`_calm_step` with the chunk chosen by `choose(h_BD, step_keys_B) → (chunk_BK, draws_B)`."""
  chunk_BK, draws_B = choose(st.carry_BX, st.step_keys())
  chunk_BK = jnp.where(st.done_B[:, None], pad_id, chunk_BK)
  draws_B = jnp.where(st.done_B, 0, draws_B)
  done_B = st.done_B | jnp.any(chunk_BK == eos_id, axis=-1)
  h_B1D, cache = calm.hidden(chunk_BK[:, None], cache=st.cache)
  return DecodeState(cache, h_B1D[:, 0], st.keys_B, st.step_B + 1, done_B), chunk_BK, draws_B


_CALM_STATIC = ("calm_def", "ae_def", "sampler", "eos_id", "pad_id")


@functools.partial(jax.jit, static_argnames=("calm_def", "capacity"))
def _calm_prefill_jit(calm_def, calm_state, prompt_BSK, chunks_B, keys_B, *, capacity):
  return _calm_prefill(calm_def.merge(calm_state), prompt_BSK, chunks_B, keys_B, capacity)


@functools.partial(jax.jit, static_argnames=_CALM_STATIC)
def _calm_step_jit(calm_def, calm_state, ae_def, ae_state, st, *, sampler, eos_id, pad_id):
  return _calm_step(calm_def.merge(calm_state), ae_def.merge(ae_state), st, sampler,
                    eos_id, pad_id)


@functools.partial(jax.jit, static_argnames=_CALM_STATIC + ("max_chunks", "stream"))
def _calm_generate(calm_def, calm_state, ae_def, ae_state, prompt_BSK, chunks_B, keys_B, *,
                   max_chunks: int, sampler: ChunkSampler, eos_id: int, pad_id: int,
                   stream: bool = False):
  calm, ae = calm_def.merge(calm_state), ae_def.merge(ae_state)
  B, S, K = prompt_BSK.shape
  st = _calm_prefill(calm, prompt_BSK, chunks_B, keys_B, S + max_chunks)

  def cond(c):
    i, st, _, _ = c
    return (i < max_chunks) & ~jnp.all(st.done_B)

  def body(c):
    i, st, out_BJK, draws_BJ = c
    st, chunk_BK, draws_B = _calm_step(calm, ae, st, sampler, eos_id, pad_id)
    if stream:  # hand each new chunk to the host as it is produced
      jax.debug.callback(_Stream.emit, i, chunk_BK)
    return i + 1, st, out_BJK.at[:, i].set(chunk_BK), draws_BJ.at[:, i].set(draws_B)

  init = (jnp.int32(0), st, jnp.full((B, max_chunks, K), pad_id, jnp.int32),
          jnp.zeros((B, max_chunks), jnp.int32))
  _, st, out_BJK, draws_BJ = jax.lax.while_loop(cond, body, init)
  return out_BJK, draws_BJ, st.done_B


# ----------------------------------------------------------------------------- AR baseline


def _ar_prefill(model, prompt_BT, lens_B, keys_B, capacity: int) -> DecodeState:
  B = prompt_BT.shape[0]
  logits_BTV, cache = model(prompt_BT, cache=model.init_cache(B, capacity))
  cache = KVCache(cache.k, cache.v, lens_B)
  return DecodeState(cache, logits_BTV[jnp.arange(B), lens_B - 1], keys_B,
                     jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool))


def _ar_step(model, st: DecodeState, temperature, top_p, top_k: int, nucleus: bool,
             eos_id: int, pad_id: int) -> tuple[DecodeState, jax.Array, jax.Array]:
  """One token for every row → (state, tokens_B1, draws_B: 1 per row that drew, 0 per done
  row); a done row yields pads."""
  choose = lambda logits_BV, keys_B: sampling.sample_logits(logits_BV, keys_B, temperature,
                                                            top_k, top_p, nucleus)
  return _ar_advance(model, st, choose, eos_id, pad_id)


def _ar_advance(model, st: DecodeState, choose, eos_id: int, pad_id: int
                ) -> tuple[DecodeState, jax.Array, jax.Array]:
  """`_ar_step` with the token chosen by `choose(logits_BV, step_keys_B) → tok_B`."""
  tok_B = choose(st.carry_BX, st.step_keys())
  tok_B = jnp.where(st.done_B, pad_id, tok_B)
  done_B = st.done_B | (tok_B == eos_id)
  logits_B1V, cache = model(tok_B[:, None], cache=st.cache)
  drew_B = (~st.done_B).astype(jnp.int32)
  st = DecodeState(cache, logits_B1V[:, 0], st.keys_B, st.step_B + 1, done_B)
  return st, tok_B[:, None], drew_B


_AR_STATIC = ("model_def", "top_k", "nucleus", "eos_id", "pad_id")


@functools.partial(jax.jit, static_argnames=("model_def", "capacity"))
def _ar_prefill_jit(model_def, state, prompt_BT, lens_B, keys_B, *, capacity):
  return _ar_prefill(model_def.merge(state), prompt_BT, lens_B, keys_B, capacity)


@functools.partial(jax.jit, static_argnames=_AR_STATIC)
def _ar_step_jit(model_def, state, st, temperature, top_p, *, top_k, nucleus, eos_id, pad_id):
  return _ar_step(model_def.merge(state), st, temperature, top_p, top_k, nucleus, eos_id,
                  pad_id)


@functools.partial(jax.jit, static_argnames=_AR_STATIC + ("max_new", "stream"))
def _ar_generate(model_def, state, prompt_BT, lens_B, keys_B, temperature, top_p, *,
                 max_new: int, top_k: int, nucleus: bool, eos_id: int, pad_id: int,
                 stream: bool = False):
  model = model_def.merge(state)
  B, T = prompt_BT.shape
  st = _ar_prefill(model, prompt_BT, lens_B, keys_B, T + max_new)

  def cond(c):
    return (c[0] < max_new) & ~jnp.all(c[1].done_B)

  def body(c):
    i, st, out_BJ = c
    st, tok_B1, _ = _ar_step(model, st, temperature, top_p, top_k, nucleus, eos_id, pad_id)
    if stream:
      jax.debug.callback(_Stream.emit, i, tok_B1)
    return i + 1, st, out_BJ.at[:, i].set(tok_B1[:, 0])

  init = (jnp.int32(0), st, jnp.full((B, max_new), pad_id, jnp.int32))
  _, st, out_BJ = jax.lax.while_loop(cond, body, init)
  return out_BJ, st.done_B


# ----------------------------------------------------------------------------- decode slots
# A server keeps a fixed number of rows ("slots") compiled once: a request is prefilled alone
# (its prompt padded to a length bucket), inserted into a free slot between decode steps, and
# every step decodes all slots with per-row sampler settings; rows not live draw nothing and
# keep their cache length.


def _settle(old: DecodeState, new: DecodeState, live_B: jax.Array) -> DecodeState:
  """Rows not live keep their cache length and step count (an empty slot never fills up)."""
  length_B = jnp.where(live_B, new.cache.length, old.cache.length)
  return DecodeState(KVCache(new.cache.k, new.cache.v, length_B), new.carry_BX, new.keys_B,
                     jnp.where(live_B, new.step_B, old.step_B), new.done_B)


@functools.partial(jax.jit, donate_argnums=0)
def _insert_rows(st: DecodeState, rows: DecodeState, slots_R: jax.Array) -> DecodeState:
  """Row r of `rows` into slot slots_R[r]; an index past the last slot drops its row."""
  put = lambda a, r, axis=0: (a.at[:, slots_R] if axis else a.at[slots_R]).set(r, mode="drop")
  cache = KVCache(put(st.cache.k, rows.cache.k, 1), put(st.cache.v, rows.cache.v, 1),
                  put(st.cache.length, rows.cache.length))
  R = slots_R.shape[0]
  return DecodeState(cache, put(st.carry_BX, rows.carry_BX), put(st.keys_B, rows.keys_B),
                     put(st.step_B, jnp.zeros((R,), jnp.int32)),
                     put(st.done_B, jnp.zeros((R,), bool)))


@functools.partial(jax.jit, donate_argnums=0)
def _retire(st: DecodeState) -> DecodeState:
  return dataclasses.replace(st, done_B=jnp.ones_like(st.done_B))


def _slot_steps(advance, st: DecodeState, live_B: jax.Array, steps: int, span: int
                ) -> tuple[DecodeState, jax.Array, jax.Array]:
  """`steps` decode steps of every slot in one program (`advance(st) → (st, tokens_BX,
  draws_B)`) → (state, tokens [B, steps·X] in order, draws summed). The steps read and write
  the first `span` cache positions only (every live row's length + steps must fit there)."""
  full = st.cache
  if span < full.max_len:
    st = dataclasses.replace(st, cache=KVCache(full.k[:, :, :span], full.v[:, :, :span],
                                               full.length))

  def body(st, _):
    new, toks_BX, draws_B = advance(dataclasses.replace(st, done_B=~live_B))
    return _settle(st, new, live_B), (toks_BX, draws_B)

  st, (toks_SBX, draws_SB) = jax.lax.scan(body, st, None, length=steps)
  if span < full.max_len:
    st = dataclasses.replace(st, cache=KVCache(full.k.at[:, :, :span].set(st.cache.k),
                                               full.v.at[:, :, :span].set(st.cache.v),
                                               st.cache.length))
  B = toks_SBX.shape[1]
  return st, jnp.moveaxis(toks_SBX, 0, 1).reshape(B, -1), draws_SB.sum(axis=0)


@functools.partial(jax.jit, static_argnames=_CALM_STATIC[:2] + (
    "num_candidates", "max_attempts", "draws_per_step", "eos_id", "pad_id", "steps", "span"),
                   donate_argnames="st")
def _calm_slots_step_jit(calm_def, calm_state, ae_def, ae_state, st, rows, *, num_candidates,
                         max_attempts, draws_per_step, eos_id, pad_id, steps, span):
  calm, ae = calm_def.merge(calm_state), ae_def.merge(ae_state)
  choose = lambda h_BD, keys_B: sampling.next_chunk_rows(
      calm, ae, h_BD, keys_B, rows, num_candidates=num_candidates, max_attempts=max_attempts,
      draws_per_step=draws_per_step)
  advance = lambda st: _calm_advance(calm, st, choose, eos_id, pad_id)
  return _slot_steps(advance, st, rows.live_B, steps, span)


@functools.partial(jax.jit, static_argnames=("model_def", "top_k", "eos_id", "pad_id", "steps",
                                             "span"),
                   donate_argnames="st")
def _ar_slots_step_jit(model_def, state, st, rows, *, top_k, eos_id, pad_id, steps, span):
  model = model_def.merge(state)
  choose = lambda logits_BV, keys_B: sampling.next_token_rows(logits_BV, keys_B, rows, top_k)
  advance = lambda st: _ar_advance(model, st, choose, eos_id, pad_id)
  return _slot_steps(advance, st, rows.live_B, steps, span)


@dataclasses.dataclass(frozen=True)
class RowSettings:
  """One slot's sampler settings. `temperature` 0 means greedy: the AR baseline's most likely
  token; for CALM (which has no likelihood to maximise) the most frequent chunk among
  `num_candidates` head samples, the batch sampler's T → 0 limit. `top_p`: AR only;
  `sampler`: CALM only ("exact" | "batch")."""

  temperature: float = 1.0
  top_p: float = 1.0
  sampler: str = "exact"


# ----------------------------------------------------------------------------- engines


# Draws per row per iteration of the exact sampler in `step_slots` when the sampler leaves it
# at 0 (the whole-batch default, min(⌈1/T⌉, 8), depends on T, which differs per slot).
SLOT_DRAWS_PER_STEP = 4


class Engine:
  """Generation for one model: `generate` (the whole loop, compiled once per shape and sampler),
  and the pieces a continuous-batching server uses: `prefill` a batch of prompts into a
  `DecodeState` with room for `max_new_tokens`, then `decode_step` over all its rows."""

  tokens_per_step: int = 1
  max_temperature: float = 2.0  # for `step_slots`; CALM's samplers need T <= 1

  def __init__(self, *, eos_id: int, pad_id: int):
    self.eos_id, self.pad_id = eos_id, pad_id

  def generate(self, prompts: Sequence[Sequence[int]], keys_B: jax.Array, *,
               max_new_tokens: int, sampler: Any,
               on_tokens: Callable[[np.ndarray], None] | None = None) -> Generated:
    """Continues each prompt (token ids); row b draws from keys_B[b]. `on_tokens(ids_BK)`, if
    given, receives every step's new tokens on the host as they are produced."""
    raise NotImplementedError

  def prefill(self, prompts: Sequence[Sequence[int]], keys_B: jax.Array, *,
              max_new_tokens: int) -> DecodeState:
    raise NotImplementedError

  def decode_step(self, state: DecodeState, sampler: Any
                  ) -> tuple[DecodeState, jax.Array, jax.Array]:
    """One step for every row → (state, new tokens [B, tokens_per_step], draws [B])."""
    raise NotImplementedError

  # --------------------------------------------------------------------------- slots

  def positions(self, num_tokens: int) -> int:
    """Cache positions `num_tokens` new tokens take (a CALM prompt: its chunks after padding)."""
    return -(-num_tokens // self.tokens_per_step)

  def slots(self, num_slots: int, capacity: int) -> DecodeState:
    """`num_slots` empty rows with room for `capacity` cache positions each."""
    ids = [[self.pad_id] * self.tokens_per_step] * num_slots
    st = self.prefill_row_batch(ids, row_keys(range(num_slots)), capacity=capacity,
                                positions=1)
    return _retire(st)

  def prefill_row_batch(self, prompts, keys_B, *, capacity: int, positions: int) -> DecodeState:
    """Prompts prefilled together as a state for `insert_rows`: each padded to `positions` cache
    positions (a length bucket: one compilation per bucket and batch size), with room for
    `capacity`."""
    raise NotImplementedError

  def insert_rows(self, state: DecodeState, rows: DecodeState, slots: Sequence[int]
                  ) -> DecodeState:
    """`state` with row r of `rows` (a prefilled batch) in slot `slots[r]` (step 0, not done);
    a slot number past the last slot drops that row (padding). `state` is donated."""
    return _insert_rows(state, rows, jnp.asarray(slots, jnp.int32))

  def slot_rows(self, settings: Sequence[RowSettings | None]):
    """Per-slot sampler arrays for `step_slots` (None: an empty slot)."""
    raise NotImplementedError

  def check_settings(self, settings: RowSettings) -> None:
    """Raises CalmError naming the field if this model cannot sample with `settings`."""
    t, p = settings.temperature, settings.top_p
    if not (0.0 <= t <= self.max_temperature):
      raise SettingError("temperature",
                         f"temperature must be in [0, {self.max_temperature:g}], got {t}")
    if not (0.0 < p <= 1.0):
      raise SettingError("top_p", f"top_p must be in (0, 1], got {p}")
    if settings.sampler not in ("exact", "batch"):
      raise SettingError("sampler", f"sampler must be exact or batch, got {settings.sampler!r}")

  def step_slots(self, state: DecodeState, rows, sampler: Any, steps: int = 1,
                 span: int | None = None) -> tuple[DecodeState, jax.Array, jax.Array]:
    """`steps` decode steps of every slot at its own settings, in one program (`rows` from
    `slot_rows`; `sampler` gives what is fixed for all slots) → (state, tokens [slots,
    steps·tokens_per_step], draws); `state` is donated. A slot's tokens depend on its own
    prompt, key and settings only (not on `steps` or `span`). `span`: the cache positions the
    steps read and write (default: all); every live slot's length + `steps` must fit in it,
    and attention then costs `span`, not the whole cache."""
    raise NotImplementedError

  def _check(self, prompts, keys_B, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
      raise CalmError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if keys_B.shape[:1] != (len(prompts),):
      raise CalmError(f"{keys_B.shape[0]} row keys for {len(prompts)} prompts")


class CalmEngine(Engine):
  """CALM: a chunk of K tokens per step (head sample → autoencoder decode)."""

  max_temperature = 1.0

  def __init__(self, calm, ae, *, eos_id: int, pad_id: int):
    super().__init__(eos_id=eos_id, pad_id=pad_id)
    self.tokens_per_step = calm.chunk_size
    calm_def, self.calm_state = nnx.split(calm)
    ae_def, self.ae_state = nnx.split(ae)
    self.calm_def, self.ae_def = GraphDef(calm_def), GraphDef(ae_def)

  def _prompt(self, prompts, positions: int = 0):
    """Prompts as chunks [B, S, K] (right-padded to `positions` chunks) and chunks per row."""
    K = self.tokens_per_step
    ids, lens = ragged(prompts, self.pad_id, K)
    ids = ids.reshape(len(prompts), -1, K)
    if positions:
      if not ids.shape[1] <= positions:
        raise CalmError(f"prompt of {ids.shape[1]} chunks does not fit {positions} positions")
      ids = np.pad(ids, ((0, 0), (0, positions - ids.shape[1]), (0, 0)),
                   constant_values=self.pad_id)
    return jnp.asarray(ids), jnp.asarray(lens // K)

  def generate(self, prompts, keys_B, *, max_new_tokens, sampler=ChunkSampler(),
               on_tokens=None) -> Generated:
    self._check(prompts, keys_B, max_new_tokens)
    prompt_BSK, chunks_B = self._prompt(prompts)
    with _Stream.to(on_tokens):
      out_BJK, draws_BJ, done_B = _calm_generate(
          self.calm_def, self.calm_state, self.ae_def, self.ae_state, prompt_BSK, chunks_B,
          keys_B, max_chunks=-(-max_new_tokens // self.tokens_per_step), sampler=sampler,
          eos_id=self.eos_id, pad_id=self.pad_id, stream=on_tokens is not None)
      out = np.asarray(out_BJK).reshape(len(prompts), -1)
      draws = np.asarray(draws_BJ)
    used = draws != 0
    stats = {"mean_draws": float(np.abs(draws[used]).mean()) if used.any() else 0.0,
             "capped": int((draws < 0).sum()), "chunks": int(used.sum())}
    tokens = [trim(r, self.eos_id)[:max_new_tokens] for r in out]
    return Generated(tokens, [bool(t) and t[-1] == self.eos_id for t in tokens], stats)

  def prefill(self, prompts, keys_B, *, max_new_tokens) -> DecodeState:
    self._check(prompts, keys_B, max_new_tokens)
    prompt_BSK, chunks_B = self._prompt(prompts)
    capacity = prompt_BSK.shape[1] + -(-max_new_tokens // self.tokens_per_step)
    return _calm_prefill_jit(self.calm_def, self.calm_state, prompt_BSK, chunks_B, keys_B,
                             capacity=capacity)

  def prefill_row_batch(self, prompts, keys_B, *, capacity, positions):
    if positions > capacity:
      raise CalmError(f"{positions} prompt positions exceed the capacity of {capacity}")
    prompt_BSK, chunks_B = self._prompt(prompts, positions)
    return _calm_prefill_jit(self.calm_def, self.calm_state, prompt_BSK, chunks_B, keys_B,
                             capacity=capacity)

  def slot_rows(self, settings):
    return sampling.ChunkRows.build([None if s is None else (s.temperature, s.sampler)
                                     for s in settings])

  def check_settings(self, settings):
    super().check_settings(settings)
    if settings.top_p != 1.0:
      raise SettingError("top_p", "top_p: CALM draws whole chunks from a continuous head and has "
                         "no token distribution to truncate; leave top_p at 1 (use temperature)")

  def step_slots(self, state, rows, sampler=ChunkSampler(), steps=1, span=None):
    return _calm_slots_step_jit(
        self.calm_def, self.calm_state, self.ae_def, self.ae_state, state, rows,
        num_candidates=sampler.num_candidates, max_attempts=sampler.max_attempts,
        draws_per_step=sampler.draws_per_step or SLOT_DRAWS_PER_STEP, eos_id=self.eos_id,
        pad_id=self.pad_id, steps=steps, span=_span(state, span))

  def decode_step(self, state, sampler=ChunkSampler()):
    return _calm_step_jit(self.calm_def, self.calm_state, self.ae_def, self.ae_state, state,
                          sampler=sampler, eos_id=self.eos_id, pad_id=self.pad_id)


class AREngine(Engine):
  """The AR baseline: one token per step."""

  def __init__(self, model, *, eos_id: int, pad_id: int):
    super().__init__(eos_id=eos_id, pad_id=pad_id)
    model_def, self.state = nnx.split(model)
    self.model_def = GraphDef(model_def)

  def _args(self, sampler: TokenSampler) -> tuple[tuple, dict]:
    traced = (jnp.float32(sampler.temperature), jnp.float32(sampler.top_p))
    return traced, dict(top_k=int(sampler.top_k), nucleus=bool(sampler.top_p < 1.0),
                        eos_id=self.eos_id, pad_id=self.pad_id)

  def generate(self, prompts, keys_B, *, max_new_tokens, sampler=TokenSampler(),
               on_tokens=None) -> Generated:
    self._check(prompts, keys_B, max_new_tokens)
    ids, lens = ragged(prompts, self.pad_id, 1)
    traced, static = self._args(sampler)
    with _Stream.to(on_tokens):
      out, done_B = _ar_generate(self.model_def, self.state, jnp.asarray(ids), jnp.asarray(lens),
                                 keys_B, *traced, max_new=max_new_tokens,
                                 stream=on_tokens is not None, **static)
      out = np.asarray(out)
    tokens = [trim(r, self.eos_id) for r in out]
    return Generated(tokens, [bool(t) and t[-1] == self.eos_id for t in tokens], {})

  def prefill(self, prompts, keys_B, *, max_new_tokens) -> DecodeState:
    self._check(prompts, keys_B, max_new_tokens)
    ids, lens = ragged(prompts, self.pad_id, 1)
    return _ar_prefill_jit(self.model_def, self.state, jnp.asarray(ids), jnp.asarray(lens),
                           keys_B, capacity=ids.shape[1] + max_new_tokens)

  def prefill_row_batch(self, prompts, keys_B, *, capacity, positions):
    ids, lens = ragged(prompts, self.pad_id, 1)
    if ids.shape[1] > positions or positions > capacity:
      raise CalmError(f"prompt of {ids.shape[1]} tokens does not fit {positions} positions "
                      f"(capacity {capacity})")
    ids = np.pad(ids, ((0, 0), (0, positions - ids.shape[1])), constant_values=self.pad_id)
    return _ar_prefill_jit(self.model_def, self.state, jnp.asarray(ids), jnp.asarray(lens),
                           keys_B, capacity=capacity)

  def slot_rows(self, settings):
    return sampling.TokenRows.build([None if s is None else (s.temperature, s.top_p)
                                     for s in settings])

  def step_slots(self, state, rows, sampler=TokenSampler(), steps=1, span=None):
    return _ar_slots_step_jit(self.model_def, self.state, state, rows, top_k=int(sampler.top_k),
                              eos_id=self.eos_id, pad_id=self.pad_id, steps=steps,
                              span=_span(state, span))

  def decode_step(self, state, sampler=TokenSampler()):
    traced, static = self._args(sampler)
    return _ar_step_jit(self.model_def, self.state, state, *traced, **static)


def _span(state: DecodeState, span: int | None) -> int:
  """`span` cache positions (a static argument: one compilation each), the whole cache by
  default."""
  cap = state.cache.max_len
  if span is None:
    return cap
  if not 1 <= span <= cap:
    raise CalmError(f"span {span} is not within the cache's 1..{cap} positions")
  return int(span)


# ----------------------------------------------------------------------------- one call


def _keys(key: jax.Array, rows: int) -> jax.Array:
  """Row b's key fold_in(key, b) (the convention of the functions below)."""
  return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(rows, dtype=jnp.uint32))


def generate_calm(calm, ae, prompts: Sequence[Sequence[int]], key: jax.Array, *,
                  max_new_tokens: int, sampler: ChunkSampler = ChunkSampler(), eos_id: int,
                  pad_id: int, on_tokens: Callable[[np.ndarray], None] | None = None
                  ) -> tuple[list[list[int]], dict]:
  """Continues each prompt with CALM → (new tokens per row up to EOS, stats); row b draws from
  fold_in(key, b). See `CalmEngine.generate`."""
  g = CalmEngine(calm, ae, eos_id=eos_id, pad_id=pad_id).generate(
      prompts, _keys(key, len(prompts)), max_new_tokens=max_new_tokens, sampler=sampler,
      on_tokens=on_tokens)
  return g.tokens, g.stats


def generate_ar(model, prompts: Sequence[Sequence[int]], key: jax.Array, *, max_new_tokens: int,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int,
                pad_id: int, on_tokens: Callable[[np.ndarray], None] | None = None
                ) -> list[list[int]]:
  """Continues each prompt token by token → new tokens per row up to EOS; row b draws from
  fold_in(key, b). One compilation serves every temperature and every top-p < 1."""
  g = AREngine(model, eos_id=eos_id, pad_id=pad_id).generate(
      prompts, _keys(key, len(prompts)), max_new_tokens=max_new_tokens,
      sampler=TokenSampler(temperature, top_k, top_p), on_tokens=on_tokens)
  return g.tokens
