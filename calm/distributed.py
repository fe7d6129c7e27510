"""Multi-host initialisation behind one guard.

`distributed.mode`:
  off  — never initialise (single process).
  on   — always call `jax.distributed.initialize` with `coordinator_address`, `num_processes`,
         `process_id` (empty / 0 / -1 = let JAX detect them from the cluster environment).
  auto — initialise only when a multi-process launch is detected:
         `distributed.coordinator_address` is set; or JAX_COORDINATOR_ADDRESS /
         COORDINATOR_ADDRESS is in the environment (with JAX_NUM_PROCESSES / NUM_PROCESSES and
         JAX_PROCESS_ID / PROCESS_ID when given); or a SLURM step with more than one task; or an
         Open MPI launch with more than one rank; or a multi-host TPU slice (TPU_WORKER_HOSTNAMES
         lists more than one host, or MEGASCALE_COORDINATOR_ADDRESS is set).
It must run before anything touches a JAX device.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from calm.config import DistributedConfig
from calm.errors import CalmError


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  process_index: int
  process_count: int
  local_devices: int
  global_devices: int
  platform: str
  initialized: bool  # jax.distributed is running

  def __str__(self) -> str:
    return (f"process {self.process_index}/{self.process_count}: {self.local_devices} local of "
            f"{self.global_devices} {self.platform} devices")


def _env_int(*names: str) -> int | None:
  for n in names:
    v = os.environ.get(n, "").strip()
    if v:
      try:
        return int(v)
      except ValueError:
        raise CalmError(f"environment variable {n}={v!r} is not an integer") from None
  return None


def detect_cluster(env: dict[str, str] | None = None) -> str | None:
  """Names the multi-process launch found in the environment, or None."""
  env = dict(os.environ if env is None else env)

  def count(name: str) -> int:
    try:
      return int(env.get(name, "").split("(")[0] or 0)
    except ValueError:
      return 0

  if env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS"):
    return "coordinator environment variables"
  if "SLURM_JOB_ID" in env and max(count("SLURM_STEP_NUM_TASKS"), count("SLURM_NTASKS")) > 1:
    return "SLURM"
  if count("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "TPU pod"
  return None


def _initialize_args(cfg: DistributedConfig) -> dict:
  address = (cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
             or os.environ.get("COORDINATOR_ADDRESS") or None)
  num = cfg.num_processes or _env_int("JAX_NUM_PROCESSES", "NUM_PROCESSES")
  pid = cfg.process_id if cfg.process_id >= 0 else _env_int("JAX_PROCESS_ID", "PROCESS_ID")
  return dict(coordinator_address=address, num_processes=num, process_id=pid,
              initialization_timeout=cfg.timeout_s)


def info() -> ProcessInfo:
  return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count(), jax.default_backend(),
                     jax.distributed.is_initialized())


def _initialize(kwargs: dict, why: str, timeout_s: int) -> None:
  pid = kwargs["process_id"]
  target = (f"coordinator {kwargs['coordinator_address'] or '(auto)'}, "
            f"{kwargs['num_processes'] or '(auto)'} processes, process id "
            f"{pid if pid is not None else '(auto)'}")
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # noqa: BLE001 - report any failure as one line
    msg = " ".join(str(e).split())[:300] or type(e).__name__
    if "before any JAX calls" in msg:
      msg = "JAX devices were used before distributed initialisation; initialise first"
    raise CalmError(f"distributed initialisation failed ({why}; {target}; timeout "
                    f"{timeout_s}s): {msg}") from None


def maybe_initialize(cfg: DistributedConfig, *, verbose: bool = True) -> ProcessInfo:
  """Initialises jax.distributed per `cfg.mode` (see module doc); logs and returns the layout."""
  why = None
  if cfg.mode == "on":
    why = "distributed.mode=on"
  elif cfg.mode == "auto":
    why = ("distributed.coordinator_address" if cfg.coordinator_address else detect_cluster())
  elif cfg.mode != "off":
    raise CalmError(f"distributed.mode must be auto, on or off; got {cfg.mode!r}")
  if why and not jax.distributed.is_initialized():
    kwargs = _initialize_args(cfg)
    if cfg.mode == "auto" and kwargs["num_processes"] == 1:
      why = None  # a one-process "cluster": nothing to join
    else:
      _initialize(kwargs, why, cfg.timeout_s)
  out = info()
  if verbose:
    print(f"{out}" + (f" [{why}]" if why else ""), flush=True)
  return out


def is_main() -> bool:
  """True on process 0 (the one that writes logs, configs and metadata)."""
  return jax.process_index() == 0
