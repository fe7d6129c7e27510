"""Generate text from a CALM or AR run: `calm-sample --config CFG [--prompt TEXT|--file F] [k=v ...]`.

Sampling settings come from the config's `sampling` section (temperature, sampler,
num_candidates, max_attempts, draws_per_step, max_new_tokens, num_samples, top_k, top_p, seed);
the flags below override them. Without --prompt/--file the prompt is read from stdin.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from calm import compile_cache, paths
from calm.errors import CalmError, ConfigError


def read_prompt(prompt: str | None, file: str | None) -> str:
  """The prompt text: --prompt, else the UTF-8 contents of --file, else stdin."""
  if prompt is not None and file:
    raise CalmError("give the prompt with --prompt or --file, not both")
  if prompt is not None and not file:
    return prompt
  if file:
    path = pathlib.Path(file)
    if not path.is_file():
      raise CalmError(f"prompt file not found: {path}")
    try:
      data, where = path.read_bytes(), f"prompt file {path}"
    except OSError as e:
      raise CalmError(f"cannot read prompt file {path}: {e.strerror}") from None
  elif hasattr(sys.stdin, "buffer"):
    data, where = sys.stdin.buffer.read(), "the prompt on stdin"
  else:  # a text stream without bytes underneath (e.g. replaced in-process)
    return sys.stdin.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise CalmError(f"{where} is not UTF-8 text (invalid byte at offset {e.start})") from None


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--prompt", default=None)
  ap.add_argument("--file", default=None)
  ap.add_argument("--temperature", type=float, default=None)
  ap.add_argument("--sampler", choices=("exact", "batch"), default=None)
  ap.add_argument("--num-samples", type=int, default=None)
  ap.add_argument("--max-tokens", type=int, default=None)
  ap.add_argument("--seed", type=int, default=None)
  add_precision_flags(ap)
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args(argv)
  extra = [f"sampling.{k}={v}" for k, v in (
      ("temperature", args.temperature), ("sampler", args.sampler),
      ("num_samples", args.num_samples), ("max_new_tokens", args.max_tokens),
      ("seed", args.seed)) if v is not None]
  cfg = paths.load_config(args.config, list(args.overrides) + extra)
  compile_cache.enable(cfg)
  from calm import run, stages

  if not stages.get_stage(cfg).generates:
    raise ConfigError(f"stage: sampling needs a calm or ar run, got {cfg.stage}")
  text = read_prompt(args.prompt, args.file)
  r = run.load(cfg, weights=args.weights, cache=args.cache)
  n = cfg.sampling.num_samples
  stats: dict = {}
  t0 = time.time()
  if n == 1:  # streamed as it is generated
    print("--- sample 0 ---")
    print(text, end="", flush=True)
    for piece in r.stream(text, stats=stats):
      print(piece, end="", flush=True)
    print(flush=True)
    counts = [stats.pop("tokens")]
  else:
    outs = r.complete([text] * n)
    for i, c in enumerate(outs):
      print(f"--- sample {i} ---")
      print(text + c.text, flush=True)
    stats, counts = outs[0].stats, [len(c.token_ids) for c in outs]
  dt = time.time() - t0
  total = sum(counts)
  extra_stats = (f", {stats['mean_draws']:.1f} draws/chunk, {stats['capped']} capped"
                 if "mean_draws" in stats else "")
  print(f"[{total} tokens in {dt:.2f}s incl. compile: {total / max(dt, 1e-9):.1f} tokens/s"
        f"{extra_stats}]", file=sys.stderr)
  if stats.get("capped"):
    print(capped_warning(stats["capped"], stats["chunks"], cfg.sampling.max_attempts),
          file=sys.stderr)
  return 0


def add_precision_flags(ap: argparse.ArgumentParser) -> None:
  """--weights and --cache (inference precision, `calm.quantize`)."""
  ap.add_argument("--weights", choices=("float32", "bf16", "int8"), default="float32",
                  help="weight matrices in float32 (as trained), bf16 or int8 (per-channel, "
                       "needs the quant extra)")
  ap.add_argument("--cache", choices=("float32", "bf16"), default=None,
                  help="KV cache precision (default: the model's compute dtype)")


def capped_warning(capped: int, chunks: int, max_attempts: int) -> str:
  """One line: how many chunks the exact sampler gave up on, what that means, what to do."""
  return (f"warning: {capped} of {chunks} chunks hit sampling.max_attempts={max_attempts} draws "
          f"before the exact sampler accepted one, so they are its fallback (not exact at this "
          f"temperature); raise sampling.max_attempts, or use --sampler batch or a higher "
          f"--temperature")
