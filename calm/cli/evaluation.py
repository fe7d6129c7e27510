"""`calm-eval`: BrierLM of a CALM or AR run on held-out documents (reconstruction for an
autoencoder run).

  calm-eval --config RUN/config.yaml [--step N] [--out FILE] [--weights int8] [eval.data=SOURCE]
            [key=value ...]

SOURCE: .txt / .jsonl files, a directory or glob, `tfds:NAME:SPLIT` or `prepared:DIR` (default
data.eval). The report is printed and written as JSON (default RUN_DIR/brierlm.json, or
reconstruction.json for an autoencoder; brierlm-int8.json etc. for other weights).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Sequence

from calm.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
  from calm import compile_cache, paths

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  ap.add_argument("--out", default="", help="JSON path (default RUN_DIR/brierlm.json)")
  from calm.cli.generation import add_precision_flags

  add_precision_flags(ap)
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args(argv)
  cfg = paths.load_config(args.config, args.overrides)
  compile_cache.enable(cfg)
  source = cfg.eval.data or cfg.data.eval
  if not source:
    raise ConfigError("eval.data: name the held-out documents (e.g. eval.data=PATH)")
  from calm import data, evaluate, run, stages

  precision = dict(weights=args.weights, cache=args.cache)
  if not stages.get_stage(cfg).generates:
    r = run.load(cfg, step=args.step, **precision)
    summary = evaluate.reconstruction_report(r, source, cfg.eval)
    print(evaluate.format_reconstruction(summary))
    default = "reconstruction.json"
  else:
    r = run.load(cfg, step=args.step, **precision)
    docs = data.tokenized_documents(source, cfg.data, r.tokenizer)
    summary = evaluate.brierlm(r, docs, cfg.eval, source=source)
    print(evaluate.format_table(summary))
    if "energy" in summary:
      print(evaluate.format_energy(summary["energy"]))
    default = "brierlm.json"
  print(json.dumps(summary["protocol"]))
  if args.weights != "float32" or args.cache:
    default = default.replace(".json", "".join(f"-{v}" for v in precision.values() if v) + ".json")
  out = pathlib.Path(args.out or pathlib.Path(cfg.run_dir) / default)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(summary, indent=2))
  return 0
