"""`calm-prepare`: tokenise a corpus once into shards.

  calm-prepare --config CFG --out DIR [--source SPEC] [k=v ...]

See `calm.prepare` for the layout and resumption.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

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
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  cfg = config.load(args.config, args.overrides)
  m = prepare(cfg, args.out, source=args.source, workers=args.workers,
              piece_bytes=max(1, int(args.piece_mb * (1 << 20))), progress=sys.stderr.isatty())
  print(f"{args.out}: {m['tokens']} tokens, {m['documents']} documents, {len(m['shards'])} "
        f"shards ({m['dtype']})")
  return 0
