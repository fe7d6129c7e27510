"""The OpenAI completions protocol: request validation (every mistake → an `ApiError` naming the
field) and response bodies. Pure Python: no jax, no HTTP."""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from typing import Any

MAX_STOP = 4  # stop strings per request, as in the OpenAI API
MAX_SEED = 2**31 - 1


class ApiError(Exception):
  """An error answered as an OpenAI-style body: {"error": {message, type, param, code}}."""

  def __init__(self, status: int, message: str, param: str | None = None,
               kind: str = "invalid_request_error", code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind, self.code = (status, message, param, kind,
                                                                   code)

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                      "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Limits:
  """What the server accepts: its model id, context (prompt + new tokens), most choices per
  request, whether it is a CALM run (sampler field, top_p) and the highest temperature."""

  model: str
  context: int
  max_n: int
  default_max_tokens: int
  max_temperature: float
  samplers: tuple[str, ...]  # () when the model has no sampler choice (AR)
  default_sampler: str = "exact"


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
  prompts: tuple[str, ...]
  max_tokens: int
  temperature: float
  top_p: float
  n: int
  stop: tuple[str, ...]
  seed: int | None
  stream: bool
  include_usage: bool
  sampler: str
  ignore_eos: bool = False


# fields OpenAI defines that this server accepts only at their neutral value
_NEUTRAL = {"echo": (False,), "logprobs": (None, 0), "best_of": (None, 1),
            "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
            "logit_bias": (None, {}), "suffix": (None, ""), "user": None}
_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
           "stream", "stream_options", "sampler", "ignore_eos", *_NEUTRAL}


def _number(body: dict, key: str, default: float) -> float:
  v = body.get(key)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise ApiError(400, f"{key} must be a number, got {type(v).__name__}", key)
  if not math.isfinite(v):
    raise ApiError(400, f"{key} must be a finite number", key)
  return float(v)


def _integer(body: dict, key: str, default: int | None) -> int | None:
  v = body.get(key)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, int):
    if isinstance(v, float) and v.is_integer():
      return int(v)
    raise ApiError(400, f"{key} must be an integer, got {json.dumps(v)[:40]}", key)
  return v


def _boolean(body: dict, key: str) -> bool:
  v = body.get(key, False)
  if v is None:
    return False
  if not isinstance(v, bool):
    raise ApiError(400, f"{key} must be true or false, got {json.dumps(v)[:40]}", key)
  return v


def decode_body(raw: bytes) -> dict:
  """The request body as a JSON object, or an ApiError saying what is wrong with it."""
  if not raw:
    raise ApiError(400, "the request body is empty; send a JSON object")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ApiError(400, f"the request body is not UTF-8 (invalid byte at offset {e.start})")
  try:
    body = json.loads(text)
  except json.JSONDecodeError as e:
    raise ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} "
                        f"column {e.colno}")
  if not isinstance(body, dict):
    raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
  return body


def parse_completion(body: dict, limits: Limits) -> CompletionRequest:
  """A validated completion request; prompt lengths are checked later (they need the
  tokenizer)."""
  unknown = sorted(set(body) - _FIELDS)
  if unknown:
    raise ApiError(400, f"unknown field {unknown[0]!r}", unknown[0])
  for key, allowed in _NEUTRAL.items():
    if allowed is not None and key in body and body[key] not in allowed:
      raise ApiError(400, f"{key} is not supported by this server (leave it unset)", key)
  if body.get("user") is not None and not isinstance(body["user"], str):
    raise ApiError(400, "user must be a string", "user")
  model = body.get("model")
  if model is not None and model != limits.model:
    raise ApiError(404, f"model {str(model)[:80]!r} does not exist; this server serves "
                        f"{limits.model!r}", "model", code="model_not_found")

  prompt = body.get("prompt")
  if prompt is None:
    raise ApiError(400, "prompt is required (a string or a list of strings)", "prompt")
  prompts = [prompt] if isinstance(prompt, str) else prompt
  if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
    raise ApiError(400, "prompt must be a string or a list of strings (token-id prompts are "
                        "not supported)", "prompt")
  if not prompts:
    raise ApiError(400, "prompt must not be an empty list", "prompt")
  if any(not p for p in prompts):
    raise ApiError(400, "prompt must not be empty", "prompt")

  max_tokens = _integer(body, "max_tokens", limits.default_max_tokens)
  if max_tokens < 1:
    raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
  if max_tokens >= limits.context:
    raise ApiError(400, f"max_tokens {max_tokens} leaves no room for the prompt in the model's "
                        f"context of {limits.context} tokens", "max_tokens")
  temperature = _number(body, "temperature", 1.0)
  if not 0.0 <= temperature <= limits.max_temperature:
    raise ApiError(400, f"temperature must be in [0, {limits.max_temperature:g}], got "
                        f"{temperature:g}", "temperature")
  top_p = _number(body, "top_p", 1.0)
  if not 0.0 < top_p <= 1.0:
    raise ApiError(400, f"top_p must be in (0, 1], got {top_p:g}", "top_p")
  if top_p < 1.0 and limits.samplers:
    raise ApiError(400, "top_p applies to token-by-token models; a CALM model draws whole "
                        "chunks, use temperature", "top_p")
  n = _integer(body, "n", 1)
  if not 1 <= n <= limits.max_n:
    raise ApiError(400, f"n must be between 1 and {limits.max_n}, got {n}", "n")
  if n * len(prompts) > limits.max_n:
    raise ApiError(400, f"{len(prompts)} prompts × n={n} choices exceed the {limits.max_n} "
                        f"choices a request may ask for", "n")

  stop = body.get("stop")
  stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
  if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
    raise ApiError(400, "stop must be a non-empty string or a list of them", "stop")
  if len(stops) > MAX_STOP:
    raise ApiError(400, f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")

  seed = _integer(body, "seed", None)
  if seed is not None and not 0 <= seed <= MAX_SEED - limits.max_n:
    raise ApiError(400, f"seed must be in [0, {MAX_SEED - limits.max_n}], got {seed}", "seed")
  stream = _boolean(body, "stream")
  options = body.get("stream_options")
  include_usage = False
  if options is not None:
    if not stream:
      raise ApiError(400, "stream_options needs stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
      raise ApiError(400, "stream_options takes only include_usage", "stream_options")
    include_usage = _boolean(options, "include_usage")

  sampler = body.get("sampler")
  if sampler is not None and not limits.samplers:
    raise ApiError(400, "sampler applies to CALM models only", "sampler")
  sampler = limits.default_sampler if sampler is None else sampler
  if limits.samplers and sampler not in limits.samplers:
    raise ApiError(400, f"sampler must be one of {', '.join(limits.samplers)}, got "
                        f"{json.dumps(sampler)[:40]}", "sampler")
  return CompletionRequest(tuple(prompts), max_tokens, temperature, top_p, n, tuple(stops), seed,
                           stream, include_usage, sampler, _boolean(body, "ignore_eos"))


def completion_id() -> str:
  return f"cmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, choices: list[dict], use: dict | None) -> dict[str, Any]:
  """A completion (or one streamed chunk of it)."""
  out = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
         "choices": choices}
  if use is not None:
    out["usage"] = use
  return out


def choice(index: int, text: str, finish_reason: str | None) -> dict:
  return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
