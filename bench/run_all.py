"""`make bench`: matmul peak, training steps, generation and BrierLM; one table, JSON, markdown.

  python -m bench.run_all [--sizes tiny[,small]] [--quick] [--data]

Writes bench/results/{all,train,generate,brier}.json and bench/results/README_perf.md (the
table with date, machine and versions, for docs/speed.md). Every figure is measured in this one
process; compared quantities are timed interleaved, and ratios to the reference figures use the
tiny size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from bench import bench_brier, bench_generate, bench_train, common
from calm import metrics
from calm.errors import cli


def matmul_peak() -> dict:
  """Dense float32 matmul FLOP/s at a few sizes; the best is the MFU denominator."""
  sizes = (512, 1024, 2048) if jax.default_backend() == "cpu" else (2048, 4096, 8192)
  rates = {n: metrics.measure_peak_flops(n, jnp.float32, repeats=5) for n in sizes}
  return {"by_size": {str(n): r for n, r in rates.items()}, "peak": max(rates.values())}


def _row(rows, **match):
  for r in rows:
    if all(r.get(k) == v for k, v in match.items()):
      return r
  return None


def targets(train: list[dict], gen: list[dict], brier: list[dict]) -> list[dict]:
  """The issue's targets on the tiny size: measured value, goal, met."""
  ref = common.REFERENCE_TINY
  out = []

  def add(name, value, goal, unit=""):
    if value is not None:
      out.append({"target": name, "value": value, "goal": goal, "met": value >= goal,
                  "unit": unit})

  tr = {r["stage"]: r for r in train if r["size"] == "tiny"}
  if tr:
    add("AE step tokens/s ≥ 1.5× ref 1744", tr["autoencoder"]["tokens_per_s"],
        1.5 * ref["ae_step_tokens_per_s"])
    add("CALM step tokens/s ≥ 2× ref 2995", tr["calm"]["tokens_per_s"],
        2 * ref["calm_step_tokens_per_s"])
    add("CALM step MFU ≥ 50%", tr["calm"]["mfu"], 0.5)
    add("CALM / AR training tokens/s ≥ 3", tr["calm"]["tokens_per_s"] / tr["ar"]["tokens_per_s"],
        3.0)
  for sampler in ("exact", "batch"):
    r = _row(gen, size="tiny", mode=f"calm_T0.5_{sampler}", batch=1)
    add(f"gen CALM T=0.5 {sampler} bs1 ≥ 10× ref 28.3", r and r["tokens_per_s"],
        10 * ref["gen_calm_T0.5_bs1"])
  for b in (1, 8):
    c, a = _row(gen, size="tiny", mode="calm_T1", batch=b), _row(gen, size="tiny", mode="ar_T1",
                                                                   batch=b)
    if c and a:
      add(f"gen CALM T=1 / AR bs{b} ≥ 3", c["tokens_per_s"] / a["tokens_per_s"], 3.0)
  for model, stage in (("calm", "calm"), ("calm_collide", "calm"), ("ar", "ar")):
    r = _row(brier, size="tiny", model=model)
    if r and stage in tr:
      add(f"BrierLM {model} / {stage} step tokens/s ≥ 1",
          r["tokens_per_s"] / tr[stage]["tokens_per_s"], 1.0)
  return out


def markdown(info: dict, peak: dict, train: list[dict], gen: list[dict], brier: list[dict],
             tgt: list[dict], load: tuple[float, float], wall_s: float) -> str:
  ref = common.REFERENCE_TINY
  lines = [
      f"### Performance ({info['date']})",
      "",
      f"Machine: {info['nproc']} cores of {info['cpu']} ({info['backend']}), "
      f"jax {info['jax']}, flax {info['flax']}, optax {info['optax']}, Python {info['python']}; "
      f"float32. Load average {load[0]:.1f} → {load[1]:.1f} during the run (the machine is "
      f"shared: absolute rates move with the load, ratios measured in one interleaved run much "
      f"less). `make bench` took {wall_s / 60:.1f} min.",
      "",
      f"Matmul peak through JAX (MFU denominator): {peak['peak'] / 1e9:.1f} GFLOP/s "
      f"(best of n = {', '.join(peak['by_size'])} square float32 matmuls).",
      "",
      "Training step (`trainer.setup`, as `trainer.train` runs it; donated state, random ids):",
      "",
      "| size | stage | batch×seq | params | compile s | step ms | tokens/s | vs ref | "
      "model MFLOP/token | XLA/model FLOPs | MFU | peak RSS MiB |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  refs = {"autoencoder": ref["ae_step_tokens_per_s"], "calm": ref["calm_step_tokens_per_s"]}
  for r in train:
    vs = (f"{r['tokens_per_s'] / refs[r['stage']]:.2f}×"
          if r["size"] == "tiny" and r["stage"] in refs else "-")
    lines.append(
        f"| {r['size']} | {r['stage']} | {r['batch']}×{r['seq']} | {r['params'] / 1e6:.1f}M | "
        f"{r['compile_s']:.1f} | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:,.0f} | {vs} | "
        f"{r['model_flops_per_token'] / 1e6:.1f} | {r['flops_ratio_xla_over_model']:.2f} | "
        f"{r['mfu']:.1%} | {r['peak_memory_mib']:.0f} |")
  gref = {("calm_T1", 1): ref["gen_calm_T1_bs1"], ("calm_T1", 8): ref["gen_calm_T1_bs8"],
          ("calm_T0.5_batch", 1): ref["gen_calm_T0.5_bs1"],
          ("calm_T0.5_batch", 8): ref["gen_calm_T0.5_bs8"],
          ("calm_T0.5_exact", 1): ref["gen_calm_T0.5_bs1"],
          ("calm_T0.5_exact", 8): ref["gen_calm_T0.5_bs8"]}
  lines += ["", f"Generation ({bench_generate.PROMPT_TOKENS}-token prompts, KV cache, "
            "`lax.while_loop`; exact sampler on a peaked head, see bench/bench_generate.py):", "",
            "| size | mode | batch | new tokens | tokens/s | vs ref | draws/chunk | "
            "compile+first s |", "|---|---|---|---|---|---|---|---|"]
  for r in gen:
    g = gref.get((r["mode"], r["batch"])) if r["size"] == "tiny" else None
    vs = f"{r['tokens_per_s'] / g:.1f}×" if g else "-"
    lines.append(f"| {r['size']} | {r['mode']} | {r['batch']} | {r['new_tokens']} | "
                 f"{r['tokens_per_s']:,.1f} | {vs} | "
                 f"{common.fmt(r['mean_draws'], 1)} | {r['compile_and_first_s']:.1f} |")
  lines += ["", "BrierLM evaluation (`evaluate.score_documents`):", "",
            "| size | model | block | tokens | scored positions | tokens/s | compile+first s |",
            "|---|---|---|---|---|---|---|"]
  for r in brier:
    lines.append(f"| {r['size']} | {r['model']} | {r['block_tokens']} | "
                 f"{r['documents'] * r['doc_tokens']} | {r['scored_positions']} | "
                 f"{r['tokens_per_s']:,.0f} | {r['compile_and_first_s']:.1f} |")
  lines += ["", "Targets (tiny):", "", "| target | measured | goal | met |", "|---|---|---|---|"]
  for t in tgt:
    fmt = (lambda v: f"{v:.1%}") if "MFU" in t["target"] else (lambda v: f"{v:,.2f}")
    lines.append(f"| {t['target']} | {fmt(t['value'])} | {fmt(t['goal'])} | "
                 f"{'yes' if t['met'] else 'no'} |")
  return "\n".join(lines) + "\n"


@cli
def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="tiny")
  ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
  ap.add_argument("--data", action="store_true", help="also run bench.bench_data")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  sizes = args.sizes.split(",")
  info, load0 = common.machine(), common.load_average()
  print(f"{info['nproc']} cores of {info['cpu']}, jax {info['jax']}, flax {info['flax']}, "
        f"load average {load0:.1f}", flush=True)
  peak = matmul_peak()
  print("matmul peak: " + ", ".join(f"n={n} {r / 1e9:.1f}" for n, r in peak["by_size"].items())
        + " GFLOP/s", flush=True)
  rounds = 2 if args.quick else 3
  train = bench_train.run(sizes, steps=2, rounds=rounds, peak=peak["peak"])
  bench_train.print_rows(train)
  gen = bench_generate.run(sizes, [1, 8], rounds=2)
  bench_generate.print_rows(gen)
  brier = bench_brier.run(sizes, rounds=1 if args.quick else 2)
  bench_brier.print_rows(brier)
  tgt = targets(train, gen, brier)
  print(f"\n{'target':<44} {'measured':>10} {'goal':>10}  met")
  for t in tgt:
    print(f"{t['target']:<44} {t['value']:>10,.3g} {t['goal']:>10,.3g}  "
          f"{'yes' if t['met'] else 'NO'}")
  load = (load0, common.load_average())
  wall = time.perf_counter() - t0
  common.RESULTS.mkdir(parents=True, exist_ok=True)
  for name, rows in (("train", train), ("generate", gen), ("brier", brier)):
    (common.RESULTS / f"{name}.json").write_text(json.dumps(
        {"machine": info, "peak_flops": peak["peak"], "load_average": load, "rows": rows},
        indent=2))
  (common.RESULTS / "all.json").write_text(json.dumps(
      {"machine": info, "matmul": peak, "load_average_start": load[0],
       "load_average_end": load[1], "wall_s": wall, "train": train, "generate": gen,
       "brier": brier, "targets": tgt, "reference_tiny": common.REFERENCE_TINY}, indent=2))
  md = markdown(info, peak, train, gen, brier, tgt, load, wall)
  (common.RESULTS / "README_perf.md").write_text(md)
  print(f"\nwrote {common.RESULTS}/all.json and README_perf.md in {wall / 60:.1f} min "
        f"(load average {load[0]:.1f} → {load[1]:.1f})")
  if args.data:
    from bench import bench_data
    bench_data.main([])
  return 0


if __name__ == "__main__":
  sys.exit(main())
