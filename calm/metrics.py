"""Training metrics: JSONL + TensorBoard from process 0, throughput, model FLOPs, MFU and
CALM energy reference lines."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calm import losses
from calm.flops import ae_macs_per_chunk, backbone_macs_per_position  # noqa: F401
from calm.config import Config, ModelConfig


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


# ----------------------------------------------------------------------------- FLOPs


def model_flops_per_token(cfg: Config | ModelConfig, stage: str | None = None,
                          seq_tokens: int | None = None) -> float:
  """Training FLOPs per token (for MFU): 6·MACs of trained matmuls (forward + backward), 2·MACs
  of frozen forward-only ones (the AE encoder in the calm stage). Causal attention counts the
  average context (half the sequence). Embedding lookups, norms and elementwise ops are not
  counted. With a full `Config`, `stage` and `seq_tokens` default to its stage and block size.
  """
  if isinstance(cfg, Config):
    stage = stage or cfg.stage
    seq_tokens = seq_tokens or cfg.data.block_tokens
    cfg = cfg.model
  if stage is None or seq_tokens is None:
    raise ValueError("model_flops_per_token needs stage and seq_tokens with a ModelConfig")
  from calm import stages

  if stage not in stages.STAGES:
    raise ValueError(f"unknown stage {stage!r}")
  return stages.get(stage).flops_per_token(cfg, seq_tokens)


def energy_references(ae_graphdef, ae_params, batches: list[jax.Array], keys: list[jax.Array],
                      cfg: ModelConfig) -> dict[str, float]:
  """Baseline and oracle energy losses of an evaluation set (`losses.reference_energy_losses`),
  averaged over its batches like the held-out loss; the baseline pools the posteriors of every
  target chunk of the set. `keys` (one per batch) as in the evaluation share its target draws."""
  K = cfg.chunk_size
  post = jax.jit(lambda p, ids: losses.next_chunk_posteriors(nnx.merge(ae_graphdef, p), ids, K))
  pairs = [post(ae_params, ids) for ids in batches]
  flat = lambda xs: jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in xs])
  pool_mu, pool_logstd = flat([m for m, _ in pairs]), flat([s for _, s in pairs])
  ref = jax.jit(lambda mu, ls, pm, pl, k: losses.reference_energy_losses(mu, ls, pm, pl, k,
                                                                          cfg.head))
  rows = [jax.device_get(ref(mu, ls, pool_mu, pool_logstd, k)) for (mu, ls), k in zip(pairs, keys)]
  out = mean_tree(rows)
  gaps = [float(r["baseline_loss"]) - float(r["oracle_loss"]) for r in rows]
  # standard error of the baseline − oracle gap over batches (0 with one batch: unknown)
  out["reference_gap_se"] = float(np.std(gaps, ddof=1) / np.sqrt(len(gaps))) if len(gaps) > 1 else 0.0
  return out


def with_references(ev: dict[str, float], refs: dict[str, float]) -> dict[str, float]:
  """CALM eval metrics plus the reference lines and the normalised score of `ev["loss"]`.

  The score divides by baseline − oracle: when that gap is not clearly positive (≤ 0, or within
  two standard errors over the evaluation batches, as for barely trained models) the score
  means nothing and is left out (reported as n/a)."""
  out = {**ev, **refs}
  gap = refs["baseline_loss"] - refs["oracle_loss"]
  if gap > 0 and gap > 2.0 * refs.get("reference_gap_se", 0.0):
    out["norm_score"] = float(losses.normalised_score(ev["loss"], refs["baseline_loss"],
                                                      refs["oracle_loss"]))
  return out


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
  """The rows of a metrics.jsonl ([] when it does not exist)."""
  p = pathlib.Path(path)
  if not p.exists():
    return []
  return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def learning_summary(run_dir: str | pathlib.Path) -> str:
  """One line: a CALM run's normalised score at its first and last evaluation (n/a where the
  reference lines did not separate)."""
  ev = [r for r in read_jsonl(pathlib.Path(run_dir) / "metrics.jsonl") if "eval/oracle_loss" in r]
  if not ev:
    return f"{run_dir}: no CALM evaluation with reference lines in metrics.jsonl"
  a, b = ev[0], ev[-1]
  score = lambda r: f"{r['eval/norm_score']:+.3f}" if "eval/norm_score" in r else "n/a"
  return (f"CALM normalised score {score(a)} at step {a['step']} -> "
          f"{score(b)} at step {b['step']} (energy loss {b['eval/loss']:.3f}; "
          f"no-context baseline {b['eval/baseline_loss']:.3f} = 0, oracle "
          f"{b['eval/oracle_loss']:.3f} = 1)")
