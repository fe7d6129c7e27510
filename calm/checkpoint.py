"""Orbax checkpoints: model + optimizer state, data position and run metadata, saved together.

Layout: `<run_dir>/checkpoints/<step>/{params, opt_state, data, metadata}`. Model and optimizer
states are stored as nested string-keyed dicts of arrays (nnx Variables unwrapped, PRNG keys as
key data) and restored against abstract targets carrying the *current* shardings, so a
checkpoint written on one mesh restores on any other. The data state must be the same on every
process (calm.data's iterator state is); it is written once, as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import signal
import threading
from typing import Any, Callable, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from calm import config as config_lib, pytree, sharding
from calm.config import CheckpointConfig, Config
from calm.errors import CalmError, CheckpointError, ConfigError

FORMAT_VERSION = 1
SUBDIR = "checkpoints"

def arch_keys(stage: str) -> tuple[str, ...]:
  """Config keys that fix the parameter shapes of `stage` (see `calm.stages`)."""
  from calm import stages

  return stages.get(stage).arch_keys


# Keys added after checkpoints were first written: a checkpoint without one had this value.
_ADDED_KEYS = {"model.head.kind": "energy"}


# ----------------------------------------------------------------------------- helpers


def _one_line(e: BaseException, limit: int = 240) -> str:
  text = " ".join(str(e).split(" See full TensorStore details")[0].split()) or type(e).__name__
  return f"{type(e).__name__}: {text[:limit]}"


class _DrainingLoop(asyncio.SelectorEventLoop):
  """An event loop that, when closed, first lets the tasks still pending on it finish.

  Orbax runs each read in a fresh loop and closes it as soon as the first array read fails,
  leaving the sibling reads pending; their I/O completing into the closed loop, and their
  garbage collection, then print `Event loop is closed` / `Exception ignored in <coroutine ...>`
  / `Task exception was never retrieved` after the user's one-line error. The reads are awaited
  (not cancelled: a cancelled task's I/O still completes into the loop), up to `DRAIN_S`.
  """

  DRAIN_S = 60.0

  def close(self) -> None:
    if not self.is_running() and not self.is_closed():
      async def drain():
        pending = asyncio.all_tasks(self) - {asyncio.current_task()}
        if pending:
          _, late = await asyncio.wait(pending, timeout=self.DRAIN_S)
          for t in late:
            t.cancel()
          await asyncio.gather(*pending, return_exceptions=True)

      self.run_until_complete(drain())
    super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingLoop()


@contextlib.contextmanager
def _reading_arrays():
  """Scope of an orbax read: its event loops drain their tasks before closing."""
  old = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(old)


def _is_prng_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(tree: Any) -> dict:
  """Any pytree (nnx.State, optax state, ...) → nested str-keyed dict of arrays."""
  items = []
  for path, leaf in pytree.flatten(tree)[0]:
    value = pytree.value(leaf)
    if _is_prng_key(value):
      value = jax.random.key_data(value)
    items.append((path, value))
  return pytree.nest(items)


def _abstract_leaf(value: Any) -> jax.ShapeDtypeStruct:
  """Restore target for one leaf: shape, dtype and the sharding it has now (if any)."""
  sharding = getattr(value, "sharding", None)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shape, dtype = tuple(np.shape(value)), value.dtype
  if _is_prng_key(value):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
    shape, dtype = data.shape, data.dtype
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _abstract_storable(target: Any) -> dict:
  items = []
  for path, leaf in pytree.flatten(target)[0]:
    value = pytree.value(leaf)
    items.append((path, _abstract_leaf(value)))
  return pytree.nest(items)


def _from_storable(restored: dict, target: Any) -> Any:
  """Puts restored arrays back into the structure (and Variable types) of `target`."""
  flat, treedef = pytree.flatten(target)
  leaves = []
  for path, leaf in flat:
    value = pytree.lookup(restored, path)
    old = pytree.value(leaf)
    if _is_prng_key(old):
      impl = old.dtype._impl if isinstance(old, jax.ShapeDtypeStruct) else jax.random.key_impl(old)
      value = jax.random.wrap_key_data(value, impl=impl)
    leaves.append(leaf.replace(value) if pytree.is_variable(leaf) else value)
  return jax.tree.unflatten(treedef, leaves)


def _config_dict(c: Config | dict) -> dict:
  if isinstance(c, Config):
    return config_lib.to_dict(c)
  if isinstance(c, dict) and isinstance(c.get("config"), dict):  # a metadata dict
    return c["config"]
  return c


# ----------------------------------------------------------------------------- compatibility


def check_compatible(saved: Config | dict, current: Config | dict,
                     keys: Iterable[str] | None = None, what: str = "checkpoint") -> None:
  """Raises CheckpointError naming the first of `keys` (dotted) whose values differ.

  `saved` / `current` are Configs, config dicts or checkpoint metadata dicts. Without `keys`,
  the architecture keys of the saved stage (`arch_keys`) are compared.
  """
  s, c = pytree.flatten_dict(_config_dict(saved)), pytree.flatten_dict(_config_dict(current))
  if keys is None:
    keys = arch_keys(s.get("stage") or "autoencoder")
  for k in keys:
    default = _ADDED_KEYS.get(k, "<missing>")
    a, b = s.get(k, default), c.get(k, default)
    if a != b:
      raise CheckpointError(f"{what}: {k} is {a!r} in the checkpoint but {b!r} in the current "
                            f"config")


def has_checkpoint(run_dir: str | pathlib.Path) -> bool:
  """Whether `run_dir` holds at least one checkpoint step."""
  ckpt_dir = pathlib.Path(run_dir) / SUBDIR
  return ckpt_dir.is_dir() and bool(_steps(ckpt_dir))


def check_resumable(run_dir: str | pathlib.Path, cfg: Config) -> int | None:
  """The latest step of the run in `run_dir` if `cfg` can resume it (None: no checkpoint yet);
  a CheckpointError / ConfigError naming the mismatch otherwise. Reads metadata only, so a
  refused resume is refused before anything is written."""
  if not has_checkpoint(run_dir):
    return None
  ckpt_dir = pathlib.Path(run_dir) / SUBDIR
  step, meta = read_metadata(run_dir)
  where = str(ckpt_dir / str(step))
  _check_stage(meta, cfg.stage, where)
  check_compatible(meta, cfg, arch_keys(cfg.stage), what=where)
  if cfg.train.steps < step:
    raise ConfigError(f"train.steps: {cfg.train.steps} is below step {step}, which {run_dir} "
                      f"has reached; give train.steps >= {step} to continue it")
  return step


def _check_stage(meta: dict, expect: str | None, where: str) -> None:
  if expect is not None and meta.get("stage") != expect:
    raise CheckpointError(f"{where} holds a {meta.get('stage')!r} checkpoint, expected "
                          f"{expect!r}")


def _check_leaves(saved_tree: Any, target: dict, item: str, where: str) -> None:
  """Same keys and shapes in the checkpoint as in the restore target, else a named error."""
  if saved_tree is None:
    return
  tree = getattr(saved_tree, "tree", saved_tree)
  saved = {".".join(p): leaf for p, leaf in pytree.flatten(tree)[0]}
  want = {".".join(p): leaf for p, leaf in pytree.flatten(target)[0]}
  for k in sorted(want):
    if k not in saved:
      raise CheckpointError(f"{where}: {item}.{k} is not in the checkpoint (the model in the "
                            f"current config has parameters the checkpoint lacks)")
    got = getattr(saved[k], "shape", None)
    if got is not None and tuple(got) != tuple(want[k].shape):
      raise CheckpointError(f"{where}: {item}.{k} has shape {tuple(got)} in the checkpoint but "
                            f"{tuple(want[k].shape)} in the current model")
  extra = sorted(set(saved) - set(want))
  if extra:
    raise CheckpointError(f"{where}: {item}.{extra[0]} is in the checkpoint but not in the "
                          f"current model ({len(extra)} such arrays)")


# ----------------------------------------------------------------------------- fingerprint


def _checkpoint_dir(run_dir: str | pathlib.Path) -> pathlib.Path:
  """`run_dir` or `run_dir/checkpoints`, whichever holds the step directories."""
  p = pathlib.Path(run_dir).absolute()  # orbax wants absolute paths
  if not p.exists():
    raise CheckpointError(f"checkpoint directory not found: {p}")
  if (p / SUBDIR).is_dir():
    return p / SUBDIR
  return p


def _steps(ckpt_dir: pathlib.Path) -> list[int]:
  """Finished steps (orbax writes `commit_success.txt` / renames temporaries at the end)."""
  return sorted(int(d.name) for d in ckpt_dir.iterdir()
                if d.is_dir() and d.name.isdigit() and (d / "_CHECKPOINT_METADATA").exists())


def _pick_step(ckpt_dir: pathlib.Path, step: int | None) -> int:
  steps = _steps(ckpt_dir)
  if not steps:
    raise CheckpointError(f"no checkpoint in {ckpt_dir}")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise CheckpointError(f"step {step} not found in {ckpt_dir} (available: "
                          f"{', '.join(map(str, steps))})")
  return step


def fingerprint(run_dir: str | pathlib.Path, step: int | None = None) -> tuple[int, str]:
  """(step, sha256 of the model-parameter files of that checkpoint; default the latest)."""
  ckpt_dir = _checkpoint_dir(run_dir)
  step = _pick_step(ckpt_dir, step)
  root = ckpt_dir / str(step) / "params"
  if not root.is_dir():
    raise CheckpointError(f"{root} is missing: the checkpoint is incomplete")
  h = hashlib.sha256()
  for f in sorted(p for p in root.rglob("*") if p.is_file()):
    h.update(str(f.relative_to(root)).encode() + b"\0")
    with open(f, "rb") as fh:
      for block in iter(lambda: fh.read(1 << 20), b""):
        h.update(block)
  return step, h.hexdigest()


# ----------------------------------------------------------------------------- metadata


def make_metadata(metadata: dict | None) -> dict:
  """Completes run metadata: stage, K, vocab, latent from `config`; the autoencoder's step and
  fingerprint when `autoencoder` names its run directory."""
  meta = dict(metadata or {})
  cfg = meta.get("config")
  if isinstance(cfg, Config):
    cfg = meta["config"] = config_lib.to_dict(cfg)
  if isinstance(cfg, dict):
    model = cfg.get("model", {})
    meta.setdefault("stage", cfg.get("stage"))
    for k in ("vocab_size", "chunk_size", "latent_dim"):
      meta.setdefault(k, model.get(k))
  if meta.get("autoencoder") and "autoencoder_fingerprint" not in meta:
    step, fp = fingerprint(meta["autoencoder"])
    meta["autoencoder_step"], meta["autoencoder_fingerprint"] = step, fp
  meta["format_version"] = FORMAT_VERSION
  json.dumps(meta)  # must be JSON-able
  return meta


def read_metadata(run_dir: str | pathlib.Path, step: int | None = None) -> tuple[int, dict]:
  """(step, metadata dict) of a checkpoint (default the latest), without touching arrays."""
  ckpt_dir = _checkpoint_dir(run_dir)
  step = _pick_step(ckpt_dir, step)
  f = ckpt_dir / str(step) / "metadata" / "metadata"
  try:
    return step, json.loads(f.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{ckpt_dir / str(step)}: metadata unreadable or corrupt "
                          f"({_one_line(e)})") from None


# ----------------------------------------------------------------------------- checkpointer


@dataclasses.dataclass
class Restored:
  step: int
  params: Any
  opt_state: Any
  data_state: dict | None
  metadata: dict


def _handlers() -> dict:
  return {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
          "data": ocp.JsonCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}


class Checkpointer:
  """Periodic, async, keep-last-N checkpoints of one run, with auto-resume and preemption.

  `metadata` (e.g. {"config": ..., "autoencoder": run_dir}) is completed by `make_metadata`,
  stored with every step and checked on `restore`.
  """

  def __init__(self, run_dir: str | pathlib.Path, cfg: CheckpointConfig | None = None, *,
               metadata: dict | None = None):
    cfg = cfg or CheckpointConfig()
    self.directory = pathlib.Path(run_dir).absolute() / SUBDIR
    self.every = cfg.every
    self.metadata = make_metadata(metadata)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, save_interval_steps=cfg.every,
        enable_async_checkpointing=cfg.async_save, create=True)
    try:
      self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=_handlers())
    except OSError as e:
      raise CheckpointError(f"cannot use checkpoint directory {self.directory} "
                            f"({_one_line(e)})") from None
    self._preempted = threading.Event()
    self._old_handlers: dict[int, Any] = {}

  # -- queries
  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def should_save(self, step: int, preempted: bool | None = None) -> bool:
    """A multiple of `checkpoint.every`, or a preemption (agreed by all processes; pass
    `reached_preemption(step)` as `preempted` if already known)."""
    if preempted is None:
      preempted = self.reached_preemption(step)
    return step % self.every == 0 or preempted

  # -- saving
  def save(self, step: int, *, params: Any, opt_state: Any = None, data_state: dict | None = None,
           loss: float | None = None) -> bool:
    """Starts saving step `step` (async when configured); False if it already exists.

    Refuses (CheckpointError) a non-finite `loss`: a diverged state is never written.
    """
    if loss is not None and not math.isfinite(float(loss)):
      raise CheckpointError(f"refusing to save step {step}: loss is {float(loss)}")
    if step in self._mngr.all_steps():
      return False
    items = {"params": ocp.args.StandardSave(_to_storable(params)),
             "metadata": ocp.args.JsonSave({**self.metadata, "step": int(step),
                                            "device_count": jax.device_count(),
                                            "process_count": jax.process_count()})}
    stored_opt = _to_storable(opt_state) if opt_state is not None else {}
    if stored_opt:
      items["opt_state"] = ocp.args.StandardSave(stored_opt)
    if data_state is not None:
      try:
        items["data"] = ocp.args.JsonSave(json.loads(json.dumps(data_state)))
      except (TypeError, ValueError) as e:
        raise CheckpointError(f"data iterator state is not JSON-serialisable "
                              f"({_one_line(e)})") from None
    return bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=True))

  def maybe_save(self, step: int, **state: Any) -> bool:
    """Saves on multiples of `checkpoint.every` and after a preemption signal (call it at
    every step on every process)."""
    return self.save(step, **state) if self.should_save(step) else False

  def save_now(self, step: int, **state: Any) -> bool:
    """Saves and waits until the checkpoint is on disk (preemption, end of training)."""
    saved = self.save(step, **state)
    self.wait()
    return saved

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._mngr.close()
    for sig, old in self._old_handlers.items():
      try:
        signal.signal(sig, old)
      except ValueError:
        pass
    self._old_handlers.clear()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- preemption
  def install_preemption_handler(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
    """On the first of `signals`, sets `preempted` (the loop then saves and stops); a second
    signal gets the previous handler. Main thread only; elsewhere a no-op."""

    def handler(signum, frame):
      self._preempted.set()
      signal.signal(signum, self._old_handlers.get(signum, signal.SIG_DFL))

    for sig in signals:
      try:
        self._old_handlers[sig] = signal.signal(sig, handler)
      except ValueError:  # not the main thread
        pass

  @property
  def preempted(self) -> bool:
    """This process received a preemption signal."""
    return self._preempted.is_set()

  def reached_preemption(self, step: int, sync_every: int = 10) -> bool:
    """Whether to save-and-stop at `step`; every process gets the same answer.

    Single process: the local flag. Several: the flags are all-gathered every `sync_every`
    steps (call it at every step on every process).
    """
    if jax.process_count() == 1:
      return self.preempted
    if step % sync_every:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(self.preempted))
    return bool(np.any(flags))

  # -- restoring
  def restore(self, step: int | None = None, *, params: Any, opt_state: Any = None,
              expect_config: Config | None = None, restore_data: bool = True) -> Restored:
    """Restores `step` (default the latest) into the shapes and shardings of the targets.

    `params` / `opt_state` are abstract (ShapeDtypeStruct with `sharding`) or concrete trees
    (their current shardings are used) with the structure they were saved from. With
    `expect_config`, the stage, the architecture keys and the autoencoder fingerprint are
    checked first.
    """
    step = _pick_step(self.directory, step)
    where = str(self.directory / str(step))
    _, meta = read_metadata(self.directory, step)
    if expect_config is not None:
      _check_stage(meta, expect_config.stage, where)
      check_compatible(meta, expect_config, arch_keys(expect_config.stage), what=where)
    fp_saved, fp_now = meta.get("autoencoder_fingerprint"), self.metadata.get(
        "autoencoder_fingerprint")
    if fp_saved and fp_now and fp_saved != fp_now:
      raise CheckpointError(
          f"{where}: the autoencoder changed since this run started ({meta.get('autoencoder')} "
          f"step {meta.get('autoencoder_step')} → {self.metadata.get('autoencoder')} step "
          f"{self.metadata.get('autoencoder_step')}); the CALM model cannot resume on it")
    items = {"params": _abstract_storable(params)}
    if opt_state is not None:
      abstract_opt = _abstract_storable(opt_state)
      if abstract_opt:
        items["opt_state"] = abstract_opt
    stored = set(p.name for p in (self.directory / str(step)).iterdir())
    for name in items:
      if name not in stored:
        raise CheckpointError(f"{where}: no {name} in this checkpoint")
    try:
      with _reading_arrays():
        saved_meta = self._mngr.item_metadata(step)
      for name, target in items.items():
        _check_leaves(saved_meta[name], target, name, where)
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint
      raise CheckpointError(f"{where} is corrupt or unreadable ({_one_line(e)}); delete it to "
                            f"resume from an earlier step") from None
    args = {k: ocp.args.StandardRestore(v) for k, v in items.items()}
    want_data = restore_data and "data" in stored
    if want_data:
      args["data"] = ocp.args.JsonRestore()
    try:
      with _reading_arrays():
        out = self._mngr.restore(step, args=ocp.args.Composite(**args))
      result_params = _from_storable(out["params"], params)
      result_opt = _from_storable(out["opt_state"], opt_state) if "opt_state" in items else (
          opt_state)
    except CalmError:
      raise
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"{where} is corrupt or unreadable ({_one_line(e)}); delete it to "
                            f"resume from an earlier step") from None
    return Restored(step=step, params=result_params, opt_state=result_opt,
                    data_state=out["data"] if want_data else None, metadata=meta)


# ----------------------------------------------------------------------------- inference


@dataclasses.dataclass
class Loaded:
  step: int
  config: Config
  metadata: dict
  graphdef: Any
  params: Any  # nnx.State with the mesh shardings
  run_dir: pathlib.Path

  @property
  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params)


class _DropNotice(logging.Filter):
  """Drops orbax's warning that a read-only manager was opened read-only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


def _read_only_manager(ckpt_dir: pathlib.Path) -> ocp.CheckpointManager:
  """A CheckpointManager that only reads (opened without orbax's warnings about it)."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                         max_to_keep=None)
  log, notice = logging.getLogger("absl"), _DropNotice()
  log.addFilter(notice)
  try:
    return ocp.CheckpointManager(ckpt_dir, options=options, item_handlers=_handlers())
  finally:
    log.removeFilter(notice)


def load_for_inference(run_dir: str | pathlib.Path, build: Callable[[Config], nnx.Module], *,
                       step: int | None = None, mesh=None,
                       expect_stage: str | None = None) -> Loaded:
  """Model parameters + metadata of a run's checkpoint (default the latest step).

  The model is rebuilt from the saved config by `build` and its parameters restored sharded over
  `mesh` (default: all devices, data-parallel).
  """
  ckpt_dir = _checkpoint_dir(run_dir)
  step, meta = read_metadata(ckpt_dir, step)
  where = str(ckpt_dir / str(step))
  _check_stage(meta, expect_stage, where)
  try:
    cfg = config_lib.from_dict(meta.get("config") or {})
  except CalmError as e:
    raise CheckpointError(f"{where}: the saved config is not valid any more ({e})") from None
  if mesh is None:
    mesh = sharding.make_mesh(config_lib.MeshConfig())
  graphdef, abstract = sharding.abstract_state(lambda: build(cfg), mesh)
  target = _abstract_storable(abstract)
  mngr = _read_only_manager(ckpt_dir)
  try:
    with _reading_arrays():
      _check_leaves(mngr.item_metadata(step)["params"], target, "params", where)
      out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    params = _from_storable(out["params"], abstract)
  except CalmError:
    raise
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"{where} is corrupt or unreadable ({_one_line(e)})") from None
  finally:
    mngr.close()
  return Loaded(step=step, config=cfg, metadata=meta, graphdef=graphdef, params=params,
                run_dir=ckpt_dir.parent if ckpt_dir.name == SUBDIR else ckpt_dir)
