"""Multi-process initialisation: two localhost processes × 2 CPU devices == one process × 4."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from calm import distributed
from calm.config import DistributedConfig
from calm.errors import CalmError

from conftest import subprocess_env

# Runs a few SGD steps of a tiny sharded linear model on a 4-device (data=2, fsdp=2) mesh, then
# writes (all processes together) or restores a checkpoint. argv: mode pid port out_dir.
WORKER = r'''
import json, pathlib, sys
import jax
import jax.experimental.multihost_utils
mode, pid, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], pathlib.Path(sys.argv[4])
jax.config.update("jax_num_cpu_devices", 2 if mode == "multi" else 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
import jax.numpy as jnp
import numpy as np
from flax import nnx
from calm import checkpoint, distributed, sharding
from calm.config import CheckpointConfig, DistributedConfig, MeshConfig

dist = DistributedConfig(mode="on", coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                         process_id=pid, timeout_s=60) if mode == "multi" else DistributedConfig(mode="off")
info = distributed.maybe_initialize(dist)
assert info.global_devices == 4, info


class Linear(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 4)), out_sharding=("embed", "mlp"),
                       eager_sharding=False)
    self.b = nnx.Param(jnp.zeros((4,)), out_sharding=("mlp",), eager_sharding=False)

  def __call__(self, x):
    return x @ self.w[...] + self.b[...]


mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))
graphdef, state = sharding.sharded_init(lambda: Linear(nnx.Rngs(0)), mesh)
shard = jax.tree.map(lambda a: a.sharding, state)
batch_sh = sharding.batch_sharding(mesh)

rng = np.random.default_rng(0)
X = rng.normal(size=(8, 8)).astype(np.float32)
Y = (X @ rng.normal(size=(8, 4)) + 1.0).astype(np.float32)
rows = sorted({idx[0].start or 0 for idx in batch_sh.addressable_devices_indices_map(X.shape).values()})
n = 8 // jax.process_count()
lo = jax.process_index() * n
assert rows == list(range(lo, lo + n, 2)), rows  # process p owns global rows [p·n, (p+1)·n)
x = jax.make_array_from_process_local_data(batch_sh, X[lo:lo + n])
y = jax.make_array_from_process_local_data(batch_sh, Y[lo:lo + n])


def step(s, x, y):
  def loss_fn(s):
    return jnp.mean((nnx.merge(graphdef, s)(x) - y) ** 2)
  loss, g = jax.value_and_grad(loss_fn)(s)
  return jax.tree.map(lambda p, d: p - 0.1 * d, s, g), loss


step = jax.jit(step, in_shardings=(shard, batch_sh, batch_sh), out_shardings=(shard, None))
losses = []
for _ in range(5):
  state, loss = step(state, x, y)
  losses.append(float(loss))
w_spec = str(state["w"][...].sharding.spec)
ck = checkpoint.Checkpointer(out / "run", CheckpointConfig(async_save=False),
                             metadata={"stage": "toy"})
if mode == "multi":
  ck.save(5, params=state, data_state={"next": 5})
  restored = None
else:
  r = ck.restore(5, params=state)
  restored = {k: np.asarray(r.params[k][...]).tolist() for k in ("w", "b")}
  assert r.data_state == {"next": 5}
ck.close()
result = {"losses": losses, "w_spec": w_spec, "process_count": jax.process_count(),
          "final": {k: np.asarray(jax.experimental.multihost_utils.process_allgather(
              state[k][...], tiled=True)).tolist() for k in ("w", "b")},
          "restored": restored}
(out / f"{mode}{pid}.json").write_text(json.dumps(result))
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(script, mode, pid, port, out):
  env = subprocess_env(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID"):
    env.pop(k, None)
  return subprocess.Popen([sys.executable, str(script), mode, str(pid), str(port), str(out)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=150):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  return outs


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  port = _free_port()
  outs = _wait([_launch(script, "multi", i, port, tmp_path) for i in range(2)])
  assert "process 0/2: 2 local of 4 cpu devices" in outs[0]
  assert "process 1/2: 2 local of 4 cpu devices" in outs[1]
  _wait([_launch(script, "single", 0, 0, tmp_path)])
  m0, m1, s = (json.loads((tmp_path / f).read_text())
               for f in ("multi0.json", "multi1.json", "single0.json"))
  assert m0["process_count"] == m1["process_count"] == 2 and s["process_count"] == 1
  assert m0["losses"] == pytest.approx(s["losses"], rel=1e-5)
  assert m0["losses"] == m1["losses"]
  assert s["losses"][-1] < 0.7 * s["losses"][0]
  assert m0["w_spec"] == s["w_spec"] == "P('fsdp', 'tensor')"
  for k in ("w", "b"):
    np.testing.assert_allclose(m0["final"][k], s["final"][k], rtol=1e-5, atol=1e-6)
    # the checkpoint both processes wrote restores in one process with the same values
    np.testing.assert_array_equal(s["restored"][k], m0["final"][k])


def test_detect_cluster_from_environment():
  assert distributed.detect_cluster({}) is None
  assert distributed.detect_cluster({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "SLURM"
  assert distributed.detect_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == "Open MPI"
  assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "a"}) is None
  assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "TPU pod"


def test_off_and_auto_without_cluster_stay_single_process(monkeypatch, capsys):
  for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID",
            "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(k, raising=False)
  for mode in ("off", "auto"):
    info = distributed.maybe_initialize(DistributedConfig(mode=mode))
    assert (info.process_index, info.process_count, info.initialized) == (0, 1, False)
    assert info.global_devices == 8
  assert "process 0/1: 8 local of 8 cpu devices" in capsys.readouterr().out
  assert distributed.is_main()


def test_on_after_devices_are_used_is_a_one_line_error():
  import jax

  jax.devices()  # the backend is up in this test process
  with pytest.raises(CalmError, match="distributed initialisation failed .* initialise first"):
    distributed.maybe_initialize(DistributedConfig(
        mode="on", coordinator_address="127.0.0.1:1", num_processes=2, process_id=0,
        timeout_s=1))
