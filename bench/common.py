"""Shared pieces of the model benchmarks: sizes, machine description, timing and memory."""

from __future__ import annotations

import dataclasses
import os
import json
import pathlib
import platform
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from calm import config

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Size:
  """One benchmark size: the model config and the training batch."""

  name: str
  model: config.ModelConfig
  batch: int
  seq: int


def _model(ae_d: int, ae_ffn: int, d: int, layers: int, heads: int, ffn: int,
           blocks: int) -> config.ModelConfig:
  return config.ModelConfig(
      vocab_size=32000, chunk_size=4, latent_dim=128, dtype="float32",
      autoencoder=config.AutoencoderConfig(hidden_dim=ae_d, ffn_dim=ae_ffn),
      backbone=config.BackboneConfig(hidden_dim=d, num_layers=layers, num_heads=heads,
                                     num_kv_heads=heads, ffn_dim=ffn),
      head=config.HeadConfig(num_blocks=blocks, num_samples=8, num_target_samples=100))


# tiny: the AE FFN is not given by the reference figures; 640 = 2.5·d like the paper's 512→1280.
SIZES = {
    "tiny": Size("tiny", _model(256, 640, 256, 4, 4, 704, 2), batch=8, seq=256),
    "small": Size("small", _model(512, 1280, 512, 8, 8, 1376, 4), batch=4, seq=512),
}

# Reference implementation (PyTorch CPU, float32, 2 threads, tiny size) on this machine.
REFERENCE_TINY = {
    "ae_step_tokens_per_s": 1744.0,
    "calm_step_tokens_per_s": 2995.0,
    "gen_calm_T0.5_bs1": 28.3,
    "gen_calm_T0.5_bs8": 26.8,
    "gen_calm_T1_bs1": 336.0,
    "gen_calm_T1_bs8": 2021.0,
}


def full_config(size: Size, stage: str) -> config.Config:
  return config.Config(stage=stage, model=size.model,
                       data=config.DataConfig(block_tokens=size.seq),
                       train=config.TrainConfig(batch_size=size.batch, warmup_steps=10))


def machine() -> dict[str, Any]:
  """nproc, CPU model, library versions and the load average right now."""
  cpu = "unknown"
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  import flax
  import optax
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"nproc": cores, "cpu": cpu, "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def write_results(out: str | pathlib.Path, rows: list, info: dict, load0: float) -> None:
  """Writes a benchmark's rows with the machine and the load average around the run."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"machine": info, "load_average_start": load0,
                             "load_average_end": load_average(), "rows": rows}, indent=2))
  print(f"wrote {out}")


def load_average() -> float:
  return os.getloadavg()[0]


# ----------------------------------------------------------------------------- memory


def reset_peak_rss() -> None:
  """Resets the kernel's peak-RSS mark of this process (Linux: clear_refs 5)."""
  try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")
  except OSError:
    pass


def peak_rss_mib() -> float:
  """Host peak resident memory since the last `reset_peak_rss` (VmHWM), MiB."""
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_mib() -> float | None:
  """Peak device memory on accelerators (None on CPU, where host RSS is the measure)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def peak_memory_mib() -> float:
  dev = device_peak_mib()
  return dev if dev is not None and jax.default_backend() != "cpu" else peak_rss_mib()


# ----------------------------------------------------------------------------- timing


def block(x: Any) -> Any:
  return jax.block_until_ready(x)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  t = time.perf_counter()
  out = block(fn())
  return time.perf_counter() - t, out


def interleave(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
  """Runs each timing function once per round, in turn: [round-robin] seconds per name.

  Interleaving spreads the load of other processes on the machine evenly over what is compared.
  """
  out: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():
      out[k].append(fn())
  return out


def summary(seconds: list[float]) -> dict[str, float]:
  """Median and best of repeated timings (the median is what the tables report)."""
  return {"median_s": statistics.median(seconds), "best_s": min(seconds),
          "spread": (max(seconds) - min(seconds)) / statistics.median(seconds)}


def fmt(x: float | None, digits: int = 0) -> str:
  if x is None or (isinstance(x, float) and not np.isfinite(x)):
    return "-"
  return f"{x:,.{digits}f}"
