"""The HTTP side of `calm-serve` (Starlette): OpenAI-style completions (plain and server-sent
events), models, health, metrics and the playground page. Generation runs on the scheduler's
decode thread; a request waits on an asyncio queue its choices' callbacks fill."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.resources
import json
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, \
    StreamingResponse
from starlette.routing import Route

from calm.engine import RowSettings
from calm.errors import SettingError
from calm.serving import protocol
from calm.serving.protocol import ApiError
from calm.serving.scheduler import Choice, QueueFull, Scheduler

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerState:
  """What the routes share: the scheduler, the protocol limits and the safety settings."""

  scheduler: Scheduler
  limits: protocol.Limits
  api_key: str | None
  max_body_bytes: int
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))
  draining: bool = False


def _error(e: ApiError) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status)


def _check_key(state: ServerState, request: Request) -> None:
  if state.api_key is None:
    return
  got = request.headers.get("authorization", "")
  scheme, _, token = got.partition(" ")
  if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                           state.api_key.encode()):
    raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                   code="invalid_api_key")


async def _read_body(state: ServerState, request: Request) -> bytes:
  limit = state.max_body_bytes
  declared = request.headers.get("content-length")
  if declared is not None and declared.isdigit() and int(declared) > limit:
    raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
    chunks.append(chunk)
  return b"".join(chunks)


def _choices(state: ServerState, req: protocol.CompletionRequest, emit_for) -> list[Choice]:
  sched, tok = state.scheduler, state.scheduler.tokenizer
  settings = RowSettings(req.temperature, req.top_p, req.sampler)
  try:
    sched.engine.check_settings(settings)
  except SettingError as e:
    raise ApiError(400, str(e), e.field)
  base = req.seed if req.seed is not None else sched.new_seed()
  out = []
  for p, text in enumerate(req.prompts):
    ids = tok.encode(text) or [tok.eos_id]
    if len(ids) + req.max_tokens > sched.context:
      raise ApiError(400, f"prompt too long: {len(ids)} tokens + max_tokens {req.max_tokens} "
                          f"exceed the model's context of {sched.context} tokens", "prompt",
                     code="context_length_exceeded")
    for j in range(req.n):
      i = p * req.n + j
      out.append(Choice(ids, base + i, settings, req.max_tokens, req.stop, emit_for(i),
                        req.ignore_eos))
  return out


async def completions(request: Request) -> Response:
  state: ServerState = request.app.state.server
  metrics = state.scheduler.metrics
  try:
    if state.draining:
      raise ApiError(503, "the server is shutting down", kind="server_error",
                     code="shutting_down")
    _check_key(state, request)
    req = protocol.parse_completion(protocol.decode_body(await _read_body(state, request)),
                                    state.limits)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit_for(i: int):
      return lambda delta, finish: loop.call_soon_threadsafe(events.put_nowait,
                                                             (i, delta, finish))

    choices = _choices(state, req, emit_for)
    try:
      state.scheduler.submit(choices)
    except QueueFull:
      raise ApiError(429, f"the server is busy ({state.scheduler.waiting} choices queued); "
                          f"retry later", kind="rate_limit_error", code="queue_full")
  except ApiError as e:
    metrics.request(e.status)
    return _error(e)
  metrics.request(200)
  cid = protocol.completion_id()
  prompt_tokens = sum(len(c.prompt_ids) for c in choices[::req.n])
  if req.stream:
    return StreamingResponse(_stream(state, req, cid, choices, events, prompt_tokens),
                             media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})
  return await _collect(state, request, req, cid, choices, events, prompt_tokens)


async def _collect(state, request, req, cid, choices, events, prompt_tokens) -> Response:
  texts, reasons = [""] * len(choices), [None] * len(choices)
  remaining = len(choices)
  try:
    while remaining:
      try:
        i, delta, finish = await asyncio.wait_for(events.get(), timeout=0.5)
      except asyncio.TimeoutError:
        if await request.is_disconnected():
          return Response(status_code=499)
        continue
      if finish == "error":
        e = ApiError(500, delta, kind="server_error")
        return _error(e)
      texts[i] += delta
      if finish is not None:
        reasons[i], remaining = finish, remaining - 1
  finally:
    _cancel_unfinished(choices)
  body = protocol.completion_body(
      cid, state.limits.model,
      [protocol.choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))],
      protocol.usage(prompt_tokens, sum(c.generated for c in choices)))
  return JSONResponse(body)


async def _stream(state, req, cid, choices, events, prompt_tokens):
  model, remaining = state.limits.model, len(choices)
  try:
    while remaining:
      i, delta, finish = await events.get()
      if finish == "error":
        yield _sse(ApiError(500, delta, kind="server_error").body())
        break
      if finish is not None:
        remaining -= 1
      if delta or finish is not None:
        yield _sse(protocol.completion_body(cid, model, [protocol.choice(i, delta, finish)], None))
    if req.include_usage:
      yield _sse(protocol.completion_body(
          cid, model, [], protocol.usage(prompt_tokens, sum(c.generated for c in choices))))
    yield "data: [DONE]\n\n"
  finally:  # the client went away (or we are done): free the slots now
    _cancel_unfinished(choices)


def _sse(obj: dict) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _cancel_unfinished(choices: list[Choice]) -> None:
  for c in choices:
    if c.finish is None:
      c.cancelled = True


def _keyed(handler):
  """A route that needs the API key (when the server has one): `handler(request, state)`."""

  async def route(request: Request) -> Response:
    state: ServerState = request.app.state.server
    try:
      _check_key(state, request)
    except ApiError as e:
      return _error(e)
    return await handler(request, state)

  return route


@_keyed
async def models(request: Request, state: ServerState) -> Response:
  run = state.scheduler.run
  return JSONResponse({"object": "list", "data": [{
      "id": state.limits.model, "object": "model", "created": state.created,
      "owned_by": "calm-jax", "stage": run.config.stage, "step": run.step,
      "context": state.limits.context, "tokens_per_step": state.scheduler.engine.tokens_per_step,
  }]})


async def health(request: Request) -> Response:
  state: ServerState = request.app.state.server
  s = state.scheduler
  body = {"status": "draining" if state.draining else "ok", "model": state.limits.model,
          "slots": s.num_slots, "busy": s.busy, "queue": s.waiting}
  return JSONResponse(body, status_code=503 if state.draining else 200)


@_keyed
async def metrics(request: Request, state: ServerState) -> Response:
  s = state.scheduler
  text = s.metrics.render(queue_depth=s.waiting, slots_busy=s.busy, slots=s.num_slots,
                          draining=state.draining)
  return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


async def playground(request: Request) -> Response:
  page = importlib.resources.files("calm.serving").joinpath("static/playground.html")
  return HTMLResponse(page.read_text(encoding="utf-8"))


async def _http_error(request: Request, exc: HTTPException) -> Response:
  kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
  return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                         kind=kind))


async def _server_error(request: Request, exc: Exception) -> Response:
  log.exception("unhandled error on %s", request.url.path)
  return _error(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error"))


def create_app(state: ServerState) -> Starlette:
  app = Starlette(routes=[
      Route("/", playground, methods=["GET"]),
      Route("/health", health, methods=["GET"]),
      Route("/metrics", metrics, methods=["GET"]),
      Route("/v1/models", models, methods=["GET"]),
      Route("/v1/completions", completions, methods=["POST"]),
  ], exception_handlers={HTTPException: _http_error, Exception: _server_error})
  app.state.server = state
  return app
