"""The training loop shared by the autoencoder, CALM and AR stages."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from calm import checkpoint, config, data, distributed, losses, metrics, sharding, stages
from calm.config import Config
from calm.errors import CalmError, ConfigError
from calm.tokenizer import get_tokenizer


def make_optimizer(t: config.TrainConfig) -> optax.GradientTransformation:
  """AdamW with linear warm-up then constant lr, decay on matrices only, global-norm clipping."""
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, t.lr, max(t.warmup_steps, 1)), optax.constant_schedule(t.lr)],
      [max(t.warmup_steps, 1)])
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask),
  )


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def build_step_fns(stage: stages.Stage, graphdef, tx: optax.GradientTransformation,
                   ae_graphdef=None):
  """Pure (params, opt_state, ids, key, ae_params) → new state + metrics, and an eval fn."""

  def merge_ae(ae_params):
    return None if ae_graphdef is None else nnx.merge(ae_graphdef, ae_params)

  def train_step(params, opt_state, ids_BT, key, ae_params):
    ae = merge_ae(jax.lax.stop_gradient(ae_params) if ae_params is not None else None)

    def loss_fn(p):
      return stage.loss(nnx.merge(graphdef, p), ae, ids_BT, key)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step never touches the state; the loop then stops or skips (train.on_nan).
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    out = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux}
    return keep(new_params, params), keep(new_opt, opt_state), out

  def eval_step(params, ids_BT, key, ae_params):
    return stage.evaluate(nnx.merge(graphdef, params), merge_ae(ae_params), ids_BT, key)

  return train_step, eval_step


@dataclasses.dataclass
class TrainResult:
  step: int
  history: list[dict]
  eval_history: list[dict]
  run_dir: pathlib.Path


def _load_frozen_autoencoder(cfg: Config, mesh) -> tuple[Any, Any, pathlib.Path]:
  """The CALM stage's frozen autoencoder: (graphdef, params) checked against cfg.model."""
  if not cfg.train.autoencoder:
    raise ConfigError("train.autoencoder: the calm stage needs the autoencoder's run directory")
  ae_dir = pathlib.Path(cfg.train.autoencoder)
  loaded = checkpoint.load_for_inference(ae_dir, mesh=mesh, expect_stage="autoencoder")
  checkpoint.check_compatible(loaded.config, cfg, keys=checkpoint.ARCH_KEYS["autoencoder"],
                              what=f"autoencoder {ae_dir}")
  graphdef, params = loaded.graphdef, loaded.params
  return graphdef, params, ae_dir


def train(cfg: Config, *, max_steps: int | None = None, progress: bool = True) -> TrainResult:
  """Trains `cfg.stage` in `cfg.run_dir`, resuming from its latest checkpoint.

  `max_steps` stops early (for tests) without changing the schedule.
  """
  distributed.maybe_initialize(cfg.distributed)
  run_dir = pathlib.Path(cfg.run_dir)
  main = jax.process_index() == 0
  if main:
    run_dir.mkdir(parents=True, exist_ok=True)
    config.dump(cfg, run_dir / "config.yaml")
  stage = stages.get_stage(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.train.batch_size % batch_shards:
    raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by the "
                      f"{batch_shards} batch shards of mesh {dict(mesh.shape)}")

  ae_graphdef = ae_params = None
  ae_dir = None
  tok_cfg = cfg
  if cfg.stage == "calm":
    ae_graphdef, ae_params, ae_dir = _load_frozen_autoencoder(cfg, mesh)
    if not cfg.data.tokenizer and (ae_dir / "tokenizer.json").exists():
      tok_cfg = config.replace(cfg, **{"data.tokenizer": str(ae_dir / "tokenizer.json")})
  tokenizer = get_tokenizer(tok_cfg, run_dir)

  # Model + optimizer, initialised directly into their shardings.
  tx = make_optimizer(cfg.train)
  graphdef, params = sharding.sharded_init(
      lambda: stage.build(cfg.model, nnx.Rngs(cfg.seed)), mesh)
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  opt_sh = sharding.state_shardings(jax.eval_shape(tx.init, params), mesh, like=params)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  batch_sh = sharding.batch_sharding(mesh)
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  train_step, eval_step = build_step_fns(stage, graphdef, tx, ae_graphdef)
  ae_sh = None if ae_params is None else jax.tree.map(lambda x: x.sharding, ae_params)
  train_step = jax.jit(train_step, in_shardings=(param_sh, opt_sh, batch_sh, repl, ae_sh),
                       out_shardings=(param_sh, opt_sh, repl), donate_argnums=(0, 1))
  eval_step = jax.jit(eval_step, in_shardings=(param_sh, batch_sh, repl, ae_sh),
                      out_shardings=repl)

  # Data and resume.
  it = data.make_train_iterator(cfg, tokenizer, run_dir, process_index=jax.process_index(),
                                process_count=jax.process_count())
  eval_blocks = None
  if cfg.data.eval:
    eval_blocks = data.eval_blocks(cfg, tokenizer, run_dir, cfg.data.eval)
    n_eval = (len(eval_blocks) // cfg.train.batch_size) * cfg.train.batch_size
    if n_eval == 0:
      raise CalmError(f"data.eval: {cfg.data.eval} holds {len(eval_blocks)} blocks of "
                      f"{cfg.data.block_tokens} tokens, fewer than one batch of "
                      f"{cfg.train.batch_size}")
    eval_blocks = eval_blocks[:min(n_eval, cfg.train.eval_batches * cfg.train.batch_size)]

  meta = {"stage": cfg.stage, "config": config.to_dict(cfg),
          "autoencoder": str(ae_dir.resolve()) if ae_dir else "",
          "tokenizer_vocab_size": tokenizer.vocab_size}
  ckpt = checkpoint.Checkpointer(run_dir, cfg.checkpoint, metadata=meta)
  start = 0
  latest = ckpt.latest_step()
  if latest is not None:
    restored = ckpt.restore(latest, params=params, opt_state=opt_state, expect_config=cfg)
    params, opt_state = restored.params, restored.opt_state
    it.set_state(restored.data_state)
    start = latest
    if main:
      print(f"resumed {cfg.stage} from step {start} in {run_dir}")
  ckpt.install_preemption_handler()

  logger = metrics.MetricsLogger(run_dir)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  flops_per_token = losses.model_flops_per_token(cfg.model, cfg.stage, cfg.data.block_tokens)
  peak = cfg.train.peak_flops or metrics.measure_peak_flops()
  tokens_per_step = cfg.train.batch_size * cfg.data.block_tokens
  root_key = jax.random.PRNGKey(cfg.seed)
  end = cfg.train.steps if max_steps is None else min(cfg.train.steps, max_steps)

  t_compile = time.perf_counter()
  compiled = train_step.lower(params, opt_state,
                              jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.block_tokens),
                                                   jnp.int32, sharding=batch_sh),
                              root_key, ae_params).compile()
  t_compile = time.perf_counter() - t_compile
  if main:
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    print(f"{cfg.stage}: {n_params / 1e6:.2f}M params, {flops_per_token / 1e6:.2f} MFLOP/token, "
          f"compiled in {t_compile:.1f}s (temp {temp / 2**20:.1f} MiB), "
          f"mesh {dict(mesh.shape)}, steps {start}→{end}")

  history: list[dict] = []
  eval_history: list[dict] = []
  pending = None  # (step, device metrics) read one step late to keep dispatch async
  clock = metrics.Throughput()
  window: list[dict] = []

  def consume(step: int, m_dev) -> dict:
    m = {k: float(v) for k, v in jax.device_get(m_dev).items()}
    if not m.pop("finite"):
      if cfg.train.on_nan == "stop":
        raise CalmError(f"non-finite loss or gradient at step {step} (loss={m['loss']}); "
                        f"state kept at the last good step; set train.on_nan=skip to skip such "
                        f"updates")
      m["skipped"] = 1.0
    m["step"] = step
    history.append(m)
    window.append(m)
    return m

  def run_eval(step: int) -> None:
    if eval_blocks is None:
      return
    rows = []
    for i in range(0, len(eval_blocks), cfg.train.batch_size):
      ids = _local_eval_slice(eval_blocks, i, cfg, batch_sh)
      rows.append(jax.device_get(eval_step(params, ids, jax.random.PRNGKey(1234), ae_params)))
    ev = metrics.mean_tree(rows)
    ev["step"] = step
    eval_history.append(ev)
    logger.write(step, {k: v for k, v in ev.items() if k != "step"}, prefix="eval/")
    if main:
      tqdm.write(f"eval @ {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in ev.items()
                                                 if k != "step"))

  bar = tqdm(total=end, initial=start, disable=not (progress and main), desc=cfg.stage,
             dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
  step = start
  try:
    for step in range(start + 1, end + 1):
      ids = data.to_global(next(it), batch_sh)
      key = jax.random.fold_in(root_key, step)
      params, opt_state, m_dev = compiled(params, opt_state, ids, key, ae_params)
      if pending is not None:
        consume(*pending)
      pending = (step, m_dev)
      bar.update(1)
      preempted = ckpt.reached_preemption(step)
      boundary = (step % cfg.train.log_every == 0 or step % cfg.checkpoint.every == 0
                  or step == end or preempted or step % cfg.train.eval_every == 0)
      if boundary:
        consume(*pending)
        pending = None
      if step % cfg.train.log_every == 0 or step == end:
        avg = metrics.mean_tree([{k: v for k, v in r.items() if k != "step"} for r in window])
        tok_s = clock.rate(tokens_per_step * len(window))
        avg.update(tokens_per_s=tok_s,
                   tflops_per_device=tok_s * flops_per_token / jax.device_count() / 1e12,
                   mfu=tok_s * flops_per_token / (peak * jax.device_count()))
        window.clear()
        logger.write(step, avg, prefix="train/")
        bar.set_postfix(loss=f"{avg['loss']:.4g}", tok_s=f"{tok_s:.0f}")
      if step % cfg.train.eval_every == 0 or step == end:
        run_eval(step)
      if step % cfg.checkpoint.every == 0 or step == end or preempted:
        ckpt.save(step, params=params, opt_state=opt_state, data_state=it.get_state(),
                  loss=history[-1]["loss"])
        if preempted:
          if main:
            print(f"preempted: saved step {step} in {run_dir}")
          break
    if pending is not None:
      consume(*pending)
  finally:
    bar.close()
    ckpt.close()
    logger.close()
  return TrainResult(step=step, history=history, eval_history=eval_history, run_dir=run_dir)


def _local_eval_slice(eval_blocks: np.ndarray, i: int, cfg: Config, batch_sh) -> jax.Array:
  """The global eval batch starting at block i, built from this process's rows."""
  n = cfg.train.batch_size // jax.process_count()
  lo = i + jax.process_index() * n
  return data.to_global(eval_blocks[lo:lo + n], batch_sh)
