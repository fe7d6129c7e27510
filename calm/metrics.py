"""Training metrics: JSONL + TensorBoard from process 0, throughput and MFU."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


class MetricsLogger:
  """Writes scalars by global step to `metrics.jsonl` and TensorBoard (process 0 only)."""

  def __init__(self, run_dir: str | pathlib.Path, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      run_dir = pathlib.Path(run_dir)
      run_dir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(run_dir / "tb"))
      except Exception:  # TensorBoard is optional for a run
        self._tb = None

  def write(self, step: int, scalars: Mapping[str, Any], *, prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **row}) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
  p = pathlib.Path(path)
  if not p.exists():
    return []
  return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class Throughput:
  """Tokens/s over the steps since the last call."""

  def __init__(self):
    self._t = time.perf_counter()

  def rate(self, tokens: float) -> float:
    now = time.perf_counter()
    dt, self._t = now - self._t, now
    return tokens / max(dt, 1e-9)


_PEAK_CACHE: dict[str, float] = {}


def measure_peak_flops(n: int | None = None, dtype=jnp.float32, repeats: int = 5) -> float:
  """Measured dense-matmul FLOP/s of one local device (the MFU denominator).

  n defaults to 1024 on a CPU and 8192 on accelerators, where smaller products are bound by
  launch latency (an H100 reached 13 TFLOP/s at 1024 against ~400 at 8192).
  """
  if n is None:
    n = 1024 if jax.default_backend() == "cpu" else 8192
  key = f"{jax.devices()[0].device_kind}:{n}:{jnp.dtype(dtype).name}"
  if key in _PEAK_CACHE:
    return _PEAK_CACHE[key]
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  _PEAK_CACHE[key] = 2.0 * n**3 / best
  return _PEAK_CACHE[key]


def mean_tree(rows: list[Mapping[str, Any]]) -> dict[str, float]:
  """Averages a list of metric dicts key by key."""
  if not rows:
    return {}
  return {k: float(np.mean([float(r[k]) for r in rows])) for k in rows[0]}
