"""A served run: scheduler + routes + uvicorn, in the foreground (`calm-serve`) or on a
background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import dataclasses
import socket
import sys
import threading
import time

from calm.errors import CalmError
from calm.serving import app as app_lib, protocol
from calm.serving.scheduler import Scheduler


@dataclasses.dataclass(frozen=True)
class Options:
  """How a run is served (the `calm-serve` flags)."""

  slots: int = 16
  max_queue: int = 256
  max_n: int = 16
  api_key: str | None = None
  max_body_bytes: int = 1 << 20
  grace: float = 30.0
  model_name: str | None = None
  buckets: tuple[int, ...] = ()  # prefill lengths in cache positions; () = powers of two
  steps_per_call: int = 4  # decode steps per compiled call (fewer host round trips)


def prepare(run, options: Options) -> tuple[app_lib.ServerState, object, float]:
  """The scheduler (compiled: every prefill bucket, the insert and the step) and the app →
  (state, app, compile seconds)."""
  if not run.stage.generates:
    raise CalmError(f"stage: serving needs a calm or ar run, got {run.config.stage}")
  if options.max_n > options.max_queue:
    raise CalmError(f"--max-n {options.max_n} exceeds --max-queue {options.max_queue}: such a "
                    f"request could never be queued")
  sched = Scheduler(run, slots=options.slots, max_queue=options.max_queue,
                    buckets=options.buckets, steps_per_call=options.steps_per_call)
  compile_s = sched.warm_up()
  eng = run.engine
  limits = protocol.Limits(
      model=options.model_name or run.run_dir.name, context=sched.context, max_n=options.max_n,
      default_max_tokens=min(run.config.sampling.max_new_tokens, sched.context - 1),
      max_temperature=eng.max_temperature,
      samplers=("exact", "batch") if eng.tokens_per_step > 1 else (),
      default_sampler=run.config.sampling.sampler)
  state = app_lib.ServerState(sched, limits, options.api_key, options.max_body_bytes)
  return state, app_lib.create_app(state), compile_s


def listen(host: str, port: int) -> socket.socket:
  """The listening socket, bound before any slow work (a taken port is a one-line error)."""
  try:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(info[4])
    sock.listen(2048)
  except OSError as e:
    raise CalmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
  return sock


def uvicorn_server(app, state: app_lib.ServerState, grace: float):
  """uvicorn's server with a draining exit: the first SIGTERM/SIGINT (or `drain()`) turns new
  requests away (503) and lets the running ones finish for up to `grace` seconds, then the
  server stops; a second signal stops it at once."""
  import uvicorn

  class Server(uvicorn.Server):
    def handle_exit(self, sig, frame):
      if state.draining:
        return super().handle_exit(sig, frame)
      print("calm-serve: draining (new requests get 503)", file=sys.stderr, flush=True)
      self.drain()

    def drain(self) -> threading.Thread:
      state.draining = True
      t = threading.Thread(target=self._drain, daemon=True)
      t.start()
      return t

    def _drain(self):
      deadline = time.monotonic() + grace
      while not state.scheduler.idle() and time.monotonic() < deadline:
        time.sleep(0.05)
      state.scheduler.cancel_all()
      time.sleep(0.2)  # the last events reach their responses
      self.should_exit = True

  config = uvicorn.Config(app, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=5)
  return Server(config)


class Background:
  """A run served on a background thread: `url`, `state`, `stop()` (drains first)."""

  def __init__(self, run, options: Options = Options(), host: str = "127.0.0.1",
               port: int = 0):
    self.state, app, self.compile_s = prepare(run, options)
    self._sock = listen(host, port)
    h, p = self._sock.getsockname()[:2]
    self.url = f"http://{h}:{p}"
    self.server = uvicorn_server(app, self.state, options.grace)
    self.state.scheduler.start()
    self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                    daemon=True)
    self._thread.start()
    while not self.server.started:
      time.sleep(0.01)

  @property
  def scheduler(self) -> Scheduler:
    return self.state.scheduler

  def stop(self) -> None:
    self.server.drain().join()
    self._thread.join(timeout=30)
    self.state.scheduler.close()
    self._sock.close()

  def __enter__(self) -> Background:
    return self

  def __exit__(self, *exc) -> None:
    self.stop()
