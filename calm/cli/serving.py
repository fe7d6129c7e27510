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
import socket
import sys
import threading
import time

from calm.errors import CalmError, ConfigError

API_KEY_ENV = "CALM_API_KEY"


def _positive(text: str) -> int:
  try:
    v = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if v < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
  return v


def _listen(host: str, port: int) -> socket.socket:
  """The listening socket, bound before any slow work (a taken port is a one-line error)."""
  try:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(info[4])
    sock.listen(2048)
  except OSError as e:
    raise CalmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
  sock.set_inheritable(True)
  return sock


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
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args(argv)
  if not 0 <= args.port <= 65535:
    raise CalmError(f"--port must be in [0, 65535], got {args.port}")
  try:
    import starlette  # noqa: F401
    import uvicorn
  except ImportError:
    raise CalmError("calm-serve needs the serve extra: pip install 'calm-jax[serve]'") from None
  sock = _listen(args.host, args.port)

  import calm
  from calm.serving import app as app_lib, protocol
  from calm.serving.scheduler import Scheduler

  run = calm.open(args.config, args.step, overrides=args.overrides)
  if not run.stage.generates:
    raise ConfigError(f"stage: calm-serve needs a calm or ar run, got {run.config.stage}")
  sched = Scheduler(run, slots=args.slots, max_queue=args.max_queue)
  compile_s = sched.warm_up()
  eng = run.engine
  limits = protocol.Limits(
      model=args.model_name or run.run_dir.name, context=sched.context, max_n=args.max_n,
      default_max_tokens=min(run.config.sampling.max_new_tokens, sched.context - 1),
      max_temperature=eng.max_temperature,
      samplers=("exact", "batch") if eng.tokens_per_step > 1 else (),
      default_sampler=run.config.sampling.sampler)
  state = app_lib.ServerState(sched, limits, args.api_key or os.environ.get(API_KEY_ENV) or None,
                              args.max_body_bytes)
  server = _draining_server(uvicorn.Config(app_lib.create_app(state), log_level="warning",
                                  access_log=False, timeout_graceful_shutdown=5),
                   state, args.grace)
  sched.start()
  host, port = sock.getsockname()[:2]
  print(f"serving {limits.model} ({run.config.stage}, step {run.step}) on http://{host}:{port} "
        f"with {args.slots} slots (compiled in {compile_s:.1f} s)", flush=True)
  try:
    server.run(sockets=[sock])
  finally:
    sched.close()
  print("calm-serve: stopped", flush=True)
  return 0


def _draining_server(config, state, grace: float):
  """uvicorn's server with a draining exit: the first SIGTERM/SIGINT turns new requests away
  (503) and lets the running ones finish for up to `grace` seconds; a second one exits now."""
  import uvicorn

  class Server(uvicorn.Server):
    def handle_exit(self, sig, frame):
      if state.draining:
        return super().handle_exit(sig, frame)
      state.draining = True
      print("calm-serve: draining (new requests get 503)", file=sys.stderr, flush=True)
      threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
      deadline = time.monotonic() + grace
      while not state.scheduler.idle() and time.monotonic() < deadline:
        time.sleep(0.05)
      state.scheduler.cancel_all()
      time.sleep(0.2)  # the last events reach their responses
      self.should_exit = True

  return Server(config)
