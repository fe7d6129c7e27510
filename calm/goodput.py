"""Goodput: where a run's wall time goes, over every launch of the run.

Each launch's wall time, from the moment its process started, is split into

  step        training steps that advanced the run (the productive part: goodput)
  compile     tracing, lowering and compiling (or loading from the compilation cache)
  data        waiting for the next batch
  checkpoint  saving, restoring and waiting for checkpoints to be written
  eval        held-out evaluation
  lost        steps computed again after a resume: they had been reached before the process
              was killed, but after its last checkpoint
  startup     the interpreter, imports, building the state, tokenizer and data pipeline
  other       everything else (logging, the loop itself, teardown)

Process 0 writes its launch's ledger to `RUN_DIR/goodput/N.json` after every step (one small
write in place, so a `kill -9` loses at most the step under way) and a resumed launch reads the
earlier ones. The furthest step a killed launch reached is the larger of its ledger's and the
last `metrics.jsonl` row's; steps up to it are `lost` when computed again.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import time
from typing import Iterator

CATEGORIES = ("step", "compile", "data", "checkpoint", "eval", "lost", "startup", "other")
SUBDIR = "goodput"
DATA_WAIT_WARNING = 0.10  # fraction of the loop's time spent waiting for data

_compile_secs = [0.0]  # lowering + compiling seconds in this process (jax monitoring events)
_listening = False
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def _listen() -> None:
  global _listening
  if not _listening:
    import jax

    def on_duration(event: str, secs: float, **_) -> None:
      if event in _COMPILE_EVENTS:
        _compile_secs[0] += secs

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    _listening = True


def process_start_time() -> float:
  """When this process started (seconds since the epoch): from /proc on Linux, else the time
  this module was imported. The age comes from the seconds since boot in /proc/uptime (10 ms
  resolution), not from /proc/stat's boot time, which is rounded to whole seconds."""
  try:
    with open("/proc/self/stat") as f:
      ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time in ticks
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return time.time() - max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
  except (OSError, ValueError, IndexError):
    return _IMPORTED


_IMPORTED = time.time()


def read_ledgers(run_dir: str | os.PathLike) -> list[dict]:
  """The ledgers of a run's launches, oldest first (unreadable ones skipped)."""
  root = pathlib.Path(run_dir) / SUBDIR
  out = []
  for p in sorted(root.glob("*.json"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
    try:
      rec = json.loads(p.read_text())
    except (OSError, ValueError):
      continue
    if isinstance(rec, dict) and isinstance(rec.get("seconds"), dict):
      out.append(rec)
  return out


def furthest_step(run_dir: str | os.PathLike, ledgers: list[dict]) -> int:
  """The furthest training step any earlier launch completed: its ledger, or a metrics.jsonl row
  written after its last ledger write."""
  best = max((int(r.get("step", 0)) for r in ledgers), default=0)
  metrics = pathlib.Path(run_dir) / "metrics.jsonl"
  if metrics.exists():
    with open(metrics) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:  # a line cut short by a kill
          continue
        if any(k.startswith("train/") for k in row):
          best = max(best, int(row.get("step", 0)))
  return best


def totals(ledgers: list[dict]) -> dict:
  """Seconds per category, wall seconds, lost steps and launches, summed over `ledgers`."""
  secs = {c: sum(float(r["seconds"].get(c, 0.0)) for r in ledgers) for c in CATEGORIES}
  return {"seconds": secs, "wall": sum(float(r.get("wall", 0.0)) for r in ledgers),
          "lost_steps": sum(int(r.get("lost_steps", 0)) for r in ledgers),
          "launches": len(ledgers)}


def fractions(t: dict) -> dict[str, float]:
  wall = max(t["wall"], 1e-9)
  return {c: s / wall for c, s in t["seconds"].items()}


def _duration(s: float) -> str:
  if s < 120:
    return f"{s:.1f} s"
  if s < 7200:
    return f"{s / 60:.1f} min"
  return f"{s / 3600:.2f} h"


def summary(t: dict) -> str:
  """One line: 'goodput 93.1%: compile 2.4%, data 1.1%, … of 1.2 h over 2 launches'."""
  f = fractions(t)
  parts = []
  for c in CATEGORIES[1:]:
    if c == "lost":
      parts.append(f"lost {f[c]:.1%} ({t['lost_steps']} steps redone)")
    else:
      parts.append(f"{c} {f[c]:.1%}")
  n = t["launches"]
  return (f"goodput {f['step']:.1%}: " + ", ".join(parts)
          + f" of {_duration(t['wall'])} over {n} launch{'es' if n != 1 else ''}")


class Ledger:
  """This launch's time, by category, written to RUN_DIR/goodput/N.json as it goes (process 0;
  elsewhere it only keeps time)."""

  def __init__(self, run_dir: str | os.PathLike, *, write: bool = True,
               started: float | None = None):
    _listen()
    self.run_dir = pathlib.Path(run_dir)
    self.started = process_start_time() if started is None else started
    self.seconds = dict.fromkeys(CATEGORIES, 0.0)
    self.earlier = read_ledgers(self.run_dir)
    self.redo_until = furthest_step(self.run_dir, self.earlier)  # steps up to here are redone
    self.start_step = self.step = self.lost_steps = 0
    self.first_step_wall: float | None = None  # seconds from process start to the first step
    self.write_enabled = write
    self._fd, self._size, self._path = None, 1024, None
    self._accounted_to = self.started  # time up to here is in `seconds`
    self._mark("startup")

  def _mark(self, category: str) -> None:
    """Everything since the last mark goes to `category`."""
    now = time.time()
    self.seconds[category] += max(0.0, now - self._accounted_to)
    self._accounted_to = now

  @contextlib.contextmanager
  def phase(self, category: str) -> Iterator[None]:
    """Times the block as `category`, minus any compiling inside it (counted as compile)."""
    self._mark("other")
    c0 = _compile_secs[0]
    try:
      yield
    finally:
      now = time.time()
      dt = max(0.0, now - self._accounted_to)
      dc = min(max(0.0, _compile_secs[0] - c0), dt)
      self.seconds["compile"] += dc
      self.seconds[category] += dt - dc
      self._accounted_to = now

  def resumed_at(self, step: int) -> None:
    self.start_step = self.step = step

  def is_redo(self, step: int) -> bool:
    """Whether `step` had been completed by an earlier launch (it is lost work now)."""
    return step <= self.redo_until

  def completed(self, step: int) -> None:
    """Step `step` finished (counted as lost work when it is a redo); written by the next
    `save`."""
    self.step = max(self.step, step)
    self.lost_steps += int(self.is_redo(step))
    if self.first_step_wall is None:
      self.first_step_wall = self.wall

  @property
  def wall(self) -> float:
    return time.time() - self.started

  def record(self) -> dict:
    self._mark("other")
    return {"launch": self.number, "host": socket.gethostname(), "pid": os.getpid(),
            "started": self.started, "wall": self._accounted_to - self.started,
            "start_step": self.start_step, "step": self.step, "lost_steps": self.lost_steps,
            "first_step_s": self.first_step_wall,
            "seconds": {c: round(s, 6) for c, s in self.seconds.items()}}

  @property
  def number(self) -> int:
    return len(self.earlier) + 1

  def totals(self) -> dict:
    """Over every launch so far, this one included."""
    return totals([*self.earlier, self.record()])

  def save(self) -> None:
    """Writes this launch's ledger in place: one write, so a kill leaves the previous one or this
    one, never a mix."""
    if not self.write_enabled:
      return
    if self._fd is None:
      (self.run_dir / SUBDIR).mkdir(parents=True, exist_ok=True)
      self._path = self.run_dir / SUBDIR / f"{self.number}.json"
      self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    data = json.dumps(self.record()).encode()
    if len(data) > self._size:
      self._size = -(-len(data) // 1024) * 1024
    os.pwrite(self._fd, data.ljust(self._size), 0)  # trailing spaces: still one JSON value

  def close(self) -> None:
    self.save()
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def data_wait_warning(fraction: float, first: int, last: int) -> str:
  """One line: training is starved by its input pipeline, and what to do about it."""
  return (f"warning: training waited for data {fraction:.0%} of the time over steps "
          f"{first}-{last}; prepare the corpus once into shards on a local disk (calm-prepare, "
          f"then data.train=prepared:DIR) or read batches with more threads (data.workers)")
