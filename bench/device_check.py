"""One accelerator, one JSON: bf16 matmul peak, CALM-M and Transformer-S training steps at the
official micro-batch, CALM vs AR generation at batch 1 and 64.

  python -m bench.device_check [--out device_check.json] [--tiny]

The training steps are the trainer's own (`trainer.setup`: optimizer, shardings, jit, donation)
on random token ids, from `configs/paper/calm_m.yaml` and `transformer_s.yaml` as configured
(bf16, remat, scanned layers, `model.attention: auto` = cuDNN on a GPU) with one micro-batch per
step (4 × 8192 and 4 × 2048 tokens). CALM trains on a random frozen autoencoder (the step's cost
does not depend on its weights). MFU = model FLOPs/token × tokens/s / the measured peak. Memory:
the device's peak bytes in use (accelerators), else the compiled step's arguments + temporaries.
Generation: randomly initialised CALM-M / Transformer-S (`bench.bench_generate`'s models), T = 1,
EOS off, 16-token prompts. Programs go through the compilation cache (`calm.compile_cache`),
so a second check loads them (`compile_from_cache`). On a machine without an accelerator (or
with --tiny) every model is shrunk to a few layers of width 64 (float32, no remat, generation at
batch 1 and 4) so that the check ends quickly, and the JSON says `"tiny": true`: its numbers
only show that the check works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
MICRO_BATCH = 4  # sequences per device: the official micro-batch of CALM-M and Transformer-S
PROMPT_TOKENS = 16
# Tiny shapes for a CPU: the paper configs with every size cut down.
TINY = ["model.vocab_size=512", "model.backbone.hidden_dim=64", "model.backbone.num_layers=2",
        "model.backbone.num_heads=2", "model.backbone.num_kv_heads=2",
        "model.backbone.ffn_dim=128", "model.autoencoder.hidden_dim=64",
        "model.autoencoder.ffn_dim=128", "model.autoencoder.num_encoder_layers=1",
        "model.autoencoder.num_decoder_layers=1", "model.latent_dim=16", "model.head.noise_dim=16",
        "model.head.num_blocks=1", "model.head.num_target_samples=16", "data.block_tokens=64",
        "model.dtype=float32", "model.remat=none"]  # XLA:CPU compiles bf16 and remat slowly


def paper_config(name: str, tiny: bool):
  """A paper config at one micro-batch per device (tiny: cut down)."""
  import jax

  from calm import config

  n = jax.device_count()
  # scanned layers: a short compile inside the check's time budget (configs/paper/calm_m.yaml
  # unrolls them for a v5e chip's memory; a GPU has room for the scanned step)
  over = [f"train.batch_size={MICRO_BATCH * n}", "train.grad_accum=1", "train.warmup_steps=10",
          "model.scan_layers=true"]
  return config.load(PAPER / f"{name}.yaml", over + (TINY if tiny else []))


def peak_flops(tiny: bool) -> float:
  import jax.numpy as jnp

  from calm import metrics

  return metrics.measure_peak_flops(256 if tiny else 8192, dtype=jnp.bfloat16)


def train_step(name: str, label: str, tiny: bool, peak: float, steps: int) -> dict:
  """Compiles `name`'s training step and times `steps` of it."""
  import jax
  import numpy as np

  from bench import common
  from calm import compile_cache, metrics, rng, sharding, stages, trainer
  from calm.models import attention

  cfg = paper_config(name, tiny)
  ae = None
  if cfg.stage == "calm":
    ae_cfg = dataclasses.replace(cfg, stage="autoencoder", seed=1)
    ae = sharding.sharded_init(lambda: stages.build_model(ae_cfg), sharding.make_mesh(cfg.mesh))
  s = trainer.setup(cfg, autoencoder=ae)
  batch, seq = cfg.train.batch_size, cfg.data.block_tokens
  ids = jax.device_put(np.random.default_rng(0).integers(
      0, cfg.model.vocab_size, (batch, seq), dtype=np.int32), s.batch_sharding)
  key = rng.stream(0, rng.TRAIN)
  t, hits = time.perf_counter(), compile_cache.counts["hits"]
  compiled = s.lower().compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  params, opt = s.params, s.opt_state

  def run(n: int, offset: int) -> float:
    nonlocal params, opt
    t = time.perf_counter()
    for i in range(n):
      params, opt, m = compiled(params, opt, ids, jax.random.fold_in(key, offset + i), s.ae_params)
    jax.block_until_ready((params, m))
    return time.perf_counter() - t

  run(1, 0)  # first execution (allocation) outside the timing
  step_s = run(steps, 1) / steps
  tokens = batch * seq
  fpt = metrics.model_flops_per_token(cfg)
  tok_s = tokens / step_s
  device_peak = common.device_peak_mib()
  compiled_mib = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20 if mem else None
  return {"model": label, "config": f"configs/paper/{name}.yaml", "params": s.num_params,
          "micro_batch": f"{MICRO_BATCH} x {seq} per device", "devices": jax.device_count(),
          "dtype": cfg.model.dtype, "remat": cfg.model.remat, "scan_layers": cfg.model.scan_layers,
          "attention": attention.resolve(cfg.model.attention, cfg.model.dtype),
          "compile_s": compile_s,
          "compile_from_cache": compile_cache.counts["hits"] > hits, "step_s": step_s, "tokens_per_s": tok_s,
          "model_flops_per_token": fpt, "tflops_per_s": tok_s * fpt / 1e12,
          "mfu": tok_s * fpt / (peak * jax.device_count()),
          "device_peak_mib": device_peak if jax.default_backend() != "cpu" else None,
          "compiled_args_plus_temps_mib": compiled_mib}


def generation(tiny: bool, batches: tuple[int, ...], new_tokens: int) -> list[dict]:
  """CALM (energy head, T = 1) and AR tokens/s at each batch size."""
  import jax
  import numpy as np

  from flax import nnx

  from bench import bench_generate, common
  from calm import engine, sampling
  from calm.models.ar import ARModel

  calm_cfg, ar_cfg = paper_config("calm_m", tiny), paper_config("transformer_s", tiny)
  size = common.Size("calm_m", calm_cfg.model, 1, calm_cfg.data.block_tokens)
  calm, _, ae, _ = bench_generate.build_models(size)
  ar = ARModel(ar_cfg.model, rngs=nnx.Rngs(2))
  no_eos, pad = bench_generate.NO_EOS, bench_generate.PAD
  fns = {
      "CALM-M": lambda p, k: engine.generate_calm(calm, ae, p, k, max_new_tokens=new_tokens,
                                                  sampler=sampling.ChunkSampler(1.0),
                                                  eos_id=no_eos, pad_id=pad)[0],
      "Transformer-S": lambda p, k: engine.generate_ar(ar, p, k, max_new_tokens=new_tokens,
                                                       eos_id=no_eos, pad_id=pad),
  }
  rows = []
  rng = np.random.default_rng(0)
  for b in batches:
    for label, fn in fns.items():
      vocab = calm_cfg.model.vocab_size if label == "CALM-M" else ar_cfg.model.vocab_size
      prompts = rng.integers(4, vocab, (b, PROMPT_TOKENS)).tolist()
      t = time.perf_counter()
      out = fn(prompts, jax.random.key(0))
      first_s = time.perf_counter() - t
      assert all(len(r) == new_tokens for r in out)
      t = time.perf_counter()
      fn(prompts, jax.random.key(1))
      secs = time.perf_counter() - t
      rows.append({"model": label, "batch": b, "prompt_tokens": PROMPT_TOKENS,
                   "new_tokens": new_tokens, "seconds": secs,
                   "tokens_per_s": b * new_tokens / secs, "compile_and_first_s": first_s})
  return rows


def check(tiny: bool | None = None, steps: int | None = None) -> dict:
  """Everything above, as one dict."""
  import jax

  from bench import common
  from calm import compile_cache

  t0 = time.perf_counter()
  cache = compile_cache.enable()  # a second check loads its programs (compile_from_cache)
  tiny = jax.default_backend() == "cpu" if tiny is None else tiny
  steps = steps or (2 if tiny else 10)
  dev = jax.devices()[0]
  stats = {}
  try:
    stats = dev.memory_stats() or {}
  except Exception:  # backends without memory statistics
    pass
  peak = peak_flops(tiny)
  out = {"tiny": tiny,
         "note": ("tiny sizes on a machine without an accelerator: these numbers only show "
                  "that the check runs") if tiny else "official micro-batch, paper sizes",
         "machine": common.machine(), "device_count": jax.device_count(),
         "device_memory_gib": stats["bytes_limit"] / 2**30 if "bytes_limit" in stats else None,
         "peak_bf16_tflops": peak / 1e12, "compilation_cache": cache, "train": [],
         "generate": []}
  for name, label in (("calm_m", "CALM-M"), ("transformer_s", "Transformer-S")):
    out["train"].append(train_step(name, label, tiny, peak, steps))
    print(_train_line(out["train"][-1]), flush=True)
  out["generate"] = generation(tiny, (1, 4) if tiny else (1, 64), 16 if tiny else 64)
  for r in out["generate"]:
    print(f"generate {r['model']:<14} batch {r['batch']:>3}: {r['tokens_per_s']:,.1f} tokens/s "
          f"(first call {r['compile_and_first_s']:.1f} s)", flush=True)
  out["seconds"] = time.perf_counter() - t0
  return out


def _train_line(r: dict) -> str:
  mem = r["device_peak_mib"] or r["compiled_args_plus_temps_mib"]
  return (f"train {r['model']:<14} {r['micro_batch']}: {r['step_s'] * 1e3:,.1f} ms/step, "
          f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}, {mem:,.0f} MiB, compile "
          f"{r['compile_s']:.1f} s{' (from the cache)' if r['compile_from_cache'] else ''} "
          f"({r['attention']} attention, remat {r['remat']})")


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="device_check.json")
  ap.add_argument("--tiny", action="store_true", help="tiny sizes even on an accelerator")
  ap.add_argument("--steps", type=int, default=0, help="timed training steps (default 10; 2 tiny)")
  args = ap.parse_args(argv)
  import jax

  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()})", flush=True)
  result = check(tiny=True if args.tiny else None, steps=args.steps or None)
  text = json.dumps(result, indent=2)
  pathlib.Path(args.out).write_text(text + "\n")
  print(text)
  print(f"wrote {args.out} in {result['seconds']:.0f} s")
  return 0


if __name__ == "__main__":
  from calm.errors import cli

  sys.exit(cli(main)())
