"""Plots training / evaluation curves of runs from their metrics.jsonl.

  python scripts/plot_curves.py --out docs/ae_curve.png runs/ae_gutenberg:train/loss,eval/token_acc
  python scripts/plot_curves.py --out docs/calm.png \
      runs/calm:eval/loss+eval/baseline_loss+eval/oracle_loss,eval/norm_score
"""

import argparse
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(run: pathlib.Path, key: str) -> tuple[list[int], list[float]]:
  xs, ys = [], []
  for line in (run / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if key in row:
      xs.append(row["step"])
      ys.append(row[key])
  return xs, ys


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--title", default="")
  ap.add_argument("--logy", action="store_true")
  ap.add_argument("specs", nargs="+", help="RUN_DIR:key1,key2 (one panel per key)")
  args = ap.parse_args(argv)
  panels: dict[str, list[tuple[str, list, list]]] = {}
  for spec in args.specs:
    run, keys = spec.rsplit(":", 1)
    for panel in keys.split(","):  # "a+b" draws keys a and b in one panel
      for key in panel.split("+"):
        xs, ys = series(pathlib.Path(run), key)
        label = pathlib.Path(run).name + ("" if key == panel else f" {key.split('/')[-1]}")
        panels.setdefault(panel, []).append((label, xs, ys))
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
  for ax, (key, lines) in zip(axes[0], panels.items()):
    for name, xs, ys in lines:
      ref = name.endswith(("baseline_loss", "oracle_loss"))  # reference lines dashed
      ax.plot(xs, ys, "--" if ref else "-", marker=None if ref or len(xs) >= 40 else ".",
              label=name)
    ax.set_xlabel("step")
    ax.set_title(key)
    if args.logy:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if args.title:
    fig.suptitle(args.title)
  fig.tight_layout()
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
