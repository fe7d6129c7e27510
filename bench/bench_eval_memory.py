"""Peak memory of one BrierLM evaluation batch by compile-only analysis (nothing is run).

  python -m bench.bench_eval_memory [--config configs/transformer_s.yaml] [--stage ar,calm]
      [--block 2048] [--batch 8] [--groups 0,all]

Lowers `evaluate._score_batch` on abstract parameters and ids and reads XLA's memory analysis of
the compiled program for the default backend (on CPU this is the CPU compiler's buffer
assignment: an estimate of what one accelerator holds, parameters included). `group` 0 is the
automatic choice; `all` scores every position at once.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from bench import common
from calm import config, evaluate
from calm.errors import cli
from calm.models.ar import ARModel
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM


def measure(cfg: config.Config, stage: str, block: int, batch: int, group: int) -> dict:
  m = cfg.model
  if stage == "ar":
    models = (nnx.eval_shape(lambda: ARModel(m, rngs=nnx.Rngs(0))),)
  else:
    models = (nnx.eval_shape(lambda: CALM(m, rngs=nnx.Rngs(0))),
              nnx.eval_shape(lambda: Autoencoder(m, rngs=nnx.Rngs(1))))
  defs, states = zip(*(nnx.split(x) for x in models))
  K = m.chunk_size
  n_pos = block // K
  if group == 0:
    group = evaluate.auto_group(stage, batch, m.vocab_size, K)
  group = min(group, n_pos)
  ids = jax.ShapeDtypeStruct((batch, block), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  lowered = evaluate._score_batch.lower(states, ids, key, kind=stage, graphdefs=defs,
                                        chunk_size=K, group=group)
  mem = lowered.compile().memory_analysis()
  gib = 1 << 30
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(states))
  return {"stage": stage, "block": block, "batch": batch, "group": group,
          "params_gib": params / gib,
          "args_gib": mem.argument_size_in_bytes / gib,
          "temp_gib": mem.temp_size_in_bytes / gib,
          "output_gib": mem.output_size_in_bytes / gib,
          "peak_gib": (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                       + mem.output_size_in_bytes) / gib,
          "backend": jax.default_backend()}


@cli
def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/transformer_s.yaml")
  ap.add_argument("--stage", default="ar,calm")
  ap.add_argument("--block", type=int, default=2048)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--groups", default="0", help="comma list; 0 = automatic, all = every position")
  ap.add_argument("--out", default=str(common.RESULTS / "eval_memory.json"))
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args(argv)
  cfg = config.load(args.config, args.overrides)
  rows = []
  for stage in args.stage.split(","):
    for g in args.groups.split(","):
      r = measure(cfg, stage, args.block, args.batch, 1 << 30 if g == "all" else int(g))
      rows.append(r)
      print(f"{stage:<5} block {r['block']} batch {r['batch']} group {r['group']:>4}: "
            f"peak {r['peak_gib']:.2f} GiB (params {r['params_gib']:.2f}, temp "
            f"{r['temp_gib']:.2f}) [{r['backend']} compile-only]", flush=True)
  common.write_results(args.out, rows, common.machine(), common.load_average())
  return 0


if __name__ == "__main__":
  sys.exit(main())
