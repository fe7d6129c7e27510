"""Training shared by the autoencoder, CALM and AR stages: `setup` (state, shardings, compiled
step) and `train` (data, resume, the loop and its logging / evaluation / checkpoint hooks)."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from calm import (checkpoint, compile_cache, config, data, distributed, goodput, losses, metrics,
                  paths, rng, run, sharding, stages, warm_start)
from calm.config import Config
from calm.models import attention
from calm.errors import CalmError, CheckpointError, ConfigError


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


def micro_batches(x_B: jax.Array, n: int) -> jax.Array:
  """[B, ...] → [n, B/n, ...]: micro-batch i holds rows i, i+n, i+2n, … .

  Strided rows keep every micro-batch spread over all the devices that hold the batch (rows are
  sharded in contiguous blocks), so no data moves between them.
  """
  b = x_B.shape[0]
  if b % n:
    raise ValueError(f"batch of {b} rows does not split into {n} micro-batches")
  return jnp.swapaxes(x_B.reshape(b // n, n, *x_B.shape[1:]), 0, 1)


def build_step_fns(stage: stages.Stage, graphdef, tx: optax.GradientTransformation,
                   ae_graphdef=None, grad_accum: int = 1):
  """Pure (params, opt_state, ids, key, ae_params) → new state + metrics, and an eval fn.

  With `grad_accum` = n > 1 the batch is split into n micro-batches (`micro_batches`) whose
  gradients and metrics are averaged in a scan before one optimizer update. Every row draws its
  loss noise from fold_in(key, row) (`losses.row_keys`), so the step equals the one without
  accumulation.
  """

  def merge_ae(ae_params):
    return None if ae_graphdef is None else nnx.merge(ae_graphdef, ae_params)

  def train_step(params, opt_state, ids_BT, key, ae_params):
    ae = merge_ae(jax.lax.stop_gradient(ae_params) if ae_params is not None else None)
    keys_B = losses.row_keys(key, ids_BT.shape[0])

    def loss_fn(p, ids, keys):
      return stage.loss(nnx.merge(graphdef, p), ae, ids, keys)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
      (loss, aux), grads = grad_fn(params, ids_BT, keys_B)
    else:
      ids_XBT, keys_XB = micro_batches(ids_BT, grad_accum), micro_batches(keys_B, grad_accum)

      def accumulate(carry, xs):
        (l, a), g = grad_fn(params, *xs)
        return jax.tree.map(jnp.add, carry, (l, a, g)), None

      shapes = jax.eval_shape(grad_fn, params, ids_XBT[0], keys_XB[0])
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                           (shapes[0][0], shapes[0][1], shapes[1]))
      total, _ = jax.lax.scan(accumulate, zeros, (ids_XBT, keys_XB))
      loss, aux, grads = jax.tree.map(lambda x: x / grad_accum, total)
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step never touches the state; the loop then stops or skips (train.on_nan).
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    out = {**aux, "loss": loss, "grad_norm": grad_norm, "finite": finite}
    return keep(new_params, params), keep(new_opt, opt_state), out

  def eval_step(params, ids_BT, key, ae_params):
    return stage.evaluate(nnx.merge(graphdef, params), merge_ae(ae_params), ids_BT, key)

  return train_step, eval_step


@dataclasses.dataclass
class Setup:
  """A stage ready to train: state in its shardings and the jitted train / eval steps.

  `train_step(params, opt_state, ids_BT, key, ae_params) -> (params, opt_state, metrics)`
  donates its state; `eval_step(params, ids_BT, key, ae_params) -> metrics`.
  """

  cfg: Config
  mesh: jax.sharding.Mesh
  stage: stages.Stage
  tx: optax.GradientTransformation
  graphdef: Any
  params: Any
  opt_state: Any
  ae_params: Any  # the frozen autoencoder (calm stage), else None
  ae_graphdef: Any
  ae_dir: pathlib.Path | None
  batch_sharding: jax.sharding.NamedSharding
  train_step: Any
  eval_step: Any
  init_backbone: dict | None = None  # the warm start's source (`calm.warm_start`), if one ran

  def abstract_batch(self) -> jax.ShapeDtypeStruct:
    """The global [batch, block_tokens] int32 batch, abstract."""
    return jax.ShapeDtypeStruct((self.cfg.train.batch_size, self.cfg.data.block_tokens),
                                jnp.int32, sharding=self.batch_sharding)

  def lower(self):
    """The training step lowered for this state (nothing runs)."""
    key = jax.eval_shape(lambda: rng.stream(0, rng.TRAIN))
    with jax.set_mesh(self.mesh):  # kernels that run per shard (splash attention) read the mesh
      return self.train_step.lower(self.params, self.opt_state, self.abstract_batch(), key,
                                   self.ae_params)

  @property
  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.params))


def _abstract_opt_state(tx, params, mesh):
  abstract = jax.eval_shape(tx.init, params)
  return sharding.with_shardings(abstract, sharding.state_shardings(abstract, mesh, like=params))


def setup(cfg: Config, *, mesh: jax.sharding.Mesh | None = None, abstract: bool = False,
          autoencoder: tuple[Any, Any] | None = None, fresh: bool = True) -> Setup:
  """Builds the stage's model and optimizer state directly in their shardings, and jits the steps.

  `abstract=True` builds shapes only (ShapeDtypeStructs carrying shardings): nothing is
  allocated, and no trained autoencoder is needed (`Setup.lower().compile()` then analyses the
  step). `autoencoder=(graphdef, params)` supplies the calm stage's frozen autoencoder instead of
  loading `train.autoencoder`. A `fresh` run (not one about to resume from its own checkpoint)
  with `train.init_backbone` gets that run's backbone copied in (`calm.warm_start`); a run that
  is not fresh gets abstract parameters and optimizer state (nothing is initialised) for its
  checkpoint to be restored into.
  """
  stage = stages.get_stage(cfg)
  stage.validate(cfg.model)
  if cfg.train.init_backbone and not stage.warm_starts:
    raise ConfigError(f"train.init_backbone: only the calm stage starts from a pretrained "
                      f"backbone, not stage={cfg.stage}")
  mesh = mesh if mesh is not None else sharding.make_mesh(cfg.mesh)
  if cfg.model.attention != "auto":  # a kernel this target cannot run: say so before any work
    attention.check(cfg.model.attention, mesh.devices.flat[0].platform)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = cfg.train.batch_size // cfg.train.grad_accum
  if micro % batch_shards:
    raise ConfigError(f"train.batch_size: the micro-batch of {cfg.train.batch_size} / "
                      f"{cfg.train.grad_accum} (train.grad_accum) = {micro} is not divisible by "
                      f"the {batch_shards} batch shards of mesh {dict(mesh.shape)}")
  tx = make_optimizer(cfg.train)
  build = lambda: stages.build_model(cfg)
  ae_graphdef = ae_params = ae_dir = None
  if abstract or not fresh:  # a resuming run's state comes from its checkpoint: shapes suffice
    graphdef, params = sharding.abstract_state(build, mesh)
    opt_state = _abstract_opt_state(tx, params, mesh)
  else:
    graphdef, params = sharding.sharded_init(build, mesh)
    opt_state, _ = sharding.init_opt_state(tx, params, mesh)
  if stage.needs_autoencoder:
    if autoencoder is not None:
      ae_graphdef, ae_params = autoencoder
    elif abstract:
      ae_cfg = dataclasses.replace(cfg, stage="autoencoder")
      ae_graphdef, ae_params = sharding.abstract_state(lambda: stages.build_model(ae_cfg), mesh)
    else:
      loaded = run.frozen_autoencoder(cfg, mesh)
      ae_graphdef, ae_params, ae_dir = loaded.graphdef, loaded.params, loaded.run_dir
  source = None
  if cfg.train.init_backbone and fresh and not abstract:
    params, source = warm_start.apply(cfg, params, mesh, ae_dir or cfg.train.autoencoder or None)

  shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  param_sh, opt_sh = shardings_of(params), shardings_of(opt_state)
  ae_sh = None if ae_params is None else shardings_of(ae_params)
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  train_step, eval_step = build_step_fns(stage, graphdef, tx, ae_graphdef, cfg.train.grad_accum)
  train_step = jax.jit(train_step, in_shardings=(param_sh, opt_sh, batch_sh, repl, ae_sh),
                       out_shardings=(param_sh, opt_sh, repl), donate_argnums=(0, 1))
  eval_step = jax.jit(eval_step, in_shardings=(param_sh, batch_sh, repl, ae_sh),
                      out_shardings=repl)
  return Setup(cfg=cfg, mesh=mesh, stage=stage, tx=tx, graphdef=graphdef, params=params,
               opt_state=opt_state, ae_params=ae_params, ae_graphdef=ae_graphdef, ae_dir=ae_dir,
               batch_sharding=batch_sh, train_step=train_step, eval_step=eval_step,
               init_backbone=source)


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TrainResult:
  step: int
  history: list[dict]
  eval_history: list[dict]
  run_dir: pathlib.Path
  goodput: dict = dataclasses.field(default_factory=dict)  # `goodput.totals` over every launch


def _check_run_dir(run_dir: pathlib.Path) -> None:
  if run_dir.exists() and not run_dir.is_dir():
    raise ConfigError(f"run_dir: {run_dir} exists and is not a directory")
  parent = next((p for p in run_dir.parents if p.exists()), None)
  if parent is not None and not parent.is_dir():
    raise ConfigError(f"run_dir: a parent of {run_dir} exists and is not a directory")


def _make_run_dir(run_dir: pathlib.Path) -> None:
  if jax.process_index() == 0:
    try:
      run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a parent is a file
      raise ConfigError(f"run_dir: a parent of {run_dir} exists and is not a directory") from None
    except OSError as e:
      raise ConfigError(f"run_dir: cannot create {run_dir}: {e.strerror}") from None


class LogHook:
  """Every `train.log_every` steps: window-averaged metrics, tokens/s, TFLOP/s per device, MFU,
  and the run's goodput so far (one warning when the input pipeline holds training back)."""

  def __init__(self, cfg: Config, logger: metrics.MetricsLogger, bar: tqdm, plain: bool = False,
               ledger: goodput.Ledger | None = None):
    self.every, self.logger, self.bar, self.plain = cfg.train.log_every, logger, bar, plain
    self.ledger, self.data_mark, self.warned = ledger, None, False
    self.flops_per_token = metrics.model_flops_per_token(cfg.model, cfg.stage,
                                                        cfg.data.block_tokens)
    self.peak = cfg.train.peak_flops or metrics.measure_peak_flops(dtype=cfg.model.dtype)
    self.tokens_per_step = cfg.train.batch_size * cfg.data.block_tokens
    self.clock = metrics.Throughput()
    self.window: list[dict] = []

  def add(self, m: dict) -> None:
    self.window.append(m)

  def __call__(self, step: int) -> None:
    avg = metrics.mean_tree([{k: v for k, v in r.items() if k != "step"} for r in self.window])
    tok_s = self.clock.rate(self.tokens_per_step * len(self.window))
    flops = tok_s * self.flops_per_token
    avg.update(tokens_per_s=tok_s, tflops_per_device=flops / jax.device_count() / 1e12,
               mfu=flops / (self.peak * jax.device_count()))
    self.window.clear()
    self.logger.write(step, avg, prefix="train/")
    if self.ledger is not None:
      self.goodput(step)
    self.bar.set_postfix(loss=f"{avg['loss']:.4g}", tok_s=f"{tok_s:.0f}")
    if self.bar.disable and self.plain:  # no bar (not a terminal): one plain line instead
      print(f"step {step}: loss {avg['loss']:.4g}, {tok_s:.0f} tokens/s", flush=True)


  def goodput(self, step: int) -> None:
    t = self.ledger.totals()
    self.logger.write(step, {**goodput.fractions(t), "lost_steps": t["lost_steps"]},
                      prefix="goodput/")
    # the share of time spent waiting for data since the first logged window (warm-up excluded)
    now = (step, self.ledger.seconds["data"], time.time())
    if self.data_mark is None:
      self.data_mark = now
      return
    s0, d0, t0 = self.data_mark
    frac = (now[1] - d0) / max(now[2] - t0, 1e-9)
    if not self.warned and frac > goodput.DATA_WAIT_WARNING and jax.process_index() == 0:
      tqdm.write(goodput.data_wait_warning(frac, s0 + 1, step))
      self.warned = True


class EvalHook:
  """Every `train.eval_every` steps: the stage's metrics averaged over the held-out batches."""

  def __init__(self, s: Setup, blocks_QT: np.ndarray, logger: metrics.MetricsLogger):
    self.s, self.blocks, self.logger = s, blocks_QT, logger
    self.every = s.cfg.train.eval_every
    self.history: list[dict] = []
    self.refs: dict[str, float] = {}  # CALM energy reference lines, once per evaluation set

  def __call__(self, step: int, params: Any) -> None:
    cfg, rows, batches, keys = self.s.cfg, [], [], []
    micro = cfg.train.micro_batch
    for i in range(0, len(self.blocks), micro):
      batches.append(_local_eval_slice(self.blocks, i, cfg, self.s.batch_sharding))
      keys.append(rng.eval_row_keys(cfg.seed, i, micro))  # one key per held-out row
      rows.append(jax.device_get(self.s.eval_step(params, batches[-1], keys[-1],
                                                  self.s.ae_params)))
    ev = metrics.mean_tree(rows)
    if self.s.stage.energy_references(cfg.model):
      self.refs = self.refs or metrics.energy_references(
          self.s.ae_graphdef, self.s.ae_params, batches, keys, cfg.model)
      ev = metrics.with_references(ev, self.refs)
    self.history.append({**ev, "step": step})
    self.logger.write(step, ev, prefix="eval/")
    if jax.process_index() == 0:
      tqdm.write(f"eval @ {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in ev.items()))


def _eval_blocks(cfg: Config, tokenizer, run_dir: pathlib.Path) -> np.ndarray | None:
  if not cfg.data.eval:
    return None
  blocks = data.eval_blocks(cfg, tokenizer, run_dir, cfg.data.eval)
  n_eval = (len(blocks) // cfg.train.batch_size) * cfg.train.batch_size
  if n_eval == 0:
    raise CalmError(f"data.eval: {cfg.data.eval} holds {len(blocks)} blocks of "
                    f"{cfg.data.block_tokens} tokens, fewer than one batch of "
                    f"{cfg.train.batch_size}")
  return blocks[:min(n_eval, cfg.train.eval_batches * cfg.train.batch_size)]


def train(cfg: Config, *, max_steps: int | None = None, progress: bool = True) -> TrainResult:
  """Trains `cfg.stage` in `cfg.run_dir`, resuming from its latest checkpoint.

  Everything that can refuse the run (the run directory, a checkpoint of another stage or
  architecture, train.steps below the checkpoint's step, a changed tokenizer or autoencoder) is
  checked before `config.yaml` is (re)written, and a new run directory that fails before its
  first checkpoint is removed again. `max_steps` stops early (for tests) without changing the
  schedule.
  """
  info = distributed.maybe_initialize(cfg.distributed, verbose=False)
  compile_cache.enable(cfg)
  if info.process_count > 1:
    print(info, flush=True)
  run_dir = pathlib.Path(cfg.run_dir)
  _check_run_dir(run_dir)
  resume = checkpoint.check_resumable(run_dir, cfg)
  created = not run_dir.exists()
  try:
    return _train(cfg, run_dir, info, max_steps=max_steps, progress=progress,
                  fresh=resume is None)
  except CalmError:
    if created and jax.process_index() == 0 and not checkpoint.has_checkpoint(run_dir):
      shutil.rmtree(run_dir, ignore_errors=True)
    raise


def _train(cfg: Config, run_dir: pathlib.Path, info, *, max_steps: int | None,
           progress: bool, fresh: bool) -> TrainResult:
  main = jax.process_index() == 0
  ledger = goodput.Ledger(run_dir, write=False)  # written once the run is accepted
  with ledger.phase("startup"):
    s = setup(cfg, fresh=fresh)
    _make_run_dir(run_dir)
    tokenizer = run.get_tokenizer(cfg, run_dir, ae_dir=s.ae_dir)
    if s.ae_dir is not None:
      run.check_tokenizer(tokenizer, checkpoint.read_metadata(s.ae_dir)[1],
                          f"the autoencoder {s.ae_dir}")
    own = checkpoint.read_metadata(run_dir)[1] if checkpoint.has_checkpoint(run_dir) else None
    if own is not None:
      run.check_tokenizer(tokenizer, own, f"the run {run_dir}")
    it = data.make_train_iterator(cfg, tokenizer, run_dir, process_index=jax.process_index(),
                                  process_count=jax.process_count())
    eval_blocks = _eval_blocks(cfg, tokenizer, run_dir)

    meta = {"stage": cfg.stage, "config": config.to_dict(cfg),
            "paths": paths.absolute_paths(cfg),
            "autoencoder": str(s.ae_dir.resolve()) if s.ae_dir else "",
            "tokenizer_vocab_size": tokenizer.vocab_size,
            "tokenizer_fingerprint": tokenizer.fingerprint}
    # a resumed run keeps the record of the backbone it started from (the source is not read
    # again)
    source = s.init_backbone if fresh else (own or {}).get("init_backbone")
    if source:
      meta["init_backbone"] = source
    ckpt = checkpoint.Checkpointer(run_dir, cfg.checkpoint, metadata=meta)
  params, opt_state, start = s.params, s.opt_state, 0
  latest = ckpt.latest_step()
  if latest is None and not fresh:  # the state is abstract: only a checkpoint can fill it
    ckpt.close()
    raise CheckpointError(f"{run_dir}: its checkpoint disappeared while the run was starting")
  if latest is not None:
    try:
      with ledger.phase("checkpoint"):
        restored = ckpt.restore(latest, params=params, opt_state=opt_state, expect_config=cfg)
    except BaseException:
      ckpt.close()
      raise
    params, opt_state, start = restored.params, restored.opt_state, latest
    it.set_state(restored.data_state)
    ledger.resumed_at(start)
    if main:
      print(f"resumed {cfg.stage} from step {start} in {run_dir}")
      if ledger.earlier:
        redo = (f"; steps {start + 1}-{ledger.redo_until} were reached before and are computed "
                f"again" if ledger.redo_until > start else "")
        print(f"earlier launches: {goodput.summary(goodput.totals(ledger.earlier))}{redo}")
  if main:
    paths.save_config(cfg)  # only now: the run is accepted
    if s.init_backbone:
      src = s.init_backbone
      print(f"warm start: {' + '.join(src['parts'])} ({src['parameters'] / 1e6:.2f}M params) "
            f"from {src['path']} step {src['step']}; the rest starts fresh")
  ledger.write_enabled = main
  ckpt.install_preemption_handler()
  end = cfg.train.steps if max_steps is None else min(cfg.train.steps, max_steps)

  t_compile, hits = time.perf_counter(), compile_cache.counts["hits"]
  with ledger.phase("compile"):
    compiled = s.lower().compile()
  t_compile = time.perf_counter() - t_compile
  cached = " from the compilation cache" if compile_cache.counts["hits"] > hits else ""
  if main:
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    flops_per_token = metrics.model_flops_per_token(cfg.model, cfg.stage, cfg.data.block_tokens)
    print(f"{cfg.stage}: {s.num_params / 1e6:.2f}M params, {flops_per_token / 1e6:.2f} "
          f"MFLOP/token, compiled in {t_compile:.1f}s{cached} (temp {temp / 2**20:.1f} MiB), "
          f"mesh {dict(s.mesh.shape)} ({info}), steps {start}→{end}")

  with ledger.phase("startup"):
    logger = metrics.MetricsLogger(run_dir)
    # a progress bar only on a terminal: in a log file its redraws are one long line
    bar = tqdm(total=end, initial=start, disable=not (progress and main and sys.stderr.isatty()),
               desc=cfg.stage, dynamic_ncols=True, mininterval=1.0)
    log_hook = LogHook(cfg, logger, bar, plain=progress and main, ledger=ledger)
    eval_hook = EvalHook(s, eval_blocks, logger) if eval_blocks is not None else None
  train_key = rng.stream(cfg.seed, rng.TRAIN)
  history: list[dict] = []
  pending = None  # (step, device metrics) read one step late to keep dispatch async

  def consume(step: int, m_dev) -> None:
    m = {k: float(v) for k, v in jax.device_get(m_dev).items()}
    if not m.pop("finite"):
      if cfg.train.on_nan == "stop":
        raise CalmError(f"non-finite loss or gradient at step {step} (loss={m['loss']}); "
                        f"state kept at the last good step; set train.on_nan=skip to skip such "
                        f"updates")
      m["skipped"] = 1.0
    m["step"] = step
    history.append(m)
    log_hook.add(m)
    ledger.completed(step)

  step = start
  try:
    for step in range(start + 1, end + 1):
      with ledger.phase("data"):
        ids = data.to_global(next(it), s.batch_sharding)
      # a step reached by an earlier launch after its last checkpoint is lost work
      work = "lost" if ledger.is_redo(step) else "step"
      with ledger.phase(work):
        key = jax.random.fold_in(train_key, step)
        params, opt_state, m_dev = compiled(params, opt_state, ids, key, s.ae_params)
        if pending is not None:
          consume(*pending)
      pending = (step, m_dev)
      bar.update(1)
      last = step == end
      preempted = ckpt.reached_preemption(step)
      do_log = step % log_hook.every == 0 or last
      do_eval = eval_hook is not None and (step % eval_hook.every == 0 or last)
      do_save = ckpt.should_save(step, preempted) or last
      if do_log or do_eval or do_save:
        with ledger.phase(work):
          consume(*pending)
        pending = None
      if do_log:
        log_hook(step)
      if do_eval:
        with ledger.phase("eval"):
          eval_hook(step, params)
      if do_save:
        with ledger.phase("checkpoint"):
          ckpt.save(step, params=params, opt_state=opt_state, data_state=it.get_state(),
                    loss=history[-1]["loss"])
      ledger.save()  # after the step's metrics row: a kill never leaves the ledger ahead of it
      if do_save and preempted:
        if main:
          print(f"preempted: saved step {step} in {run_dir}")
        break
    if pending is not None:
      with ledger.phase("lost" if ledger.is_redo(pending[0]) else "step"):
        consume(*pending)
  finally:
    bar.close()
    with ledger.phase("checkpoint"):  # waits for a checkpoint still being written
      ckpt.close()
    logger.close()
    ledger.close()
  totals = ledger.totals()
  if main:
    if ledger.first_step_wall is not None:
      print(f"launch {ledger.number}: first step done {ledger.first_step_wall:.1f} s after the "
            f"process started")
    print(goodput.summary(totals))
  return TrainResult(step=step, history=history,
                     eval_history=eval_hook.history if eval_hook is not None else [],
                     run_dir=run_dir, goodput=totals)


def _local_eval_slice(eval_blocks: np.ndarray, i: int, cfg: Config, batch_sh) -> jax.Array:
  """The global eval batch (one micro-batch) starting at block i, from this process's rows."""
  n = cfg.train.micro_batch // jax.process_count()
  lo = i + jax.process_index() * n
  return data.to_global(eval_blocks[lo:lo + n], batch_sh)
