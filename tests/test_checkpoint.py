"""Checkpoint round trips across meshes, retention, preemption and the one-line errors."""

import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from calm import checkpoint, config, sharding
from calm.config import CheckpointConfig, MeshConfig
from calm.errors import CheckpointError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _param(key, shape, names):
  return nnx.Param(0.02 * jax.random.normal(key, shape), out_sharding=names, eager_sharding=False)


class Toy(nnx.Module):
  """Small module with sharded matrices, a list of layers and an RNG stream."""

  def __init__(self, vocab: int = 64, d: int = 16, layers: int = 2, rngs: nnx.Rngs = None):
    self.embed = _param(rngs.params(), (vocab, d), ("vocab", "embed"))
    self.layers = nnx.List([_param(rngs.params(), (d, 2 * d), ("embed", "mlp"))
                            for _ in range(layers)])
    self.scale = nnx.Param(jnp.ones((d,)), out_sharding=("norm",), eager_sharding=False)
    self.noise = nnx.Rngs(noise=rngs.params())


def _cfg(tmp_path, **changes):
  cfg = config.load(ROOT / "configs" / "tiny.yaml")
  return config.replace(cfg, run_dir=str(tmp_path / "run"), **changes)


def _train_state(mesh, seed=0, vocab=64):
  """Sharded (params, opt_state) after one optimizer update (so the moments are non-zero)."""
  graphdef, state = sharding.sharded_init(lambda: Toy(vocab, rngs=nnx.Rngs(seed)), mesh)
  params = nnx.state(nnx.merge(graphdef, state), nnx.Param)
  tx = optax.adam(1e-2)
  opt_sh = sharding.state_shardings(jax.eval_shape(tx.init, params), mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  grads = jax.tree.map(lambda p: jnp.cos(p * 100.0), params)
  updates, opt_state = jax.jit(tx.update, out_shardings=(None, opt_sh))(grads, opt_state)
  return state, opt_state, tx


def _abstract_targets(mesh, tx, vocab=64):
  """Abstract (state, opt_state) carrying the shardings of `mesh`."""
  graphdef, abs_state = sharding.abstract_state(lambda: Toy(vocab, rngs=nnx.Rngs(0)), mesh)
  abs_params = nnx.state(nnx.merge(graphdef, abs_state), nnx.Param)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  abs_opt = sharding.with_shardings(abs_opt, sharding.state_shardings(abs_opt, mesh))
  return abs_state, abs_opt


def _assert_tree_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def mesh8():
  return sharding.make_mesh(MeshConfig(1, 4, 2))


@pytest.fixture(scope="module")
def trained(mesh8):
  return _train_state(mesh8)


@pytest.fixture
def saved(tmp_path, trained):
  """A run with one checkpoint at step 10 written from the 8-device (1, 4, 2) mesh."""
  state, opt_state, tx = trained
  cfg = _cfg(tmp_path)
  data_state = {"grain": {"next_index": 17, "epoch": 2}, "seed": 0}
  with checkpoint.Checkpointer(cfg.run_dir, cfg.checkpoint,
                               metadata={"config": config.to_dict(cfg)}) as ck:
    assert ck.latest_step() is None
    assert ck.save(10, params=state, opt_state=opt_state, data_state=data_state, loss=1.5)
  return cfg, data_state


@pytest.mark.parametrize("mesh_cfg,devices", [((1, 1, 1), 1), ((2, 2, 2), 8)])
def test_round_trip_onto_another_mesh(saved, trained, mesh_cfg, devices):
  cfg, data_state = saved
  state, opt_state, tx = trained
  mesh = sharding.make_mesh(MeshConfig(*mesh_cfg), devices=jax.devices()[:devices])
  abs_state, abs_opt = _abstract_targets(mesh, tx)
  ck = checkpoint.Checkpointer(cfg.run_dir, cfg.checkpoint, metadata={"config": cfg})
  assert ck.latest_step() == 10
  r = ck.restore(ck.latest_step(), params=abs_state, opt_state=abs_opt, expect_config=cfg)
  ck.close()
  assert r.step == 10 and r.data_state == data_state
  _assert_tree_equal(r.params, state)
  _assert_tree_equal(r.opt_state, opt_state)
  assert np.abs(np.asarray(r.opt_state[0].mu["embed"][...])).max() > 0  # non-trivial moments
  # restored arrays live on the *current* mesh with the current rules
  emb = r.params["embed"][...]
  assert emb.sharding.mesh.shape == mesh.shape
  assert emb.sharding.spec == P("tensor", "fsdp") and emb.sharding.num_devices == devices
  assert emb.addressable_shards[0].data.shape == (64 // mesh.shape["tensor"], 16 // mesh.shape["fsdp"])
  assert r.opt_state[0].nu["layers"][1][...].sharding.spec == P("fsdp", "tensor")
  assert isinstance(r.params["layers"][0], nnx.Param)
  m = r.metadata
  assert (m["stage"], m["chunk_size"], m["vocab_size"], m["latent_dim"]) == (
      "autoencoder", 4, 512, 16)
  assert m["config"] == config.to_dict(cfg) and m["step"] == 10 and m["device_count"] == 8


def test_restore_with_concrete_targets_and_without_optimizer(saved, trained, mesh8):
  cfg, _ = saved
  state, _, _ = trained
  target = jax.tree.map(jnp.zeros_like, state)
  ck = checkpoint.Checkpointer(cfg.run_dir, cfg.checkpoint)
  r = ck.restore(params=target, restore_data=False)
  ck.close()
  _assert_tree_equal(r.params, state)
  assert r.opt_state is None and r.data_state is None
  assert r.params["layers"][0][...].sharding == state["layers"][0][...].sharding


def test_keep_last_n_and_interval(tmp_path, trained):
  state, opt_state, _ = trained
  ck = checkpoint.Checkpointer(tmp_path / "run", CheckpointConfig(every=2, keep=2, async_save=True),
                               metadata={"stage": "ar"})
  saved = [s for s in range(1, 8) if ck.maybe_save(s, params=state, opt_state=opt_state)]
  assert saved == [2, 4, 6]
  assert ck.save(7, params=state) and not ck.save(7, params=state)  # explicit save; no duplicate
  ck.wait()
  assert ck.all_steps() == [6, 7] and ck.latest_step() == 7
  ck.close()
  steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [6, 7]


def test_refuses_non_finite_loss(tmp_path, trained):
  ck = checkpoint.Checkpointer(tmp_path / "run", CheckpointConfig(every=1, async_save=False))
  with pytest.raises(CheckpointError, match="refusing to save step 3: loss is nan"):
    ck.save(3, params=trained[0], loss=float("nan"))
  with pytest.raises(CheckpointError, match="loss is inf"):
    ck.maybe_save(4, params=trained[0], loss=jnp.inf)
  assert ck.latest_step() is None
  ck.close()


def test_preemption_signal_triggers_a_save(tmp_path, trained):
  ck = checkpoint.Checkpointer(tmp_path / "run", CheckpointConfig(every=100, async_save=True))
  before = signal.getsignal(signal.SIGTERM)
  ck.install_preemption_handler()
  assert not ck.preempted and not ck.maybe_save(5, params=trained[0])
  os.kill(os.getpid(), signal.SIGTERM)
  assert ck.preempted and ck.reached_preemption(6)
  assert signal.getsignal(signal.SIGTERM) is before  # a second signal acts as usual
  assert ck.maybe_save(6, params=trained[0])
  ck.close()
  assert checkpoint.read_metadata(tmp_path / "run")[0] == 6


def test_missing_checkpoints_are_one_line_errors(tmp_path, saved, trained):
  cfg, _ = saved
  with pytest.raises(CheckpointError, match="checkpoint directory not found"):
    checkpoint.load_for_inference(tmp_path / "nope", lambda c: None)
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="no checkpoint in"):
    checkpoint.read_metadata(tmp_path / "empty")
  ck = checkpoint.Checkpointer(cfg.run_dir, cfg.checkpoint)
  with pytest.raises(CheckpointError, match=r"step 11 not found .*\(available: 10\)"):
    ck.restore(11, params=trained[0])
  ck.close()


def _corrupt_arrays(run_dir: pathlib.Path, how: str) -> None:
  files = [p for p in (run_dir / "checkpoints" / "10" / "params").rglob("*")
           if p.is_file() and p.parent.name == "d"]
  assert files
  for f in files:
    if how == "delete":
      f.unlink()
    else:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_corrupt_checkpoint_is_a_checkpoint_error(saved, trained, how):
  cfg, _ = saved
  _corrupt_arrays(pathlib.Path(cfg.run_dir), how)
  ck = checkpoint.Checkpointer(cfg.run_dir, cfg.checkpoint)
  with pytest.raises(CheckpointError, match="corrupt or unreadable") as e:
    ck.restore(10, params=trained[0], opt_state=trained[1])
  assert "\n" not in str(e.value)
  ck.close()


def test_read_loops_let_sibling_reads_finish(caplog):
  """Orbax's pattern (a fresh loop per read, closed right after the first failure) leaves
  sibling reads pending; inside `_reading_arrays` they finish before the loop closes, so nothing
  completes into a closed loop or is destroyed pending (the noise after a corrupt-checkpoint
  error)."""
  import asyncio
  import concurrent.futures
  import gc
  import sys
  import threading

  unraisable, finished = [], []
  pool = concurrent.futures.ThreadPoolExecutor(2)

  async def read(i):  # I/O completed by another thread, like a TensorStore read
    await asyncio.wrap_future(pool.submit(threading.Event().wait, 0.3))
    finished.append(i)

  async def fail():
    raise ValueError("corrupt")

  async def restore():
    await asyncio.gather(fail(), read(1), read(2))

  hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
  try:
    with caplog.at_level("DEBUG"), checkpoint._reading_arrays():
      loop = asyncio.new_event_loop()
      try:
        with pytest.raises(ValueError):
          loop.run_until_complete(restore())
      finally:
        loop.close()
    assert type(asyncio.new_event_loop()) is not checkpoint._DrainingLoop  # policy restored
    pool.shutdown(wait=True)
    gc.collect()
  finally:
    sys.unraisablehook = hook
  assert sorted(finished) == [1, 2]
  assert not unraisable and not [r for r in caplog.records if r.levelname != "DEBUG"], (
      unraisable, caplog.text)


def test_corrupt_checkpoint_one_stderr_line_every_time(tmp_path, mesh8):
  """sample.py on a run whose array files are truncated: exactly the one-line error on stderr,
  in each of 10 runs (the noise used to come in some runs only)."""
  import subprocess
  import sys

  from calm import stages
  from conftest import subprocess_env

  cfg = config.replace(_cfg(tmp_path), stage="ar")
  _, state = sharding.sharded_init(
      lambda: stages.get_stage(cfg).build(cfg.model, nnx.Rngs(0)), mesh8)
  with checkpoint.Checkpointer(cfg.run_dir, CheckpointConfig(async_save=False),
                               metadata={"config": cfg}) as ck:
    ck.save(1, params=state)
  config.dump(cfg, pathlib.Path(cfg.run_dir) / "config.yaml")
  files = list((pathlib.Path(cfg.run_dir) / "checkpoints" / "1" / "params").glob("*/d/*"))
  assert files
  for f in files:
    os.truncate(f, 10)
  cmd = [sys.executable, "sample.py", "--config", f"{cfg.run_dir}/config.yaml", "--prompt", "x"]
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True) for _ in range(10)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    lines = err.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: ") and "corrupt or unreadable" in lines[0], lines


def test_corrupt_metadata_is_a_checkpoint_error(saved, trained):
  cfg, _ = saved
  (pathlib.Path(cfg.run_dir) / "checkpoints" / "10" / "metadata" / "metadata").write_text("{x")
  with pytest.raises(CheckpointError, match="metadata unreadable or corrupt"):
    checkpoint.read_metadata(cfg.run_dir)


@pytest.mark.parametrize("change,msg", [
    ({"model.chunk_size": 8, "data.block_tokens": 64, "eval.block_tokens": 64},
     "model.chunk_size is 4 in the checkpoint but 8 in the current config"),
    ({"model.vocab_size": 1024}, "model.vocab_size is 512 in the checkpoint but 1024"),
    ({"model.latent_dim": 32}, "model.latent_dim is 16 in the checkpoint but 32"),
    ({"model.autoencoder.ffn_dim": 128}, "model.autoencoder.ffn_dim is 64 in the checkpoint"),
    ({"stage": "calm"}, "holds a 'autoencoder' checkpoint, expected 'calm'"),
])
def test_metadata_mismatch_names_the_key(saved, trained, change, msg):
  cfg, _ = saved
  other = config.replace(cfg, **change)
  ck = checkpoint.Checkpointer(cfg.run_dir, cfg.checkpoint)
  with pytest.raises(CheckpointError, match=msg):
    ck.restore(params=trained[0], expect_config=other)
  ck.close()


def test_shape_mismatch_names_the_array(saved, mesh8):
  cfg, _ = saved
  _, abs_state = sharding.abstract_state(lambda: Toy(vocab=32, rngs=nnx.Rngs(0)), mesh8)
  ck = checkpoint.Checkpointer(cfg.run_dir, cfg.checkpoint)
  with pytest.raises(CheckpointError, match=r"params.embed has shape \(64, 16\) in the checkpoint "
                     r"but \(32, 16\)"):
    ck.restore(params=abs_state)
  _, abs_state = sharding.abstract_state(lambda: Toy(layers=3, rngs=nnx.Rngs(0)), mesh8)
  with pytest.raises(CheckpointError, match="params.layers.2 is not in the checkpoint"):
    ck.restore(params=abs_state)
  ck.close()


def test_load_for_inference_and_autoencoder_fingerprint(tmp_path, saved, trained):
  cfg, _ = saved
  state = trained[0]
  build = lambda c: Toy(rngs=nnx.Rngs(c.seed))
  one = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  loaded = checkpoint.load_for_inference(cfg.run_dir, build, mesh=one,
                                         expect_stage="autoencoder")
  assert loaded.step == 10 and loaded.config == cfg
  assert loaded.run_dir == pathlib.Path(cfg.run_dir)
  model = loaded.model
  np.testing.assert_array_equal(np.asarray(model.embed[...]), np.asarray(state["embed"][...]))
  assert model.embed[...].sharding.num_devices == 1
  with pytest.raises(CheckpointError, match="holds a 'autoencoder' checkpoint, expected 'calm'"):
    checkpoint.load_for_inference(cfg.run_dir, build, expect_stage="calm")

  # A CALM run records the autoencoder it depends on; a changed autoencoder blocks resuming.
  calm_cfg = config.replace(cfg, stage="calm", run_dir=str(tmp_path / "calm"))
  meta = {"config": calm_cfg, "autoencoder": cfg.run_dir}
  ck = checkpoint.Checkpointer(calm_cfg.run_dir, calm_cfg.checkpoint, metadata=meta)
  fp = ck.metadata["autoencoder_fingerprint"]
  assert ck.metadata["autoencoder_step"] == 10 and len(fp) == 64
  assert checkpoint.fingerprint(cfg.run_dir) == (10, fp)
  ck.save(1, params=state)
  ck.close()
  with checkpoint.Checkpointer(cfg.run_dir, CheckpointConfig(async_save=False)) as ae:
    ae.save(20, params=jax.tree.map(lambda x: x, state))  # the autoencoder trains on
  assert checkpoint.fingerprint(cfg.run_dir)[0] == 20
  ck = checkpoint.Checkpointer(calm_cfg.run_dir, calm_cfg.checkpoint, metadata=meta)
  assert ck.metadata["autoencoder_fingerprint"] != fp
  with pytest.raises(CheckpointError, match="the autoencoder changed since this run started"):
    ck.restore(params=state, expect_config=calm_cfg)
  ck.close()


def test_check_compatible_accepts_configs_and_metadata(tmp_path):
  a = _cfg(tmp_path)
  b = config.replace(a, **{"model.autoencoder.hidden_dim": 48})
  checkpoint.check_compatible(a, config.to_dict(a))
  checkpoint.check_compatible({"config": config.to_dict(a)}, b, keys=("model.vocab_size",))
  with pytest.raises(CheckpointError, match="autoencoder x: model.autoencoder.hidden_dim is 32 in "
                     "the checkpoint but 48 in the current config"):
    checkpoint.check_compatible(a, b, what="autoencoder x")
