"""Data pipeline throughput on the shipped slice: tokenisation and Grain batching, tokens/s.

  python -m bench.bench_data [--out bench/results/data.json] [--vocab 512,8192]

The tokenizer is trained once per vocabulary outside the timings. Three paths are timed:
  tokenize    read + decode + encode_batch + EOS packing of the training slice (cold start)
  batch       TrainIterator batches from the cached token stream (the steady-state path)
  end_to_end  cold make_train_iterator (tokenise, cache) + one epoch of batches; and the warm
              restart (cache hit) + one epoch
Every rate is the best of --repeats runs (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import sys
import tempfile
import time

import numpy as np

from calm import config
from calm import data as D
from calm.errors import cli
from calm.tokenizer import train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SLICE = ROOT / "data" / "gutenberg-slice" / "train"


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
  return r.ru_utime + r.ru_stime


def _best_of(fn, repeats: int) -> tuple[float, object, float]:
  """(best wall seconds, last result, CPU seconds of that best run)."""
  best, out, cpu = float("inf"), None, 0.0
  for _ in range(repeats):
    t, c = time.perf_counter(), _cpu_s()
    out = fn()
    dt, dc = time.perf_counter() - t, _cpu_s() - c
    if dt < best:
      best, cpu = dt, dc
  return best, out, cpu


def _batch_rate(blocks: np.ndarray, batch: int, prefetch: int, seconds: float) -> float:
  it = D.TrainIterator(blocks, global_batch=batch, seed=0, prefetch=prefetch)
  next(it)  # start-up outside the timing
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    n += next(it).size
  rate = n / (time.perf_counter() - t0)
  it.close()
  return rate


def _e2e(cfg: config.Config, tok, run: str, n_tokens: int) -> float:
  """Seconds for make_train_iterator plus one epoch of batches."""
  t0 = time.perf_counter()
  it = D.make_train_iterator(cfg, tok, run)
  seen = 0
  while seen < n_tokens:
    seen += next(it).size
  dt = time.perf_counter() - t0
  it.close()
  return dt


@cli
def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="bench/results/data.json")
  ap.add_argument("--data", default=str(SLICE))
  ap.add_argument("--vocab", default="512,8192", help="comma-separated vocabulary sizes")
  ap.add_argument("--seconds", type=float, default=2.0, help="per batching measurement")
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args(argv)

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  base = config.Config()
  data_cfg = config.replace(base.data, train=args.data)
  t_read, docs, _ = _best_of(lambda: D.read_documents(args.data, data_cfg), args.repeats)
  n_bytes = sum(len(d.encode()) for d in docs)
  results: dict = {"data": args.data, "documents": len(docs), "bytes": n_bytes, "cores": cores,
                   "python": platform.python_version(), "read_s": t_read,
                   "load_average_start": os.getloadavg()[0], "runs": []}
  print(f"{args.data}: {len(docs)} documents, {n_bytes / 1e6:.2f} MB, {cores} cores; "
        f"read {n_bytes / t_read / 1e6:.1f} MB/s")

  header = (f"{'vocab':>6} {'tokens':>9} {'tok/byte':>8} {'encode tok/s':>13} "
            f"{'tok/cpu-s':>10} {'tokenize tok/s':>15} {'batch shape':>12} {'batch tok/s':>12} "
            f"{'prefetch tok/s':>15} {'cold e2e tok/s':>15} {'warm e2e tok/s':>15}")
  print(header)
  for vocab in (int(v) for v in args.vocab.split(",")):
    sample = docs[::max(1, len(docs) // 2000)]
    tok = train_tokenizer(sample, vocab)  # outside the timings
    t_enc, (tokens, _), cpu_enc = _best_of(lambda: D.encode_documents(docs, tok),
                                           args.repeats)
    n_tok = int(tokens.shape[0])
    t_tokenize, _, _ = _best_of(
        lambda: D.token_stream(args.data, data_cfg, tok, cache_dir=None), args.repeats)
    for block, batch in ((64, 64), (2048, 8)):
      cfg = config.replace(base, **{"data.train": args.data, "data.block_tokens": block,
                                    "model.vocab_size": vocab, "train.batch_size": batch})
      blocks = D.pack_blocks(tokens, block)
      sync = _batch_rate(blocks, batch, 0, args.seconds)
      pre = _batch_rate(blocks, batch, 2, args.seconds)
      t_cold = t_warm = float("inf")
      for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as run:
          t_cold = min(t_cold, _e2e(cfg, tok, run, blocks.size))  # tokenise + cache + batches
          t_warm = min(t_warm, _e2e(cfg, tok, run, blocks.size))  # cache hit + batches
      cold, warm = blocks.size / t_cold, blocks.size / t_warm
      run_res = {"vocab": vocab, "tokens": n_tok, "tokens_per_byte": n_tok / n_bytes,
                 "encode_tokens_per_s": n_tok / t_enc,
                 "encode_tokens_per_cpu_s": n_tok / max(cpu_enc, 1e-9),
                 "tokenize_tokens_per_s": n_tok / t_tokenize,
                 "block_tokens": block, "batch_size": batch,
                 "batch_tokens_per_s": sync, "batch_prefetch_tokens_per_s": pre,
                 "end_to_end_cold_tokens_per_s": cold, "end_to_end_warm_tokens_per_s": warm}
      results["runs"].append(run_res)
      r = run_res
      print(f"{vocab:>6} {n_tok:>9} {r['tokens_per_byte']:>8.3f} "
            f"{r['encode_tokens_per_s']:>13,.0f} {r['encode_tokens_per_cpu_s']:>10,.0f} "
            f"{r['tokenize_tokens_per_s']:>15,.0f} {f'{batch}x{block}':>12} {sync:>12,.0f} "
            f"{pre:>15,.0f} {cold:>15,.0f} {warm:>15,.0f}", flush=True)

  results["load_average_end"] = os.getloadavg()[0]
  print(f"load average {results['load_average_start']:.1f} -> {results['load_average_end']:.1f} "
        f"on {cores} cores (other work on the machine lowers the wall-clock rates)")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2) + "\n")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
