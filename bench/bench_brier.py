"""BrierLM evaluation throughput (`evaluate.score_documents`) for CALM and the AR baseline.

  python -m bench.bench_brier [--sizes tiny] [--rounds 2] [--vs-train] [--out FILE]

Random documents of random token ids, cut into blocks of the size's sequence length; tokens/s
counts the block tokens scored per second (compilation is the first call, timed separately).
CALM decodes a sample's token only while it can change a Brier indicator, so its cost depends on
the model: `calm` (random head output: the two samples rarely share a first token) is the least
work, `calm_collide` (zero head output: the samples always agree, every token of both is
decoded) the most; a trained model lies between. With --vs-train the CALM and AR training
steps of the same size (batch × block) are timed interleaved with the evaluations, and each
evaluation row gets `train_tokens_per_s` and `eval_over_train`.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench import common
from bench.bench_generate import build_models
from calm import evaluate
from calm.errors import cli

DOCS, DOC_TOKENS, BATCH = 8, 1024, 8
TRAIN_STEPS = 4  # steps per training timing: as many tokens as one evaluation timing


def run(sizes: list[str], rounds: int, vs_train: bool = False) -> list[dict]:
  rows = []
  for name in sizes:
    size = common.SIZES[name]
    calm, peaked, ae, ar = build_models(size)
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, size.model.vocab_size, DOC_TOKENS).astype(np.int32)
            for _ in range(DOCS)]
    kinds = {"calm": ("calm", (calm, ae)), "calm_collide": ("calm", (peaked, ae)),
             "ar": ("ar", (ar,))}

    def score(kind):
      stage, models = kinds[kind]
      return evaluate.score_documents(stage, models, docs, block_tokens=size.seq,
                                      chunk_size=size.model.chunk_size, batch_size=BATCH,
                                      seed=0, pad_id=0)
    first, positions = {}, {}
    for kind in kinds:
      t = time.perf_counter()
      est, _ = score(kind)
      first[kind] = time.perf_counter() - t
      positions[kind] = len(est)
      print(f"  {name} brier {kind}: first call {first[kind]:.1f}s", flush=True)
    timers = {k: (lambda k=k: common.timed(lambda: score(k))[0]) for k in kinds}
    steps = {}
    if vs_train:
      from bench import bench_train

      for stage in ("calm", "ar"):
        steps[stage] = bench_train.build_step(size, stage)
        steps[stage].run(1)
        timers[f"train-{stage}"] = lambda k=stage: steps[k].run(TRAIN_STEPS)
    times = common.interleave(timers, rounds)
    for kind, secs in ((k, times[k]) for k in kinds):
      t = common.summary(secs)
      rows.append({"size": name, "model": kind, "documents": DOCS, "doc_tokens": DOC_TOKENS,
                   "block_tokens": size.seq, "batch": BATCH, "scored_positions": positions[kind],
                   "seconds": t["median_s"], "spread": t["spread"],
                   "tokens_per_s": DOCS * DOC_TOKENS / t["median_s"],
                   "compile_and_first_s": first[kind]})
      stage = kinds[kind][0]
      if stage in steps:
        train = size.batch * size.seq * TRAIN_STEPS / common.summary(times[f"train-{stage}"])[
            "median_s"]
        rows[-1].update(train_tokens_per_s=train,
                        eval_over_train=rows[-1]["tokens_per_s"] / train)
  return rows


def print_rows(rows: list[dict]) -> None:
  print(f"{'size':<6} {'model':<12} {'tokens':>7} {'positions':>9} {'tokens/s':>9} {'first s':>8}"
        f" {'train tok/s':>11} {'eval/train':>10}")
  for r in rows:
    train = (f" {r['train_tokens_per_s']:>11,.0f} {r['eval_over_train']:>10.2f}"
             if "train_tokens_per_s" in r else "")
    print(f"{r['size']:<6} {r['model']:<12} {r['documents'] * r['doc_tokens']:>7} "
          f"{r['scored_positions']:>9} {r['tokens_per_s']:>9,.0f} {r['compile_and_first_s']:>8.1f}"
          + train)


@cli
def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="tiny")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--vs-train", action="store_true",
                  help="also time the CALM and AR training steps, interleaved")
  ap.add_argument("--out", default=str(common.RESULTS / "brier.json"))
  args = ap.parse_args(argv)
  info, load0 = common.machine(), common.load_average()
  rows = run(args.sizes.split(","), args.rounds, args.vs_train)
  print_rows(rows)
  common.write_results(args.out, rows, info, load0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
