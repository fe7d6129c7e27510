"""Generation throughput: CALM at T=1 and T=0.5 (exact and batch samplers) and the AR baseline.

  python -m bench.bench_generate [--sizes tiny] [--batches 1,8] [--rounds 3] [--out FILE]
                                 [--heads energy,flow,diffusion]

Randomly initialised models: speed does not depend on the weights, except for the exact
sampler, whose cost per chunk is (draws per chunk) × (one head sample + AE decode). The head's
zero-initialised output layer is replaced by a random one so that samples depend on the noise;
a random AE then turns almost every draw into a different chunk (the exact sampler would hit
max_attempts every time), unlike a trained, peaked model. The exact sampler is therefore timed
on the zero-output head, where all draws agree: its minimum cost at T=0.5, n=2 draws per chunk
(`draws` column); a model with collision probability Σ P(x)² needs about 2/Σ P(x)² draws.
The batch sampler's cost (N=200 candidates) does not depend on the weights. EOS is disabled so
every row generates `max_new_tokens`. Compilation is timed separately (first call). With
`--heads`, the flow and diffusion heads (official sampler settings: 20 and 100 network calls per
sample) are timed at T=1 (`calm_flow_T1`, `calm_diffusion_T1`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx

from bench import common
from calm import engine, sampling
from calm.errors import CalmError, cli
from calm.models.ar import ARModel
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM

PROMPT_TOKENS = 16
NO_EOS, PAD = -1, 0
HEAD_OUT_SCALE = 0.02  # std of the benchmark head's output kernel (see the module docstring)


def build_models(size: common.Size, head: str = "energy"):
  """(CALM with a random output layer, the same CALM with a zero one, AE, AR)."""
  m = dataclasses.replace(size.model, head=dataclasses.replace(size.model.head, kind=head))
  peaked = CALM(m, rngs=nnx.Rngs(0))
  calm = CALM(m, rngs=nnx.Rngs(0))
  g = calm.generator
  w = g.out_fc2.kernel if head == "energy" else g.net.final.out.kernel
  w[...] = HEAD_OUT_SCALE * jax.random.normal(jax.random.key(9), w.shape)
  return calm, peaked, Autoencoder(m, rngs=nnx.Rngs(1)), ARModel(m, rngs=nnx.Rngs(2))


def modes(size: common.Size, calm, peaked, ae, ar, head: str = "energy"
          ) -> dict[str, tuple[Callable, int]]:
  """name → (fn(prompts, key, new) → (tokens, stats), max_new_tokens)."""
  def calm_fn(sampler, calm=calm):
    def f(prompts, key, new):
      return engine.generate_calm(calm, ae, prompts, key, max_new_tokens=new, sampler=sampler,
                                    eos_id=NO_EOS, pad_id=PAD)
    return f

  def ar_fn(prompts, key, new):
    return engine.generate_ar(ar, prompts, key, max_new_tokens=new, eos_id=NO_EOS,
                                pad_id=PAD), {}

  if head != "energy":
    return {f"calm_{head}_T1": (calm_fn(sampling.ChunkSampler(1.0)), 64)}
  return {
      "calm_T1": (calm_fn(sampling.ChunkSampler(1.0)), 128),
      "calm_T0.5_exact": (calm_fn(sampling.ChunkSampler(0.5, "exact"), peaked), 64),
      "calm_T0.5_batch": (calm_fn(sampling.ChunkSampler(0.5, "batch", num_candidates=200)), 16),
      "ar_T1": (ar_fn, 128),
  }


def run(sizes: list[str], batches: list[int], rounds: int,
        heads: tuple[str, ...] = ("energy",)) -> list[dict]:
  rows = []
  for name in sizes:
    size = common.SIZES[name]
    built = {h: build_models(size, h) for h in heads}
    rng = np.random.default_rng(0)
    for b in batches:
      prompts = rng.integers(4, size.model.vocab_size, (b, PROMPT_TOKENS)).tolist()
      fns, info = {}, {}
      all_modes = {k: v for h in heads for k, v in modes(size, *built[h], h).items()}
      for mode, (fn, new) in all_modes.items():
        common.reset_peak_rss()
        t = time.perf_counter()
        out, _ = fn(prompts, jax.random.key(0), new)
        first_s = time.perf_counter() - t
        info[mode] = {"new": new, "first_s": first_s, "stats": [],
                      "peak_memory_mib": common.peak_memory_mib()}
        assert all(len(r) == new for r in out), "every row should generate max_new_tokens"

        def timing(fn=fn, new=new, mode=mode):
          t = time.perf_counter()
          _, stats = fn(prompts, jax.random.key(len(info[mode]["stats"]) + 1), new)
          info[mode]["stats"].append(stats)
          return time.perf_counter() - t
        fns[mode] = timing
        print(f"  {name} {mode} batch {b}: first call {first_s:.1f}s", flush=True)
      times = common.interleave(fns, rounds)
      for mode, secs in times.items():
        t = common.summary(secs)
        i = info[mode]
        draws = [s["mean_draws"] for s in i["stats"] if "mean_draws" in s]
        rows.append({"size": name, "mode": mode, "batch": b, "new_tokens": i["new"],
                     "prompt_tokens": PROMPT_TOKENS, "seconds": t["median_s"],
                     "spread": t["spread"], "tokens_per_s": b * i["new"] / t["median_s"],
                     "compile_and_first_s": i["first_s"],
                     "mean_draws": float(np.mean(draws)) if draws else None,
                     "peak_memory_mib": i["peak_memory_mib"]})
  return rows


def print_rows(rows: list[dict]) -> None:
  print(f"{'size':<6} {'mode':<18} {'batch':>5} {'new':>4} {'tokens/s':>9} {'first s':>8} "
        f"{'draws':>6} {'peak MiB':>8}")
  for r in rows:
    print(f"{r['size']:<6} {r['mode']:<18} {r['batch']:>5} {r['new_tokens']:>4} "
          f"{r['tokens_per_s']:>9,.1f} {r['compile_and_first_s']:>8.1f} "
          f"{common.fmt(r['mean_draws'], 1):>6} {r['peak_memory_mib']:>8.0f}")


@cli
def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="tiny")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--out", default=str(common.RESULTS / "generate.json"))
  ap.add_argument("--heads", default="energy", help="comma-separated: energy,flow,diffusion")
  args = ap.parse_args(argv)
  heads = tuple(args.heads.split(","))
  bad = [h for h in heads if h not in ("energy", "flow", "diffusion")]
  if bad:
    raise CalmError(f"--heads: unknown head {bad[0]!r} (energy, flow or diffusion)")
  info, load0 = common.machine(), common.load_average()
  rows = run(args.sizes.split(","), [int(b) for b in args.batches.split(",")], args.rounds,
             heads)
  print_rows(rows)
  common.write_results(args.out, rows, info, load0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
