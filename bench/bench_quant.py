"""Inference precision (float32 / bf16 / int8 weights, bf16 KV cache): quality on trained runs,
bytes per compiled decode step on a TPU v5e through the TPU compiler, and CPU generation speed.

  python bench/bench_quant.py [--runs /path/to/demo] [--parts quality,tpu,speed]

quality: held-out metrics of the demo runs (`scripts/demo.sh`: RUNS/{ae,calm,ar}) per weight
precision: autoencoder token accuracy from μ, AR cross-entropy, CALM energy loss and normalised
score (paired differences against float32 on the same blocks and keys, with their standard
errors), BrierLM of CALM and AR with bootstrap intervals.
tpu: the engine's decode step (CALM-M with its autoencoder, Transformer-S; configs/calm_m.yaml,
configs/transformer_s.yaml) lowered with abstract arguments and compiled by libtpu for one chip
of a v5e:2x2 slice (`pip install -e '.[tpu]'`): `cost_analysis()` bytes accessed, weight and
cache bytes, `memory_analysis()`; at batch 1 and at the batch whose weights + cache fill 16 GiB.
speed: tokens/s of `Run.engine.generate` at batch 1 and 8 (compile excluded) on this CPU.
Writes bench/results/quant.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 2**30
V5E_HBM = 16 * GiB
PRECISIONS = (("float32", None), ("bf16", None), ("int8", None), ("int8", "bf16"))


def _name(weights, cache):
  return weights + (f" + {cache} cache" if cache else "")


# ----------------------------------------------------------------------------- quality


def _mean_se(x):
  import numpy as np

  x = np.asarray(x, np.float64)
  return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None


def _ar_ce(r, blocks, batch):
  """Held-out next-token cross-entropy per batch of blocks."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  gd, st = nnx.split(r.model)
  fn = jax.jit(lambda st, ids: r.stage.evaluate(nnx.merge(gd, st), None, ids, None)["ce"])
  return [float(fn(st, jnp.asarray(blocks[i:i + batch])))
          for i in range(0, len(blocks) - batch + 1, batch)]


def _energy_losses(r, blocks):
  """CALM held-out energy loss per micro-batch, with the keys of `evaluate.energy_report`."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from calm import losses, rng

  rc = r.loaded.config
  gd, st = nnx.split(r.model)
  agd, ast = nnx.split(r.autoencoder.model)
  fn = jax.jit(lambda st, ast, ids, key: losses.calm_loss(
      nnx.merge(gd, st), nnx.merge(agd, ast), ids, key, rc.model)[1]["loss"])
  micro = rc.train.micro_batch
  return [float(fn(st, ast, jnp.asarray(blocks[i:i + micro]), rng.eval_row_keys(rc.seed, i, micro)))
          for i in range(0, len(blocks) - micro + 1, micro)]


def quality(runs: pathlib.Path, *, ae_blocks: int, ar_blocks: int, energy_batches: int,
            brier_docs: int, which: set[str], rows: list[dict] | None = None) -> list[dict]:
  import calm
  from calm import paths

  old = {r["weights"]: r for r in rows or []}
  rows, base = [], {}
  for weights, cache in PRECISIONS[:3]:  # the cache is not used by these evaluations
    row = {k: v for k, v in old.get(weights, {}).items()
           if not any(k.startswith(w + "_") for w in which)}
    row["weights"] = weights
    source = paths.load_config(runs / "ae" / paths.CONFIG_FILE, []).data.eval
    if "ae" in which:
      row.update(_ae_quality(calm.open(runs / "ae", weights=weights), source, ae_blocks))
    if "ar" in which:
      row.update(_ar_quality(calm.open(runs / "ar", weights=weights), source, ar_blocks,
                             brier_docs, base))
    if "calm" in which:
      cr = calm.open(runs / "calm", overrides=[f"train.eval_batches={energy_batches}"],
                     weights=weights)
      row.update(_calm_quality(cr, source, energy_batches, brier_docs, base))
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def _ae_quality(ae, source, ae_blocks):
  from calm import evaluate, quantize

  row = {}
  row["ae_weight_mib"] = quantize.weight_bytes(ae.model) / 2**20
  ev = dataclasses.replace(ae.config.eval, max_documents=ae_blocks)
  rec = evaluate.reconstruction_report(ae, source, ev)
  row["ae_token_acc"] = rec["token_acc"]
  return row


def _ar_quality(ar, source, ar_blocks, brier_docs, base):
  import numpy as np

  from calm import data, quantize

  row = {"ar_step": ar.step}
  row["ar_weight_mib"] = quantize.weight_bytes(ar.model) / 2**20
  blocks = data.eval_blocks(ar.config, ar.tokenizer, None, source)[:ar_blocks]
  ce = _ar_ce(ar, blocks, ar.config.eval.batch_size)
  row["ar_ce"], row["ar_ce_se"] = _mean_se(ce)
  base.setdefault("ce", ce)
  row["ar_ce_diff"], row["ar_ce_diff_se"] = _mean_se(np.subtract(ce, base["ce"]))
  s = ar.score(source, max_documents=brier_docs)
  row["ar_brierlm"], row["ar_brierlm_se"], row["ar_brierlm_ci95"] = (
      s.brierlm, s.brierlm_se, s.brierlm_ci95)
  return row


def _calm_quality(cr, source, energy_batches, brier_docs, base):
  import numpy as np

  from calm import data, evaluate, quantize

  row = {"calm_step": cr.step}
  row["calm_weight_mib"] = (quantize.weight_bytes(cr.model)
                            + quantize.weight_bytes(cr.autoencoder.model)) / 2**20
  docs = data.tokenized_documents(source, cr.config.data, cr.tokenizer)
  tokens = np.concatenate(docs)
  e = evaluate.energy_report(cr.config, cr.loaded, cr.autoencoder.model, tokens, source)
  rc = cr.loaded.config
  eblocks = data.pack_blocks(tokens, rc.data.block_tokens)[:energy_batches * rc.train.batch_size]
  el = _energy_losses(cr, eblocks)
  base.setdefault("energy", el)
  row["calm_energy_loss"], row["calm_energy_loss_se"] = _mean_se(el)
  row["calm_energy_diff"], row["calm_energy_diff_se"] = _mean_se(
      np.subtract(el, base["energy"]))
  row["calm_baseline_loss"], row["calm_oracle_loss"] = e["baseline_loss"], e["oracle_loss"]
  row["calm_norm_score"] = e.get("norm_score")
  gap = e["baseline_loss"] - e["oracle_loss"]
  row["calm_norm_score_se"] = (row["calm_energy_loss_se"] / gap if gap > 0 else None)
  s = cr.score(source, max_documents=brier_docs)
  row["calm_brierlm"], row["calm_brierlm_se"], row["calm_brierlm_ci95"] = (
      s.brierlm, s.brierlm_se, s.brierlm_ci95)
  return row


def quality_table(rows: list[dict]) -> str:
  f = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"
  rows = [{**{k: None for k in ("ae_token_acc", "ar_ce", "ar_ce_se", "ar_ce_diff",
                                "ar_ce_diff_se", "calm_energy_loss", "calm_energy_loss_se",
                                "calm_energy_diff", "calm_energy_diff_se", "calm_norm_score",
                                "calm_norm_score_se", "calm_brierlm", "calm_brierlm_ci95",
                                "ar_brierlm", "ar_brierlm_ci95")}, **r} for r in rows]
  ci = lambda c: "n/a" if c is None else f"[{c[0]:.2f}, {c[1]:.2f}]"
  out = ["| weights | AE token acc (μ) | AR CE (nats) | AR CE − f32 | CALM energy loss | "
         "energy − f32 | norm. score | BrierLM CALM (95% CI) | BrierLM AR (95% CI) |",
         "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(
        f"| {r['weights']} | {f(r['ae_token_acc'], 4)} | {f(r['ar_ce'], 4)} ± {f(r['ar_ce_se'], 4)} "
        f"| {f(r['ar_ce_diff'], 4)} ± {f(r['ar_ce_diff_se'], 4)} "
        f"| {f(r['calm_energy_loss'], 4)} ± {f(r['calm_energy_loss_se'], 4)} "
        f"| {f(r['calm_energy_diff'], 4)} ± {f(r['calm_energy_diff_se'], 4)} "
        f"| {f(r['calm_norm_score'])} ± {f(r['calm_norm_score_se'])} "
        f"| {f(r['calm_brierlm'], 2)} {ci(r['calm_brierlm_ci95'])} "
        f"| {f(r['ar_brierlm'], 2)} {ci(r['ar_brierlm_ci95'])} |")
  return "\n".join(out)


# ----------------------------------------------------------------------------- TPU bytes


def _abstract(build, weights, cache, sharding):
  """(graphdef, abstract state on `sharding`) of `build()` stored in the given precision (the
  weights' layouts are chosen in `decode_step`)."""
  from flax import nnx

  from calm import quantize

  model = nnx.eval_shape(lambda: quantize.apply(build(), weights, cache))
  gd, st = nnx.split(model)
  return gd, _placed(st, sharding)


def _placed(tree, sharding):
  import jax

  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def _nbytes(tree) -> int:
  import jax

  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def decode_step(name: str, weights: str, cache: str | None, batch: int, device,
                context: int | None = None, auto_layout: bool = False) -> dict:
  """The engine's decode step of `configs/NAME.yaml` at `batch` rows with a cache of `context`
  tokens (default the training context), compiled for `device`: bytes accessed, weight / cache
  bytes, memory analysis."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from calm import config, engine, sampling
  from calm.models.autoencoder import Autoencoder

  cfg = config.load(ROOT / "configs" / f"{name}.yaml")
  calm_stage = name.startswith("calm")
  cfg = config.replace(cfg, stage="calm" if calm_stage else "ar")
  m = cfg.model
  context = context or cfg.data.block_tokens
  mesh = jax.sharding.Mesh([device], ("x",))
  rep = NamedSharding(mesh, P())
  from calm import stages

  gd, st = _abstract(lambda: stages.get_stage(cfg).build(m, nnx.Rngs(0)), weights, cache, rep)
  keys = _placed(jax.eval_shape(lambda: engine.row_keys(list(range(batch)))), rep)
  if calm_stage:
    agd, ast = _abstract(lambda: Autoencoder(m, rngs=nnx.Rngs(0)), weights, None, rep)
    chunks = context // m.chunk_size
    prompt = jax.ShapeDtypeStruct((batch, 1, m.chunk_size), jnp.int32)
    state = jax.eval_shape(lambda st, p, c, k: engine._calm_prefill(
        nnx.merge(gd, st), p, c, k, chunks), st, prompt,
        jax.ShapeDtypeStruct((batch,), jnp.int32), keys)
    sampler = sampling.ChunkSampler()

    def step(st, ast, ds):
      return engine._calm_step(nnx.merge(gd, st), nnx.merge(agd, ast), ds, sampler, 2, 0)

    args = (st, ast, _placed(state, rep))
    weight_bytes = _nbytes(st) + _nbytes(ast)
  else:
    state = jax.eval_shape(lambda st, p, l, k: engine._ar_prefill(
        nnx.merge(gd, st), p, l, k, context), st,
        jax.ShapeDtypeStruct((batch, 1), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32),
        keys)

    def step(st, ds):
      return engine._ar_step(nnx.merge(gd, st), ds, jnp.float32(1.0), jnp.float32(1.0), 0,
                             False, 2, 0)

    args = (st, _placed(state, rep))
    weight_bytes = _nbytes(st)
  from jax.experimental.layout import Format, Layout

  from calm import quantize

  # the weights as `calm.open` stores them (`quantize.place`: int8 matrices in the tiling the
  # step reads), or in the layouts the compiler chooses
  weight_format = ((lambda _: Format(Layout.AUTO, rep)) if auto_layout
                   else (lambda x: quantize.weight_format(x, rep)))
  in_shardings = tuple(jax.tree.map(weight_format, a) for a in args[:-1]) + (
      jax.tree.map(lambda _: rep, args[-1]),)
  t = time.perf_counter()
  compiled = jax.jit(step, in_shardings=in_shardings, donate_argnums=len(args) - 1).lower(
      *args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  cache_bytes = _nbytes((state.cache.k, state.cache.v))
  return {"model": name, "weights": weights, "cache": cache or str(m.dtype), "batch": batch,
          "weight_layout": "auto" if auto_layout else "stored",
          "context": context, "bytes_accessed": float(cost["bytes accessed"]),
          "flops": float(cost.get("flops", 0.0)), "weight_bytes": weight_bytes,
          "cache_bytes": cache_bytes, "argument_bytes": mem.argument_size_in_bytes,
          "temp_bytes": mem.temp_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
          "alias_bytes": mem.alias_size_in_bytes,
          "compile_seconds": round(time.perf_counter() - t, 1)}


def tpu(topology: str, short: int) -> list[dict]:
  """bf16 and int8 decode steps at batch 1 (training context and a `short` one), and the batch
  whose weights + cache fill a 16 GiB v5e chip (from the measured bytes per row)."""
  from jax.experimental import topologies

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
  rows = []
  for name in ("calm_m", "transformer_s"):
    for weights in ("bf16", "int8"):
      for context in (None, short):
        r = decode_step(name, weights, None, 1, device, context)
        if context is None:
          r["fill_batch"] = int((V5E_HBM - r["weight_bytes"]) // r["cache_bytes"])
        rows.append(r)
        print(json.dumps(r), flush=True)
  return rows


def tpu_table(rows: list[dict]) -> str:
  mib = lambda b: f"{b / 2**20:,.0f}"
  out = ["| model | weights | context (tokens) | bytes accessed / step (MiB) | × bf16 | weights "
         "(MiB) | KV cache / row (MiB) | compiled args + temp (MiB) | batch filling 16 GiB | "
         "weights + cache there (GiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
  bf16 = {(r["model"], r["context"]): r["bytes_accessed"] for r in rows if r["weights"] == "bf16"}
  for r in rows:
    ref = bf16.get((r["model"], r["context"]))
    fill = r.get("fill_batch")
    out.append(f"| {r['model']} | {r['weights']} | {r['context']} | {mib(r['bytes_accessed'])} "
               f"| {r['bytes_accessed'] / ref:.2f} | {mib(r['weight_bytes'])} "
               f"| {mib(r['cache_bytes'])} | {mib(r['argument_bytes'] + r['temp_bytes'])} "
               + (f"| {fill} | {(r['weight_bytes'] + fill * r['cache_bytes']) / GiB:.2f} |"
                  if fill else "| | |"))
  return "\n".join(out)


# ----------------------------------------------------------------------------- CPU speed


def speed(runs: pathlib.Path, *, new_tokens: int, repeats: int) -> list[dict]:
  import jax
  import numpy as np

  import calm
  from calm import engine

  rows = []
  for stage in ("calm", "ar"):
    for weights, cache in PRECISIONS:
      r = calm.open(runs / stage, weights=weights, cache=cache)
      sampler = r.stage.sampler(r.config.sampling)
      prompt = r.tokenizer.encode("It was a dark and stormy night; the rain fell in torrents")
      for batch in (1, 8):
        keys = engine.row_keys(list(range(batch)))
        go = lambda: r.engine.generate([prompt] * batch, keys, max_new_tokens=new_tokens,
                                       sampler=sampler)
        go()  # compile
        times, n = [], 0
        for _ in range(repeats):
          t = time.perf_counter()
          g = go()
          times.append(time.perf_counter() - t)
          n = sum(len(x) for x in g.tokens)
        best = min(times)
        rows.append({"stage": stage, "weights": weights, "cache": cache, "batch": batch,
                     "tokens": n, "seconds": best, "tokens_per_s": n / best,
                     "load_average": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), flush=True)
  return rows


def speed_table(rows: list[dict]) -> str:
  out = ["| model | weights | tokens/s batch 1 | tokens/s batch 8 |", "|---|---|---|---|"]
  seen = {}
  for r in rows:
    seen.setdefault((r["stage"], _name(r["weights"], r["cache"])), {})[r["batch"]] = r
  for (stage, name), by in seen.items():
    out.append(f"| {stage} | {name} | {by[1]['tokens_per_s']:.0f} | {by[8]['tokens_per_s']:.0f} |")
  return "\n".join(out)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", default="runs/demo", help="directory holding ae/, calm/, ar/")
  ap.add_argument("--parts", default="quality,tpu,speed")
  ap.add_argument("--topology", default="v5e:2x2")
  ap.add_argument("--quality", default="ae,calm,ar", help="runs to evaluate for quality")
  ap.add_argument("--short-context", type=int, default=256)
  ap.add_argument("--ae-blocks", type=int, default=96)
  ap.add_argument("--ar-blocks", type=int, default=128)
  ap.add_argument("--energy-batches", type=int, default=8)
  ap.add_argument("--brier-docs", type=int, default=60)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quant.json"))
  args = ap.parse_args()
  parts = set(args.parts.split(","))
  runs = pathlib.Path(args.runs)
  from bench import common

  out = pathlib.Path(args.out)
  result = json.loads(out.read_text()) if out.is_file() else {}
  result["machine"] = common.machine()
  if "tpu" in parts:
    result["tpu"] = tpu(args.topology, args.short_context)
  if "quality" in parts:
    result["quality"] = quality(runs, ae_blocks=args.ae_blocks, ar_blocks=args.ar_blocks,
                                energy_batches=args.energy_batches, brier_docs=args.brier_docs,
                                which=set(args.quality.split(",")),
                                rows=result.get("quality"))
  if "speed" in parts:
    result["speed"] = speed(runs, new_tokens=args.new_tokens, repeats=args.repeats)
  for key, table in (("quality", quality_table), ("tpu", tpu_table), ("speed", speed_table)):
    if key in result:
      print(table(result[key]), "\n")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
