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

import jax
import numpy as np

from calm import paths, run, sampling
from calm.errors import CalmError, ConfigError


class StreamPrinter:
  """Prints one sample's text as its tokens arrive from the device (whole-text re-decode, so
  multi-token characters are never split)."""

  def __init__(self, tok, prompt: str, max_new_tokens: int):
    self.tok, self.max_new, self.ids, self.shown = tok, max_new_tokens, [], ""
    print("--- sample 0 ---")
    print(prompt, end="", flush=True)

  def __call__(self, ids_BK) -> None:
    for t in np.asarray(ids_BK)[0].tolist():
      if len(self.ids) >= self.max_new or (self.ids and self.ids[-1] == self.tok.eos_id):
        return
      self.ids.append(t)
    self._show(self.ids)

  def _show(self, ids) -> None:
    text = self.tok.decode(ids)
    if text.startswith(self.shown) and not text.endswith("\ufffd"):
      print(text[len(self.shown):], end="", flush=True)
      self.shown = text

  def finish(self, final_ids) -> None:
    """Prints whatever the stream has not shown yet (the final ids are authoritative)."""
    text = self.tok.decode(final_ids)
    print(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text, flush=True)


def read_prompt(prompt: str | None, file: str | None) -> str:
  """The prompt text: --prompt, else the UTF-8 contents of --file, else stdin."""
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
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args(argv)
  extra = [f"sampling.{k}={v}" for k, v in (
      ("temperature", args.temperature), ("sampler", args.sampler),
      ("num_samples", args.num_samples), ("max_new_tokens", args.max_tokens),
      ("seed", args.seed)) if v is not None]
  cfg = paths.load_config(args.config, list(args.overrides) + extra)
  s = cfg.sampling
  if cfg.stage not in ("calm", "ar"):
    raise ConfigError(f"stage: sampling needs a calm or ar run, got {cfg.stage}")
  text = read_prompt(args.prompt, args.file)
  r = run.load(cfg, stages_allowed=("calm", "ar"))
  tok = r.tokenizer
  prompt = tok.encode(text) or [tok.eos_id]
  context = cfg.data.block_tokens  # the length the model was trained on
  if len(prompt) + s.max_new_tokens > context:
    raise CalmError(f"prompt too long: {len(prompt)} tokens + sampling.max_new_tokens="
                    f"{s.max_new_tokens} exceed the model's training context of {context} "
                    f"tokens (data.block_tokens); shorten the prompt or generate fewer tokens")
  prompts = [prompt] * s.num_samples
  key = jax.random.key(s.seed)
  stream = StreamPrinter(tok, text, s.max_new_tokens) if s.num_samples == 1 else None
  t0 = time.time()
  stats = {}
  if cfg.stage == "calm":
    sampler = sampling.ChunkSampler(s.temperature, s.sampler, s.num_candidates, s.max_attempts,
                                    s.draws_per_step)
    outs, stats = sampling.generate_calm(r.model, r.autoencoder.model, prompts, key,
                                         max_new_tokens=s.max_new_tokens, sampler=sampler,
                                         eos_id=tok.eos_id, pad_id=tok.pad_id, on_tokens=stream)
  else:
    outs = sampling.generate_ar(r.model, prompts, key, max_new_tokens=s.max_new_tokens,
                                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                eos_id=tok.eos_id, pad_id=tok.pad_id, on_tokens=stream)
  dt = time.time() - t0
  if stream is not None:
    stream.finish(outs[0])
  else:
    for i, out in enumerate(outs):
      print(f"--- sample {i} ---")
      print(text + tok.decode(out), flush=True)
  n = sum(map(len, outs))
  extra_stats = (f", {stats['mean_draws']:.1f} draws/chunk, {stats['capped']} capped"
                 if stats else "")
  print(f"[{n} tokens in {dt:.2f}s incl. compile: {n / max(dt, 1e-9):.1f} tokens/s{extra_stats}]",
        file=sys.stderr)
  return 0
