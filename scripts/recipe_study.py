"""CALM recipe study at fixed training compute: one factor at a time from a base recipe.

  python scripts/recipe_study.py [--base-steps 150 | --budget-tflop T] [--only base,lr3e-3]
      [--out runs/study]

Every variant trains CALM (and, where its autoencoder differs, that autoencoder first) with
`train.py` on the demo's data, for as many steps as the CALM training FLOPs budget buys at its own
FLOPs per token (calm/metrics.py model_flops_per_token); then `calm.evaluate` scores it. Finished
runs are reused, so a rerun only adds what is missing. Writes OUT/study.json and OUT/study.md:
normalised score (first training eval; final one on --eval-batches held-out batches), held-out
energy loss and its reference lines, BrierLM with its 95% interval. Raise --budget-tflop (and
--ae-steps) to rerun at a larger budget.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calm import config, data, evaluate, metrics, paths, run  # noqa: E402
import study_runs  # noqa: E402  (scripts/study_runs.py)

BASE = "configs/demo.yaml"
AE_BASE = {"train.lr": 2e-3}
# name: (autoencoder overrides, CALM overrides); both stages see the model overrides.
VARIANTS: dict[str, tuple[dict, dict]] = {
    "base": ({}, {}),
    "lr3e-4": ({}, {"train.lr": 3e-4}),
    "lr3e-3": ({}, {"train.lr": 3e-3}),
    "head1": ({}, {"model.head.num_blocks": 1}),
    "head4": ({}, {"model.head.num_blocks": 4}),
    "noise8": ({}, {"model.head.noise_dim": 8}),
    "noise128": ({}, {"model.head.noise_dim": 128}),
    "N4": ({}, {"model.head.num_samples": 4}),
    "N16": ({}, {"model.head.num_samples": 16}),
    "M8": ({}, {"model.head.num_target_samples": 8}),
    "M100": ({}, {"model.head.num_target_samples": 100}),
    "batch8": ({}, {"train.batch_size": 8}),
    "batch32": ({}, {"train.batch_size": 32}),
    "ae-half": ({"train.steps": 150}, {}),
    "ae2x": ({"train.steps": 600}, {}),
    "latent16": ({"model.latent_dim": 16}, {"model.latent_dim": 16}),
    "latent64": ({"model.latent_dim": 64}, {"model.latent_dim": 64}),
    "kl1e-2": ({"model.autoencoder.kl_weight": 1e-2}, {}),
    "klclamp0": ({"model.autoencoder.kl_clamp": 0.0}, {}),
    # two factors that helped at 150 steps, together
    "lr3e-3+N4": ({}, {"train.lr": 3e-3, "model.head.num_samples": 4}),
}
MODEL_KEYS = ("model.latent_dim",)


def _args(d: dict) -> list[str]:
  return [f"{k}={v}" for k, v in d.items()]


_run, _finished = study_runs.run, study_runs.finished


def _last(rows: list[dict], key: str) -> float | None:
  vals = [r[key] for r in rows if key in r]
  return vals[-1] if vals else None


def run_variant(name: str, out: pathlib.Path, budget_flop: float, ae_steps: int,
                eval_docs: int, eval_batches: int) -> dict:
  ae_over, calm_over = VARIANTS[name]
  ae_over = {"train.steps": ae_steps, **AE_BASE, **ae_over}
  tag = hashlib.sha1(json.dumps(ae_over, sort_keys=True).encode()).hexdigest()[:8]
  ae_dir = out / f"ae-{tag}"
  if not _finished(ae_dir, ae_over["train.steps"]):
    _run(["train.py", "--config", BASE, "stage=autoencoder", f"run_dir={ae_dir}",
          *_args(ae_over)])
  model_over = {k: v for k, v in ae_over.items() if k in MODEL_KEYS}
  over = {**model_over, **calm_over}
  cfg = config.load(ROOT / BASE, ["stage=calm", *_args(over)])
  tokens_per_step = cfg.train.batch_size * cfg.data.block_tokens
  flop_per_token = metrics.model_flops_per_token(cfg)
  steps = max(1, round(budget_flop / (flop_per_token * tokens_per_step)))
  run_dir = out / name
  if not _finished(run_dir, steps):
    _run(["train.py", "--config", BASE, "stage=calm", f"run_dir={run_dir}",
          f"train.autoencoder={ae_dir}", f"train.steps={steps}",
          f"train.eval_every={max(1, steps // 6)}", f"checkpoint.every={steps}",
          f"train.warmup_steps={min(cfg.train.warmup_steps, steps // 5)}", *_args(over)])
  if not (run_dir / "brierlm.json").is_file():
    _run(["-m", "calm.evaluate", "--config", str(run_dir / "config.yaml"), "--out",
          str(run_dir / "brierlm.json"), f"eval.max_documents={eval_docs}"])
  ev = [r for r in metrics.read_jsonl(run_dir / "metrics.jsonl") if "eval/norm_score" in r]
  brier = json.loads((run_dir / "brierlm.json").read_text())
  # the final energy numbers on more held-out batches than training evaluates (less noise)
  ecfg = paths.load_config(run_dir / "config.yaml", [f"train.eval_batches={eval_batches}"])
  r = run.load(ecfg)
  tokens = data.token_stream(ecfg.data.eval, ecfg.data, r.tokenizer)
  brier["energy"] = evaluate.energy_report(ecfg, r.loaded, r.autoencoder.model, tokens,
                                           ecfg.data.eval)
  ae_rows = metrics.read_jsonl(ae_dir / "metrics.jsonl")
  return {"name": name, "autoencoder": ae_over, "calm": over, "steps": steps,
          "tokens": steps * tokens_per_step, "flop": steps * tokens_per_step * flop_per_token,
          "ae_token_acc": _last(ae_rows, "eval/token_acc"),
          "norm_score_first": ev[0]["eval/norm_score"], "first_step": ev[0]["step"],
          "norm_score": brier["energy"]["norm_score"], "loss": brier["energy"]["loss"],
          "baseline_loss": brier["energy"]["baseline_loss"],
          "oracle_loss": brier["energy"]["oracle_loss"], "brierlm": brier["brierlm"],
          "brierlm_ci95": brier["brierlm_ci95"]}


def table(rows: list[dict]) -> str:
  out = ["| variant | change | steps | tokens | AE acc | norm. score (first → last) | "
         "energy loss (baseline / oracle) | BrierLM [95% CI] |", "|---" * 8 + "|"]
  for r in rows:
    ae = {f"ae:{k}": v for k, v in r["autoencoder"].items()
          if k not in r["calm"] and r["autoencoder"] != rows[0]["autoencoder"]
          and v != rows[0]["autoencoder"].get(k)}
    change = ", ".join(_args({**r["calm"], **ae})) or "-"
    lo, hi = r["brierlm_ci95"]
    out.append(f"| {r['name']} | {change} | {r['steps']} | {r['tokens'] / 1e6:.2f}M | "
               f"{r['ae_token_acc']:.3f} | {r['norm_score_first']:+.3f} → {r['norm_score']:+.3f} | "
               f"{r['loss']:.3f} ({r['baseline_loss']:.3f} / {r['oracle_loss']:.3f}) | "
               f"{r['brierlm']:.3f} [{lo:.3f}, {hi:.3f}] |")
  return "\n".join(out)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="runs/study")
  ap.add_argument("--only", default="", help="comma-separated variants (default all)")
  ap.add_argument("--budget-tflop", type=float, default=0.0,
                  help="CALM training FLOPs per variant (default: --base-steps of the base)")
  ap.add_argument("--base-steps", type=int, default=150, help="base recipe steps in the budget")
  ap.add_argument("--ae-steps", type=int, default=300, help="base autoencoder training steps")
  ap.add_argument("--eval-docs", type=int, default=400, help="held-out paragraphs for BrierLM")
  ap.add_argument("--eval-batches", type=int, default=32,
                  help="held-out batches for the final energy loss and normalised score")
  args = ap.parse_args(argv)
  out = ROOT / args.out
  out.mkdir(parents=True, exist_ok=True)
  base = config.load(ROOT / BASE, ["stage=calm"])
  base_tokens = args.base_steps * base.train.batch_size * base.data.block_tokens
  budget = args.budget_tflop * 1e12 or base_tokens * metrics.model_flops_per_token(base)
  names = [n for n in args.only.split(",") if n] or list(VARIANTS)
  unknown = set(names) - set(VARIANTS)
  if unknown:
    print(f"error: unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    return 2
  for name in names:
    result = run_variant(name, out, budget, args.ae_steps, args.eval_docs, args.eval_batches)
    (out / name / "result.json").write_text(json.dumps(result, indent=2))
    # every finished variant, also those of other invocations sharing OUT
    rows = [json.loads((out / n / "result.json").read_text()) for n in VARIANTS
            if (out / n / "result.json").is_file()]
    (out / "study.json").write_text(json.dumps({"budget_flop": budget, "runs": rows}, indent=2))
    (out / "study.md").write_text(
        f"CALM training budget {budget / 1e12:.2f} TFLOP per variant\n\n{table(rows)}\n")
    print(table(rows), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
