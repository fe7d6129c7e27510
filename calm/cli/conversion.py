"""`calm-convert`: official CALM / Hugging Face Llama checkpoints ↔ calm-jax runs (see
`calm.convert`)."""

from __future__ import annotations

import argparse
from typing import Sequence

from calm.convert.runs import convert, export_reference
from calm.errors import CalmError


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="calm-convert",
                               description="Convert official CALM / Hugging Face Llama "
                                           "checkpoints to calm-jax runs, or export back.")
  ap.add_argument("--ae", help="reference autoencoder directory")
  ap.add_argument("--calm", help="reference CALM directory (needs --ae)")
  ap.add_argument("--llama", help="Hugging Face LlamaForCausalLM directory (AR baseline)")
  ap.add_argument("--export", metavar="RUN_DIR", help="export this calm-jax run instead")
  ap.add_argument("--format", choices=("safetensors", "npz"), default="safetensors",
                  help="weights format of --export")
  ap.add_argument("--out", required=True, help="output run directory (or export directory)")
  ap.add_argument("--force", action="store_true",
                  help="--export: replace an export already in --out")
  ap.add_argument("--ignore-field", action="append", default=[], metavar="NAME",
                  help="config.json field known not to change the model (repeatable)")
  args = ap.parse_args(argv)
  if not args.out.strip():
    raise CalmError("--out: name the output directory")
  if args.force and not args.export:
    raise CalmError("--force applies to --export only (a conversion never replaces a run)")
  if args.export:
    if args.ae or args.calm or args.llama:
      raise CalmError("--export cannot be combined with --ae/--calm/--llama")
    out = export_reference(args.export, args.out, args.format, force=args.force)
    print(f"exported {args.export} → {out}")
    return 0
  runs = convert(args.out, ae=args.ae, calm=args.calm, llama=args.llama,
                 ignore_fields=args.ignore_field)
  for stage, path in runs.items():
    print(f"{stage}: {path} (config {path / 'config.yaml'})")
  return 0
