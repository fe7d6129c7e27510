"""An HTTP load generator for `calm-serve` (stdlib only): concurrent clients, bounded by a
request count and a duration, plain or streaming, with optional random disconnects and bad
requests; reports status counts, completeness, aggregate tokens/s and time to first token
(`bench/bench_serve.py` drives it against `calm-serve` processes).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import random
import threading
import time
import urllib.parse
from typing import Callable


@dataclasses.dataclass
class Result:
  """One request's outcome. `complete`: a 200 whose every choice has a finish reason (and, when
  streamed, that ended with [DONE]); `tokens`: completion tokens from `usage`."""

  kind: str  # "valid", "disconnect" or "bad:<name>"
  status: int
  seconds: float
  ttft: float | None = None
  tokens: int = 0
  texts: list[str] = dataclasses.field(default_factory=list)
  finish: list[str | None] = dataclasses.field(default_factory=list)
  complete: bool = False
  error: dict | None = None
  body: dict | None = None  # a JSON answer that is not streamed


@dataclasses.dataclass(frozen=True)
class Bad:
  """A malformed or refused request and the status it must get."""

  name: str
  status: int
  body: bytes | dict | None = None
  method: str = "POST"
  path: str = "/v1/completions"
  headers: dict | None = None
  param: str | None = None  # the field the error must name


def bad_requests(*, model: str, context: int, max_body: int, api_key: str | None,
                 calm: bool) -> list[Bad]:
  """At least 25 kinds of bad request for a server with these settings."""
  p = "It was"
  out = [
      Bad("malformed JSON", 400, b'{"prompt": "x", '),
      Bad("body not an object", 400, b"[1, 2, 3]"),
      Bad("empty body", 400, b""),
      Bad("non-UTF-8 body", 400, b'\xff\xfe{"prompt": "x"}'),
      Bad("missing prompt", 400, {"max_tokens": 4}, param="prompt"),
      Bad("prompt not a string", 400, {"prompt": 123}, param="prompt"),
      Bad("empty prompt", 400, {"prompt": ""}, param="prompt"),
      Bad("empty prompt list", 400, {"prompt": []}, param="prompt"),
      Bad("prompt list with a number", 400, {"prompt": ["a", 1]}, param="prompt"),
      Bad("token-id prompt", 400, {"prompt": [1, 2, 3]}, param="prompt"),
      Bad("prompt longer than the context", 400, {"prompt": "word " * (2 * context),
                                                  "max_tokens": 1}, param="prompt"),
      Bad("max_tokens 0", 400, {"prompt": p, "max_tokens": 0}, param="max_tokens"),
      Bad("max_tokens negative", 400, {"prompt": p, "max_tokens": -5}, param="max_tokens"),
      Bad("max_tokens huge", 400, {"prompt": p, "max_tokens": 10**9}, param="max_tokens"),
      Bad("max_tokens a string", 400, {"prompt": p, "max_tokens": "ten"}, param="max_tokens"),
      Bad("max_tokens fractional", 400, {"prompt": p, "max_tokens": 2.5}, param="max_tokens"),
      Bad("temperature negative", 400, {"prompt": p, "temperature": -0.5},
          param="temperature"),
      Bad("temperature NaN", 400, b'{"prompt": "x", "temperature": NaN}', param="temperature"),
      Bad("temperature too high", 400, {"prompt": p, "temperature": 5}, param="temperature"),
      Bad("temperature a string", 400, {"prompt": p, "temperature": "hot"},
          param="temperature"),
      Bad("top_p 0", 400, {"prompt": p, "top_p": 0}, param="top_p"),
      Bad("top_p above 1", 400, {"prompt": p, "top_p": 1.5}, param="top_p"),
      Bad("n 0", 400, {"prompt": p, "n": 0}, param="n"),
      Bad("n too large", 400, {"prompt": p, "n": 1000}, param="n"),
      Bad("stop a number", 400, {"prompt": p, "stop": 5}, param="stop"),
      Bad("stop empty", 400, {"prompt": p, "stop": ""}, param="stop"),
      Bad("too many stops", 400, {"prompt": p, "stop": ["a", "b", "c", "d", "e"]},
          param="stop"),
      Bad("seed negative", 400, {"prompt": p, "seed": -1}, param="seed"),
      Bad("seed a string", 400, {"prompt": p, "seed": "lucky"}, param="seed"),
      Bad("stream not a bool", 400, {"prompt": p, "stream": "yes"}, param="stream"),
      Bad("stream_options without stream", 400,
          {"prompt": p, "stream_options": {"include_usage": True}}, param="stream_options"),
      Bad("unknown field", 400, {"prompt": p, "foo": 1}, param="foo"),
      Bad("unsupported echo", 400, {"prompt": p, "echo": True}, param="echo"),
      Bad("unsupported logprobs", 400, {"prompt": p, "logprobs": 5}, param="logprobs"),
      Bad("unknown model", 404, {"prompt": p, "model": model + "-nope"}, param="model"),
      Bad("oversized body", 413, {"prompt": "x" * (max_body + 10)}),
      Bad("wrong method", 405, None, method="GET"),
      Bad("unknown route", 404, {"prompt": p}, path="/v1/chat/nothing"),
      (Bad("unknown sampler", 400, {"prompt": p, "sampler": "greedy"}, param="sampler")
       if calm else Bad("sampler on an AR model", 400, {"prompt": p, "sampler": "exact"},
                        param="sampler")),
  ]
  if calm:
    out.append(Bad("top_p on a CALM model", 400, {"prompt": p, "top_p": 0.5}, param="top_p"))
  if api_key:
    out += [Bad("missing API key", 401, {"prompt": p}, headers={"Authorization": ""}),
            Bad("wrong API key", 401, {"prompt": p},
                headers={"Authorization": "Bearer " + api_key + "x"})]
  return out


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
  u = urllib.parse.urlsplit(url)
  return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


class Client:
  """One client's HTTP/1.1 connection, kept alive between its requests (as client libraries
  pool theirs); reopened when the server closed it or it sat idle past `idle_s` (the server
  drops idle keep-alive connections after a few seconds)."""

  def __init__(self, url: str, timeout: float = 300.0, idle_s: float = 2.0):
    self.url, self.timeout, self.idle_s = url, timeout, idle_s
    self.conn: http.client.HTTPConnection | None = None
    self.last = 0.0

  def connect(self) -> http.client.HTTPConnection:
    if self.conn is not None and time.monotonic() - self.last > self.idle_s:
      self.close()
    if self.conn is None:
      self.conn = _connection(self.url, self.timeout)
      self.conn.connect()
      self.last = time.monotonic()  # a fresh connection is not idle
    return self.conn

  def done(self, reusable: bool) -> None:
    """After a request: keep the connection for the next one, or close it."""
    self.last = time.monotonic()
    if not reusable:
      self.close()

  def close(self) -> None:
    if self.conn is not None:
      self.conn.close()
      self.conn = None


def request(url: str, body: dict | bytes | None, *, method: str = "POST",
            path: str = "/v1/completions", headers: dict | None = None,
            api_key: str | None = None, timeout: float = 300.0,
            disconnect_after: int | None = None, kind: str = "valid",
            client: Client | None = None) -> Result:
  """One request. A streamed body (`"stream": true`) is read event by event; with
  `disconnect_after=k` the connection is dropped after k events. With `client`, a valid request
  goes over its kept-alive connection (anything else over a connection of its own)."""
  h = {"Content-Type": "application/json"}
  if api_key:
    h["Authorization"] = f"Bearer {api_key}"
  h.update(headers or {})
  h = {k: v for k, v in h.items() if v}
  data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
  stream = isinstance(body, dict) and body.get("stream") is True
  keep = client is not None and kind == "valid" and disconnect_after is None
  conn = client.connect() if keep else _connection(url, timeout)
  reusable = False
  t0 = time.perf_counter()
  try:
    conn.request(method, path, body=data, headers=h)
    resp = conn.getresponse()
    out = Result(kind, resp.status, 0.0)
    if resp.status != 200 or not stream:
      raw = resp.read()
      out.seconds = time.perf_counter() - t0
      try:
        obj = json.loads(raw) if raw else {}
      except json.JSONDecodeError:
        obj = {}
      out.body = obj if isinstance(obj, dict) else None
      reusable = not resp.will_close
      if resp.status != 200:
        out.error = obj.get("error") if isinstance(obj, dict) else None
      elif "choices" in obj:
        choices = sorted(obj["choices"], key=lambda c: c["index"])
        out.texts = [c["text"] for c in choices]
        out.finish = [c["finish_reason"] for c in choices]
        out.tokens = obj["usage"]["completion_tokens"]
        out.complete = all(out.finish)
        out.ttft = out.seconds
      return out
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    events, done = 0, False
    while True:
      line = resp.readline()
      if not line:
        break
      line = line.strip()
      if not line.startswith(b"data: "):
        continue
      payload = line[6:]
      if payload == b"[DONE]":
        done = True
        resp.read()  # the end of the chunked body: the connection is ready for the next request
        reusable = not resp.will_close
        break
      obj = json.loads(payload)
      if "error" in obj:
        out.error = obj["error"]
        break
      for c in obj["choices"]:
        if c["text"] and out.ttft is None:
          out.ttft = time.perf_counter() - t0
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        if c["finish_reason"]:
          finish[c["index"]] = c["finish_reason"]
      if obj.get("usage"):
        out.tokens = obj["usage"]["completion_tokens"]
      events += 1
      if disconnect_after is not None and events >= disconnect_after:
        break
    n = body.get("n", 1) * (len(body["prompt"]) if isinstance(body["prompt"], list) else 1)
    out.texts = [texts.get(i, "") for i in range(n)]
    out.finish = [finish.get(i) for i in range(n)]
    out.complete = done and all(out.finish)
    out.seconds = time.perf_counter() - t0
    return out
  except (OSError, http.client.HTTPException) as e:
    return Result(kind, 0, time.perf_counter() - t0, error={"message": f"{type(e).__name__}: {e}"})
  finally:
    if keep:
      client.done(reusable)
    else:
      conn.close()


def run_load(url: str, make: Callable[[int, random.Random], dict], *, clients: int,
             requests: int, duration_s: float = 1e9, seed: int = 0,
             api_key: str | None = None) -> tuple[list[Result], float]:
  """`clients` threads send requests `make(i, rng)` → {"body", "kind", "disconnect_after", …}
  until `requests` were sent or `duration_s` passed → (results, wall seconds). The clients are
  started and connected before the clock starts, then released together; each keeps its
  connection alive between valid requests."""
  lock, counter = threading.Lock(), [0]
  ready = threading.Barrier(clients + 1)
  t0 = [0.0]

  def worker(w: int) -> list[Result]:
    rng, out, client = random.Random(seed * 1000 + w), [], Client(url)
    try:
      try:
        client.connect()
      except Exception:  # noqa: BLE001 (the first request reports it)
        client.close()
      ready.wait(timeout=60)
      while True:
        with lock:
          i = counter[0]
          if i >= requests or time.perf_counter() - t0[0] > duration_s:
            return out
          counter[0] += 1
        spec = make(i, rng)
        out.append(request(url, spec.get("body"), method=spec.get("method", "POST"),
                           path=spec.get("path", "/v1/completions"),
                           headers=spec.get("headers"), api_key=api_key,
                           kind=spec.get("kind", "valid"),
                           disconnect_after=spec.get("disconnect_after"), client=client))
    finally:
      client.close()

  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    futures = [pool.submit(worker, w) for w in range(clients)]
    ready.wait(timeout=60)
    t0[0] = time.perf_counter()
    results = [r for f in futures for r in f.result()]
  return results, time.perf_counter() - t0[0]


def summary(results: list[Result], wall: float) -> dict:
  """Counts by kind and status, 5xx, valid requests not answered completely, tokens/s, TTFT."""
  valid = [r for r in results if r.kind == "valid"]
  ttft = sorted(r.ttft for r in valid if r.ttft is not None)
  pick = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else None
  statuses: dict[str, int] = {}
  for r in results:
    statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
  return {
      "requests": len(results), "wall_s": wall, "statuses": statuses,
      "server_errors": sum(r.status >= 500 or r.status == 0 for r in results
                           if r.kind != "disconnect"),
      "valid": len(valid), "valid_incomplete": sum(not r.complete for r in valid),
      "tokens": sum(r.tokens for r in valid),
      "tokens_per_s": sum(r.tokens for r in valid) / wall if wall > 0 else 0.0,
      "ttft_p50_s": pick(0.5), "ttft_p90_s": pick(0.9),
  }
