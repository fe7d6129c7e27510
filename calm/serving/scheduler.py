"""Continuous batching: a fixed set of decode slots on the generation engine, compiled once.

One thread owns the device. Between decode calls it prefills the waiting choices together
(their prompts padded to a length bucket) into free slots; every call runs `steps_per_call`
decode steps of all slots in one program, each slot at its own temperature / sampler / seed,
with attention over only the cache positions the live slots can have filled (a span bucket); a
choice that ends (EOS, max_tokens, a stop string) or is cancelled frees its slot after that
call. Call n+1 is dispatched before call n's tokens are read back, so the host's text work
overlaps the device's next call.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import threading
import time
from typing import Callable

import numpy as np

from calm import engine as engine_lib
from calm.engine import RowSettings
from calm.serving.metrics import Metrics
from calm.serving.protocol import MAX_SEED

log = logging.getLogger(__name__)

Emit = Callable[[str, "str | None"], None]  # (new text, finish reason or None)


@dataclasses.dataclass(eq=False)
class Choice:
  """One prompt continued once: what it asked for, and what it has produced so far."""

  prompt_ids: list[int]
  seed: int
  settings: RowSettings
  max_tokens: int
  stops: tuple[str, ...]
  emit: Emit
  ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks)
  arrived: float = dataclasses.field(default_factory=time.monotonic)
  ids: list[int] = dataclasses.field(default_factory=list)
  generated: int = 0  # tokens consumed (EOS included)
  sent: str = ""
  finish: str | None = None
  cancelled: bool = False
  first_token_at: float | None = None

  def take(self, new_ids: list[int], tokenizer) -> tuple[str, str | None]:
    """Appends one step's tokens → (text to send now, finish reason or None). Text that could
    still turn into a stop string, or an unfinished UTF-8 character, is held back."""
    for t in new_ids:
      if self.generated >= self.max_tokens:
        break
      self.generated += 1
      if t == tokenizer.eos_id and not self.ignore_eos:
        self.finish = "stop"
        break
      self.ids.append(t)
    if self.finish is None and self.generated >= self.max_tokens:
      self.finish = "length"
    text = tokenizer.decode(self.ids)
    if self.stops:
      start = max(0, len(self.sent) - max(map(len, self.stops)))
      hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
      if hits:
        text, self.finish = text[:min(hits)], "stop"
    if self.finish is None:
      text = text[:len(text) - _held(text, self.stops)]
    if not text.startswith(self.sent) or len(text) <= len(self.sent):
      return "", self.finish
    delta, self.sent = text[len(self.sent):], text
    return delta, self.finish


def _held(text: str, stops: tuple[str, ...]) -> int:
  """Characters at the end of `text` not to send yet: a replacement character (a multi-byte
  character cut by the step) or the longest suffix that begins some stop string."""
  n = 0
  while n < len(text) and text[len(text) - 1 - n] == "\ufffd":
    n += 1
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), n, -1):
      if text.endswith(s[:k]):
        n = k
        break
  return n


class QueueFull(Exception):
  """The bounded queue cannot take the request now."""


class Scheduler:
  """Decode slots over one run's engine. `submit` choices from any thread; their `emit`
  callbacks run on the decode thread."""

  def __init__(self, run, *, slots: int, max_queue: int, buckets: tuple[int, ...] = (),
               steps_per_call: int = 4, spans: tuple[int, ...] | None = None):
    self.run, self.engine, self.tokenizer = run, run.engine, run.tokenizer
    self.sampler = run.stage.sampler(run.config.sampling)  # the fixed part of every slot
    self.context = run.config.data.block_tokens
    self.capacity = self.engine.positions(self.context) + 1  # + a CALM prompt's left padding
    # prefill lengths: powers of two from 8 below the capacity (by default)
    self.buckets = _ladder(buckets or None, self.capacity, first=8, most=self.capacity - 1)
    # attention spans of a decode call: it reads only the cache positions the live slots fill;
    # powers of two from 16 up to 0.8× the capacity (by default: a span close to the capacity
    # would save little for its compilation)
    self.spans = _ladder(spans, self.capacity, first=16, most=self.capacity * 4 // 5)
    # prefill batch sizes: the choices admitted together are prefilled in one call
    self.batches = tuple(sorted({min(4**i, slots) for i in range(8) if 4**i < slots} | {slots}))
    self.num_slots, self.max_queue, self.steps_per_call = slots, max_queue, steps_per_call
    self.metrics = Metrics()
    self.owner: list[Choice | None] = [None] * slots
    self.filled = [0] * slots  # cache positions each slot's row may hold (an upper bound)
    self.budget = [0] * slots  # tokens each slot may still produce beyond the calls dispatched
    self.queue: collections.deque[Choice] = collections.deque()
    self._cv = threading.Condition()
    self._stop = False
    self._rows_for: tuple = ()
    self._rows = None
    self.state = self.engine.slots(slots, self.capacity)
    self._thread = threading.Thread(target=self._loop, name="calm-decode", daemon=True)

  # --------------------------------------------------------------------------- public

  def warm_up(self) -> float:
    """Compiles every prefill bucket and batch size, the insert and the step at every span
    before serving → seconds."""
    t0 = time.perf_counter()
    for n in self.batches:
      for b in self.buckets:
        rows = self.engine.prefill_row_batch(
            [[self.tokenizer.eos_id]] * n, engine_lib.row_keys(list(range(n))),
            capacity=self.capacity, positions=b)
        self.state = self.engine.insert_rows(self.state, rows, list(range(n)))
    rows = self.engine.slot_rows([RowSettings()] + [None] * (self.num_slots - 1))
    for span in self.spans:
      self.state, toks, _ = self.engine.step_slots(self.state, rows, self.sampler,
                                                   self.steps_per_call, span)
      np.asarray(toks)
    self.state = self.engine.slots(self.num_slots, self.capacity)
    return time.perf_counter() - t0

  def start(self) -> None:
    self._thread.start()

  def close(self) -> None:
    with self._cv:
      self._stop = True
      self._cv.notify_all()
    self._thread.join(timeout=30)

  def bucket(self, num_tokens: int) -> int:
    """The prefill length bucket (cache positions) of a prompt of `num_tokens` tokens."""
    need = self.engine.positions(num_tokens)
    return next(b for b in self.buckets if b >= need)

  def submit(self, choices: list[Choice]) -> None:
    with self._cv:
      if len(self.queue) + len(choices) > self.max_queue:
        raise QueueFull
      self.queue.extend(choices)
      self._cv.notify()

  def new_seed(self) -> int:
    return secrets.randbelow(MAX_SEED // 2)

  @property
  def busy(self) -> int:
    return sum(o is not None for o in self.owner)

  @property
  def waiting(self) -> int:
    return len(self.queue)

  def idle(self) -> bool:
    with self._cv:
      return not self.queue and self.busy == 0

  def cancel_all(self) -> None:
    with self._cv:
      for c in list(self.queue) + [o for o in self.owner if o is not None]:
        c.cancelled = True
      self._cv.notify()

  # --------------------------------------------------------------------------- decode thread

  def _loop(self) -> None:
    pending = None
    while True:
      with self._cv:
        while not (self._stop or self.queue or self.busy or pending):
          self._cv.wait()
        if self._stop:
          break
        admit = []
        free = [i for i, o in enumerate(self.owner) if o is None]
        while free and self.queue:
          c = self.queue.popleft()
          if not c.cancelled:
            admit.append((free.pop(0), c))
            self.owner[admit[-1][0]] = c
      try:
        if admit:
          self._prefill(admit)
        # a call only while some slot can still produce a token (or nothing is in flight): the
        # last tokens of a batch are not followed by a call nobody reads
        step = self._step() if self.busy and (pending is None or self._wanted()) else None
        if pending is not None:
          self._deliver(*pending)
        pending = step
      except Exception as e:  # a device error must not take the server down
        log.exception("decode step failed")
        self._fail_all(f"generation failed: {type(e).__name__}: {e}")
        pending = None

  def _prefill(self, admit: list[tuple[int, Choice]]) -> None:
    """Prefills the admitted choices in one call (padded to a batch size and a length bucket)
    and writes them into their slots."""
    n = next(b for b in self.batches if b >= len(admit))
    pad = n - len(admit)
    prompts = [c.prompt_ids for _, c in admit] + [[self.tokenizer.eos_id]] * pad
    keys = engine_lib.row_keys([c.seed for _, c in admit] + [0] * pad)
    positions = self.bucket(max(len(c.prompt_ids) for _, c in admit))
    rows = self.engine.prefill_row_batch(prompts, keys, capacity=self.capacity,
                                         positions=positions)
    slots = [s for s, _ in admit] + [self.num_slots] * pad  # past the end: dropped
    self.state = self.engine.insert_rows(self.state, rows, slots)
    for s, c in admit:
      self.filled[s], self.budget[s] = positions, c.max_tokens
    self.metrics.prompt(sum(len(c.prompt_ids) for _, c in admit))

  def _step(self):
    owners = tuple(self.owner)
    if tuple(map(id, owners)) != self._rows_for:
      self._rows = self.engine.slot_rows([None if o is None else o.settings for o in owners])
      self._rows_for = tuple(map(id, owners))
    live = [s for s, o in enumerate(owners) if o is not None]
    need = max(self.filled[s] for s in live) + self.steps_per_call
    span = next((b for b in self.spans if b >= need), self.capacity)
    for s in live:
      self.filled[s] += self.steps_per_call
      self.budget[s] -= self.steps_per_call * self.engine.tokens_per_step
    self.state, toks, _ = self.engine.step_slots(self.state, self._rows, self.sampler,
                                                 self.steps_per_call, span)
    return toks, owners

  def _wanted(self) -> bool:
    """Whether a live slot may still produce tokens after the calls already dispatched."""
    return any(o is not None and not o.cancelled and self.budget[s] > 0
               for s, o in enumerate(self.owner))

  def _deliver(self, toks, owners) -> None:
    toks = np.asarray(toks)
    now, produced = time.monotonic(), 0
    for slot, c in enumerate(owners):
      if c is None or c.finish is not None:
        continue
      if c.cancelled:
        self._free(slot, c)
        continue
      before = c.generated
      delta, finish = c.take(toks[slot].tolist(), self.tokenizer)
      produced += c.generated - before
      if c.first_token_at is None:
        c.first_token_at = now
        self.metrics.first_token(now - c.arrived)
      c.emit(delta, finish)
      if finish is not None:
        self._free(slot, c)
    self.metrics.generated(produced, now)

  def _free(self, slot: int, c: Choice) -> None:
    with self._cv:
      if self.owner[slot] is c:
        self.owner[slot] = None

  def _fail_all(self, message: str) -> None:
    with self._cv:
      victims = list(self.queue) + [o for o in self.owner if o is not None]
      self.queue.clear()
      self.owner = [None] * self.num_slots
    self.state = self.engine.slots(self.num_slots, self.capacity)
    self._rows_for = ()
    for c in victims:
      if c.finish is None:
        c.finish = "error"
        c.emit(message, "error")


def _ladder(given: tuple[int, ...] | None, capacity: int, *, first: int, most: int
            ) -> tuple[int, ...]:
  """Sorted cache lengths ending at `capacity`: `given` (capped at it), or by default the powers
  of two from `first` up to `most`."""
  if given is not None:
    return tuple(sorted({min(b, capacity) for b in given} | {capacity}))
  out, b = [], first
  while b <= most:
    out.append(b)
    b *= 2
  return tuple(out) + (capacity,)
