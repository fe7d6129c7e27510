"""Serve a CALM or AR run over HTTP: `calm-serve --config RUN/config.yaml [--port 8000] [k=v ...]`.

OpenAI-style `POST /v1/completions` (plain and `stream: true`), `GET /v1/models`, `/health`,
`/metrics` (Prometheus text) and a playground page at `/`. Binds 127.0.0.1 unless told
otherwise; `--api-key` (or CALM_API_KEY) makes /v1 and /metrics need `Authorization: Bearer KEY`.
SIGTERM stops taking requests (503), finishes the running ones within `--grace` seconds, exits 0.
Needs the serve extra: `pip install 'calm-jax[serve]'`.
"""

from __future__ import annotations

import argparse
import os
import pathlib

from calm.errors import CalmError

API_KEY_ENV = "CALM_API_KEY"


def _positive(text: str) -> int:
  try:
    v = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if v < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
  return v


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True, help="the run's config.yaml (or its directory)")
  ap.add_argument("--host", default="127.0.0.1")
  ap.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
  ap.add_argument("--slots", type=_positive, default=16, help="decode rows compiled once")
  ap.add_argument("--max-queue", type=_positive, default=256,
                  help="choices waiting for a slot before requests get 429")
  ap.add_argument("--max-n", type=_positive, default=16, help="choices per request")
  ap.add_argument("--api-key", default=None, help=f"or the {API_KEY_ENV} environment variable")
  ap.add_argument("--max-body-bytes", type=_positive, default=1 << 20)
  ap.add_argument("--grace", type=float, default=30.0,
                  help="seconds SIGTERM waits for running requests")
  ap.add_argument("--model-name", default=None, help="the model id (default: the run's name)")
  ap.add_argument("--steps-per-call", type=_positive, default=4,
                  help="decode steps per compiled call: fewer host round trips, admission "
                       "and cancellation every that many steps")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--buckets", default="", help="prefill lengths in cache positions, e.g. "
                  "16,64 (default: powers of two up to the context)")
  from calm.cli.generation import add_precision_flags

  add_precision_flags(ap)
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args(argv)
  if not 0 <= args.port <= 65535:
    raise CalmError(f"--port must be in [0, 65535], got {args.port}")
  try:
    import starlette  # noqa: F401
    import uvicorn
  except ImportError:
    raise CalmError("calm-serve needs the serve extra: pip install 'calm-jax[serve]'") from None
  from calm.serving import server as server_lib

  sock = server_lib.listen(args.host, args.port)
  import calm

  try:
    buckets = tuple(_positive(b) for b in args.buckets.split(",")) if args.buckets else ()
  except argparse.ArgumentTypeError as e:
    raise CalmError(f"--buckets: {e}") from None
  options = server_lib.Options(
      slots=args.slots, max_queue=args.max_queue, max_n=args.max_n,
      api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
      max_body_bytes=args.max_body_bytes, grace=args.grace, model_name=args.model_name,
      buckets=buckets, steps_per_call=args.steps_per_call)
  from calm import paths, stages

  where = pathlib.Path(args.config)
  cfg_path = where / paths.CONFIG_FILE if where.is_dir() else where
  cfg = paths.load_config(cfg_path, list(args.overrides))
  if not stages.get_stage(cfg).generates:  # before any weights load
    raise CalmError(f"stage: calm-serve needs a calm or ar run, got {cfg.stage}")
  run = calm.open(cfg_path, args.step, overrides=args.overrides, weights=args.weights,
                  cache=args.cache)
  state, app, compile_s = server_lib.prepare(run, options)
  server = server_lib.uvicorn_server(app, state, options.grace)
  state.scheduler.start()
  host, port = sock.getsockname()[:2]
  print(f"serving {state.limits.model} ({run.config.stage}, step {run.step}) on "
        f"http://{host}:{port} with {args.slots} slots (compiled in {compile_s:.1f} s)",
        flush=True)
  try:
    server.run(sockets=[sock])
  finally:
    state.scheduler.close()
  print("calm-serve: stopped", flush=True)
  return 0


if __name__ == "__main__":
  from calm.errors import cli

  raise SystemExit(cli(main)())
