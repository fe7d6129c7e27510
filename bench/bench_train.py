"""Training-step throughput of the three stages: tokens/s, model FLOPs/token, MFU, compile, memory.

  python -m bench.bench_train [--sizes tiny] [--steps 3] [--rounds 5] [--out FILE]

Uses the step `trainer.train` runs (`trainer.setup`: same optimizer, shardings, jit and
donation) on random token ids. The stages are timed interleaved (round-robin) so
other load on the machine hits them alike; MFU uses the matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import jax
import numpy as np

from bench import common
from calm import metrics, rng, sharding, stages, trainer
from calm.errors import cli

STAGES = ("autoencoder", "calm", "ar")


@dataclasses.dataclass
class Step:
  """A compiled training step and the state it runs on."""

  stage: str
  compiled: Any
  state: list  # [params, opt_state, ids, key, ae_params]
  compile_s: float
  flops_per_token: float
  xla_flops_per_token: float
  temp_mib: float
  n_params: int

  def run(self, n: int) -> float:
    """Seconds for n steps (the state is donated and replaced in place)."""
    params, opt, ids, key, ae = self.state
    t = time.perf_counter()
    for i in range(n):
      params, opt, m = self.compiled(params, opt, ids, jax.random.fold_in(key, i), ae)
    jax.block_until_ready((params, m))
    dt = time.perf_counter() - t
    self.state[:2] = params, opt
    return dt


def build_step(size: common.Size, stage: str) -> Step:
  cfg = common.full_config(size, stage)
  ae = None
  if stage == "calm":  # a random frozen autoencoder: the step's cost does not depend on it
    ae_cfg = dataclasses.replace(cfg, stage="autoencoder", seed=1)
    ae = sharding.sharded_init(lambda: stages.build_model(ae_cfg), sharding.make_mesh(cfg.mesh))
  s = trainer.setup(cfg, autoencoder=ae)
  ids = jax.device_put(
      np.random.default_rng(0).integers(0, size.model.vocab_size, (size.batch, size.seq),
                                        dtype=np.int32), s.batch_sharding)
  key = rng.stream(0, rng.TRAIN)
  t = time.perf_counter()
  compiled = s.lower().compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  tokens = size.batch * size.seq
  return Step(stage=stage, compiled=compiled, state=[s.params, s.opt_state, ids, key, s.ae_params],
              compile_s=compile_s,
              flops_per_token=metrics.model_flops_per_token(cfg.model, stage, size.seq),
              xla_flops_per_token=float(cost.get("flops", 0.0)) / tokens,
              temp_mib=getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem else 0.0,
              n_params=s.num_params)


def run(sizes: list[str], steps: int, rounds: int, peak: float) -> list[dict]:
  """Benchmarks every stage of every size; returns one row per (size, stage)."""
  rows = []
  for name in sizes:
    size = common.SIZES[name]
    built: dict[str, Step] = {}
    mem: dict[str, float] = {}
    for stage in STAGES:
      common.reset_peak_rss()
      built[stage] = build_step(size, stage)
      built[stage].run(1)  # first execution (allocation) outside the timings
      mem[stage] = common.peak_memory_mib()
    times = common.interleave({s: (lambda s=s: built[s].run(steps)) for s in STAGES}, rounds)
    tokens = size.batch * size.seq * steps
    for stage in STAGES:
      b, t = built[stage], common.summary(times[stage])
      tok_s = tokens / t["median_s"]
      rows.append({
          "size": name, "stage": stage, "batch": size.batch, "seq": size.seq,
          "params": b.n_params, "compile_s": b.compile_s, "step_s": t["median_s"] / steps,
          "step_s_best": t["best_s"] / steps, "spread": t["spread"], "tokens_per_s": tok_s,
          "model_flops_per_token": b.flops_per_token,
          "xla_flops_per_token": b.xla_flops_per_token,
          "flops_ratio_xla_over_model": b.xla_flops_per_token / b.flops_per_token,
          "tflops": tok_s * b.flops_per_token / 1e12, "mfu": tok_s * b.flops_per_token / peak,
          "peak_memory_mib": mem[stage], "xla_temp_mib": b.temp_mib})
  return rows


def print_rows(rows: list[dict]) -> None:
  print(f"{'size':<6} {'stage':<12} {'params':>8} {'compile s':>9} {'step ms':>8} "
        f"{'tokens/s':>9} {'MFLOP/tok':>9} {'XLA/model':>9} {'GFLOP/s':>8} {'MFU':>6} "
        f"{'peak MiB':>8}")
  for r in rows:
    print(f"{r['size']:<6} {r['stage']:<12} {r['params'] / 1e6:>7.1f}M {r['compile_s']:>9.1f} "
          f"{r['step_s'] * 1e3:>8.0f} {r['tokens_per_s']:>9,.0f} "
          f"{r['model_flops_per_token'] / 1e6:>9.1f} {r['flops_ratio_xla_over_model']:>9.2f} "
          f"{r['tflops'] * 1e3:>8.1f} {r['mfu']:>6.1%} {r['peak_memory_mib']:>8.0f}")


@cli
def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="tiny")
  ap.add_argument("--steps", type=int, default=3, help="steps per timing")
  ap.add_argument("--rounds", type=int, default=5, help="interleaved timings per stage")
  ap.add_argument("--out", default=str(common.RESULTS / "train.json"))
  args = ap.parse_args(argv)
  info = common.machine()
  load0 = common.load_average()
  peak = metrics.measure_peak_flops()
  rows = run(args.sizes.split(","), args.steps, args.rounds, peak)
  print_rows(rows)
  out = {"machine": info, "peak_flops": peak, "load_average_start": load0,
         "load_average_end": common.load_average(), "rows": rows}
  common.RESULTS.mkdir(parents=True, exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
