"""Warm start study at equal total training FLOPs: CALM from scratch against AR pre-training
followed by CALM with `train.init_backbone`, and AR alone.

  python scripts/warm_start_study.py [--scales 1,4] [--arms scratch,warm50,warm25,ar]
      [--ae runs/demo/ae] [--out runs/warm_study] [--base-steps 150]

The budget at scale 1 is the recipe study's (docs/learning.md): --base-steps steps of the demo's
CALM at its FLOPs per token (2.57 TFLOP). Each arm spends scale × that budget in training FLOPs
(`metrics.model_flops_per_token` of each stage, the AR pre-training counted against the
warm-started arm): `scratch` all CALM, `warm50` ½ AR then ½ CALM, `warm25` ¼ AR then ¾ CALM, `ar`
all AR. Every CALM arm uses the same autoencoder (--ae; trained there with the demo's recipe if
it is missing), so the energy reference lines are the same for all of them and their held-out
losses are compared batch by batch (paired standard errors). Finished runs are reused, so a rerun
only adds what is missing. Writes OUT/study.json, OUT/study.md and OUT/curves.png.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calm import checkpoint, config, data, metrics, paths, run  # noqa: E402
import study_runs  # noqa: E402  (scripts/study_runs.py)

BASE = "configs/demo.yaml"
AE_RECIPE = ["train.lr=2e-3", "train.steps=300"]  # the demo's autoencoder (scripts/demo.sh)
# arm: (share of the budget spent on AR pre-training, whether a CALM stage follows)
ARMS: dict[str, tuple[float, bool]] = {
    "scratch": (0.0, True),
    "warm50": (0.5, True),
    "warm25": (0.25, True),
    "ar": (1.0, False),
    # CALM at the whole budget from an AR run that already exists (--owned-ar; its training
    # FLOPs are not counted: the case of a user who already owns a trained Transformer)
    "owned": (0.0, True),
}
LABELS = {"scratch": "CALM from scratch", "warm50": "AR ½ → CALM ½", "warm25": "AR ¼ → CALM ¾",
          "ar": "AR alone", "owned": "owned AR → CALM (AR not counted)"}


_run, _finished = study_runs.run, study_runs.finished


def _steps(flop: float, cfg: config.Config) -> tuple[int, float]:
  """(steps that `flop` training FLOPs buy, FLOPs per step) of a stage's config."""
  per_step = metrics.model_flops_per_token(cfg) * cfg.train.batch_size * cfg.data.block_tokens
  return max(1, round(flop / per_step)), per_step


def _schedule(steps: int) -> list[str]:
  """The recipe study's schedule for a run of `steps` steps (evals, one checkpoint, warm-up)."""
  return [f"train.steps={steps}", f"train.eval_every={max(1, steps // 6)}",
          f"checkpoint.every={steps}", f"train.warmup_steps={min(30, steps // 5)}"]


def train_stage(stage: str, run_dir: pathlib.Path, steps: int, extra: list[str]) -> None:
  if not _finished(run_dir, steps):
    _run(["train.py", "--config", BASE, f"stage={stage}", f"run_dir={run_dir}",
          *_schedule(steps), *extra])


def energy_batches(run_dir: pathlib.Path, eval_batches: int) -> dict:
  """Held-out energy loss per evaluation batch, with the reference lines (as
  `evaluate.energy_report`, on `eval_batches` batches, keeping the per-batch values)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from calm import losses, rng

  cfg = paths.load_config(run_dir / "config.yaml", [f"train.eval_batches={eval_batches}"])
  r = run.load(cfg)
  tokens = data.token_stream(cfg.data.eval, cfg.data, r.tokenizer)
  bs, micro = cfg.train.batch_size, cfg.train.micro_batch
  blocks = np.asarray(data.pack_blocks(tokens, cfg.data.block_tokens, what=cfg.data.eval))
  n = min((len(blocks) // bs) * bs, eval_batches * bs)
  graphdef, params = nnx.split(r.model)
  ae_graphdef, ae_params = nnx.split(r.autoencoder.model)
  loss = jax.jit(lambda p, a, ids, key: losses.calm_loss(
      nnx.merge(graphdef, p), nnx.merge(ae_graphdef, a), ids, key, cfg.model)[1]["loss"])
  batches = [jnp.asarray(blocks[i:i + micro]) for i in range(0, n, micro)]
  keys = [rng.eval_row_keys(cfg.seed, i, micro) for i in range(0, n, micro)]
  per_batch = [float(loss(params, ae_params, b, k)) for b, k in zip(batches, keys)]
  refs = metrics.energy_references(ae_graphdef, ae_params, batches, keys, cfg.model)
  return {"loss_batches": per_batch, **refs}


def _score(e: dict) -> tuple[float, float]:
  """(normalised score, its standard error over evaluation batches; references held fixed)."""
  span = e["baseline_loss"] - e["oracle_loss"]
  l = np.asarray(e["loss_batches"])
  return (e["baseline_loss"] - l.mean()) / span, l.std(ddof=1) / math.sqrt(len(l)) / span


def brier(run_dir: pathlib.Path, eval_docs: int) -> dict:
  out = run_dir / "brierlm.json"
  if not out.is_file():
    _run(["-m", "calm.evaluate", "--config", str(run_dir / "config.yaml"), "--out", str(out),
          f"eval.max_documents={eval_docs}"])
  b = json.loads(out.read_text())
  return {k: b[k] for k in ("brier", "brier_se", "brierlm", "brierlm_se", "brierlm_ci95")}


def run_arm(arm: str, scale: float, budget: float, ae: pathlib.Path, out: pathlib.Path,
            eval_docs: int, eval_batches: int, owned: pathlib.Path | None = None) -> dict:
  share, has_calm = ARMS[arm]
  root = out / f"x{scale:g}" / arm
  tok = f"data.tokenizer={ae / 'tokenizer.json'}"
  res: dict = {"arm": arm, "scale": scale, "budget_flop": budget, "ar_share": share}
  warm: list[str] = []
  if arm == "owned":
    warm = [f"train.init_backbone={owned}"]
    res["owned_ar"] = f"{owned} step {checkpoint.read_metadata(owned)[0]}"
  if share > 0:
    ar_cfg = config.load(ROOT / BASE, ["stage=ar"])
    steps, per_step = _steps(share * budget, ar_cfg)
    train_stage("ar", root / "ar", steps, [tok])
    res.update(ar_steps=steps, ar_flop=steps * per_step,
               ar_tokens=steps * ar_cfg.train.batch_size * ar_cfg.data.block_tokens)
    warm = [f"train.init_backbone={root / 'ar'}"]
    if not has_calm:
      res["ar_brier"] = brier(root / "ar", eval_docs)
  if has_calm:
    calm_cfg = config.load(ROOT / BASE, ["stage=calm"])
    steps, per_step = _steps((1 - share) * budget, calm_cfg)
    train_stage("calm", root / "calm", steps, [f"train.autoencoder={ae}", *warm])
    res.update(calm_steps=steps, calm_flop=steps * per_step,
               calm_tokens=steps * calm_cfg.train.batch_size * calm_cfg.data.block_tokens)
    cached = root / "calm" / "energy_batches.json"
    if cached.is_file() and json.loads(cached.read_text()).get("eval_batches") == eval_batches:
      e = json.loads(cached.read_text())
    else:
      e = {**energy_batches(root / "calm", eval_batches), "eval_batches": eval_batches}
      cached.write_text(json.dumps(e))
    res["energy"] = e
    res["norm_score"], res["norm_score_se"] = _score(e)
    res["calm_brier"] = brier(root / "calm", eval_docs)
    ev = [r for r in metrics.read_jsonl(root / "calm" / "metrics.jsonl") if "eval/norm_score" in r]
    res["norm_score_first"] = ev[0]["eval/norm_score"] if ev else None
  res["flop"] = res.get("ar_flop", 0.0) + res.get("calm_flop", 0.0)
  return res


def paired_effect(a: dict, b: dict) -> tuple[float, float] | None:
  """Normalised score of `a` minus `b` and its standard error from the per-batch differences
  (the same batches and keys; None when their reference lines differ)."""
  ea, eb = a["energy"], b["energy"]
  if not all(math.isclose(ea[k], eb[k], rel_tol=1e-6) for k in ("baseline_loss", "oracle_loss")):
    return None
  span = ea["baseline_loss"] - ea["oracle_loss"]
  d = np.asarray(eb["loss_batches"]) - np.asarray(ea["loss_batches"])
  return d.mean() / span, d.std(ddof=1) / math.sqrt(len(d)) / span


def _ci(b: dict) -> str:
  lo, hi = b["brierlm_ci95"] or (float("nan"), float("nan"))
  return f"{b['brierlm']:.3f} [{lo:.3f}, {hi:.3f}]"


def table(rows: list[dict]) -> str:
  out = ["| budget | arm | AR steps / tokens | CALM steps / tokens | total TFLOP | "
         "norm. score ± SE | Δ vs scratch ± SE | energy loss (baseline / oracle) | "
         "Brier-1..4 (± SE) | BrierLM [95% CI] |", "|---" * 10 + "|"]
  scratch = {r["scale"]: r for r in rows if r["arm"] == "scratch"}
  for r in rows:
    ar = (f"{r['ar_steps']} / {r['ar_tokens'] / 1e6:.2f}M" if "ar_steps" in r else "-")
    cm = (f"{r['calm_steps']} / {r['calm_tokens'] / 1e6:.2f}M" if "calm_steps" in r else "-")
    if "energy" in r:
      e, b = r["energy"], r["calm_brier"]
      score = f"{r['norm_score']:+.3f} ± {r['norm_score_se']:.3f}"
      base = scratch.get(r["scale"])
      eff = paired_effect(r, base) if base is not None and base is not r else None
      delta = f"{eff[0]:+.4f} ± {eff[1]:.4f}" if eff else "-"
      loss = (f"{np.mean(e['loss_batches']):.3f} ({e['baseline_loss']:.3f} / "
              f"{e['oracle_loss']:.3f})")
      briers = ", ".join(f"{v:.3f}±{s:.3f}" for v, s in zip(b["brier"], b["brier_se"]))
      lm = _ci(b)
    else:
      b = r["ar_brier"]
      score = delta = loss = "-"
      briers = ", ".join(f"{v:.3f}±{s:.3f}" for v, s in zip(b["brier"], b["brier_se"]))
      lm = _ci(b) + " (AR)"
    out.append(f"| {r['scale']:g}× | {LABELS[r['arm']]} | {ar} | {cm} | {r['flop'] / 1e12:.2f} | "
               f"{score} | {delta} | {loss} | {briers} | {lm} |")
  return "\n".join(out)


def curves(rows: list[dict], out: pathlib.Path, png: pathlib.Path) -> None:
  """Training-time normalised score against total training FLOPs (AR pre-training included)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  scales = sorted({r["scale"] for r in rows})
  fig, axes = plt.subplots(1, len(scales), figsize=(5.5 * len(scales), 3.8), squeeze=False)
  for ax, scale in zip(axes[0], scales):
    for r in rows:
      if r["scale"] != scale or "calm_steps" not in r:
        continue
      run_dir = out / f"x{scale:g}" / r["arm"] / "calm"
      per_step = r["calm_flop"] / r["calm_steps"]
      pts = [(r.get("ar_flop", 0.0) + row["step"] * per_step, row["eval/norm_score"])
             for row in metrics.read_jsonl(run_dir / "metrics.jsonl") if "eval/norm_score" in row]
      xs, ys = zip(*pts)
      ax.plot(np.asarray(xs) / 1e12, ys, marker=".", label=LABELS[r["arm"]])
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xlabel("total training TFLOP (AR pre-training included)")
    ax.set_ylabel("normalised score (training evals)")
    ax.set_title(f"{scale:g}× budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(png, dpi=110)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="runs/warm_study")
  ap.add_argument("--ae", default="runs/demo/ae", help="autoencoder run (trained if missing)")
  ap.add_argument("--scales", default="1,4", help="budgets as multiples of the base budget")
  ap.add_argument("--arms", default=",".join(a for a in ARMS if a != "owned"),
                  help=f"of {', '.join(ARMS)}")
  ap.add_argument("--base-steps", type=int, default=150,
                  help="steps of the demo's CALM that make the base budget")
  ap.add_argument("--eval-docs", type=int, default=400, help="held-out paragraphs for BrierLM")
  ap.add_argument("--eval-batches", type=int, default=32,
                  help="held-out batches for the energy loss and normalised score")
  ap.add_argument("--owned-ar", default="",
                  help="an existing AR run on the same tokenizer: adds the arm `owned`")
  ap.add_argument("--table-only", action="store_true",
                  help="only rebuild the table and curves from the arms already finished")
  args = ap.parse_args(argv)
  arms = [a for a in args.arms.split(",") if a and (a != "owned" or args.owned_ar)]
  if args.owned_ar and "owned" not in arms:
    arms.append("owned")
  unknown = set(arms) - set(ARMS)
  if unknown:
    print(f"error: unknown arms {sorted(unknown)}; known: {', '.join(ARMS)}", file=sys.stderr)
    return 2
  scales = [float(s) for s in args.scales.split(",") if s]
  out, ae = ROOT / args.out, (ROOT / args.ae).resolve()
  out.mkdir(parents=True, exist_ok=True)
  if not checkpoint.has_checkpoint(ae):
    _run(["train.py", "--config", BASE, "stage=autoencoder", f"run_dir={ae}", *AE_RECIPE])
  calm_cfg = config.load(ROOT / BASE, ["stage=calm"])
  base = _steps(0, calm_cfg)[1] * args.base_steps
  if args.table_only:
    report(out, base, ae)
    return 0
  for scale in scales:  # every arm at one budget before the next budget
    for arm in arms:
      res = run_arm(arm, scale, scale * base, ae, out, args.eval_docs, args.eval_batches,
                    pathlib.Path(args.owned_ar).resolve() if args.owned_ar else None)
      (out / f"x{scale:g}" / arm / "result.json").write_text(json.dumps(res, indent=2))
      report(out, base, ae)
  return 0


def report(out: pathlib.Path, base: float, ae: pathlib.Path) -> None:
  """OUT/study.json, study.md and curves.png from every finished arm under OUT."""
  rows = [json.loads(p.read_text()) for p in sorted(out.glob("x*/*/result.json"))]
  rows.sort(key=lambda r: (r["scale"], list(ARMS).index(r["arm"])))
  (out / "study.json").write_text(json.dumps({"base_budget_flop": base, "autoencoder": str(ae),
                                              "runs": rows}, indent=2))
  text = table(rows)
  (out / "study.md").write_text(f"base budget {base / 1e12:.2f} TFLOP per arm\n\n{text}\n")
  curves(rows, out, out / "curves.png")
  print(text, flush=True)


if __name__ == "__main__":
  sys.exit(main())
