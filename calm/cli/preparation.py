"""`calm-prepare`: tokenise a corpus once into shards.

  calm-prepare --config CFG --out DIR [--source SPEC] [--force] [k=v ...]

See `calm.prepare` for the layout and resumption.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Sequence

from calm.errors import ConfigError
from calm.prepare import PIECE_BYTES, prepare


def main(argv: Sequence[str] | None = None) -> int:
  from calm import config

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--out", required=True, help="directory for the shards and manifest")
  ap.add_argument("--source", default="", help="source to prepare (default data.train)")
  ap.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
  ap.add_argument("--piece-mb", type=float, default=PIECE_BYTES / (1 << 20),
                  help="input MiB per shard of a large JSON Lines file")
  ap.add_argument("--force", action="store_true",
                  help="replace another preparation (or its leftovers) in --out")
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args(argv)
  piece_bytes = piece_size(args.piece_mb)
  if args.workers < 0:
    raise ConfigError(f"--workers: must be >= 0 (0: all cores), got {args.workers}")
  if not args.out.strip():
    raise ConfigError("--out: name the directory to prepare into")
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  cfg = config.load(args.config, args.overrides)
  m = prepare(cfg, args.out, source=args.source, workers=args.workers, piece_bytes=piece_bytes,
              progress=sys.stderr.isatty(), force=args.force)
  print(f"{args.out}: {m['tokens']} tokens, {m['documents']} documents, {len(m['shards'])} "
        f"shards ({m['dtype']})")
  return 0


def piece_size(mb: float) -> int:
  """--piece-mb in bytes; ConfigError unless it is finite and at least one byte."""
  if not math.isfinite(mb) or mb <= 0:
    raise ConfigError(f"--piece-mb: must be a positive number of MiB, got {mb}")
  n = int(mb * (1 << 20))
  if n < 1:
    raise ConfigError(f"--piece-mb: {mb} MiB is less than one byte")
  return n
