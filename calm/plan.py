"""Will a configuration fit? Compile its training step without running it and report per chip.

  python -m calm.plan --config configs/calm_m.yaml stage=calm --topology v5e:2x2
  python -m calm.plan --config configs/tiny.yaml --devices 8

Nothing is materialised: parameters, optimizer state and the batch are abstract (shapes and
shardings from the config), so no trained autoencoder, tokenizer or data is needed. With
`--topology` the step is compiled by libtpu for that TPU slice on this machine (install the `tpu`
extra); without it, for the local devices. Prints memory per chip (arguments, temporaries, total
against the chip's HBM), FLOPs per step and chip, the compiler's estimated step time and the MFU
it implies, the FLOPs against the same step without remat, and a verdict. A step that does not
fit exits with a one-line error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Sequence

from calm.errors import CalmError, ConfigError

GiB = 2**30

# Per chip: (HBM bytes, peak dense bf16 FLOP/s) from the vendors' spec sheets.
CHIPS = {
    "TPU v4": (32 * GiB, 275e12),
    "TPU v5 lite": (16 * GiB, 197e12),  # v5e
    "TPU v5e": (16 * GiB, 197e12),
    "TPU v5": (95 * 10**9, 459e12),  # v5p
    "TPU v5p": (95 * 10**9, 459e12),
    "TPU v6 lite": (32 * GiB, 918e12),  # v6e
    "TPU v6e": (32 * GiB, 918e12),
    "NVIDIA H100 80GB HBM3": (80 * 10**9, 989e12),
    "NVIDIA H200": (141 * 10**9, 989e12),
    "NVIDIA A100-SXM4-80GB": (80 * 10**9, 312e12),
}


@dataclasses.dataclass
class Plan:
  """One compiled step, per chip."""

  devices: int
  device_kind: str
  mesh: dict
  params: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  hbm_bytes: float | None  # None: unknown (e.g. the host CPU)
  flops: float  # compiled, per chip per optimizer step
  model_flops: float  # the model's own count (metrics.model_flops_per_token), per chip
  est_seconds: float | None  # compiler's estimate, when it gives one
  peak_flops: float | None
  compile_seconds: float
  attention: str = ""  # the implementation compiled
  flops_no_remat: float | None = None
  baseline_note: str = ""
  reused_from: float | None = None  # compile seconds of the earlier launch whose analysis this is

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def fits(self) -> bool:
    return self.hbm_bytes is None or self.total_bytes <= self.hbm_bytes

  @property
  def mfu(self) -> float | None:
    if not self.est_seconds or not self.peak_flops:
      return None
    return self.model_flops / (self.est_seconds * self.peak_flops)


def check_devices(cfg, num: int) -> None:
  """ConfigError unless `num` devices form cfg's mesh and split its micro-batch; checked before
  any device is made or anything compiled."""
  from calm import sharding

  data, fsdp, _ = sharding.mesh_shape(cfg.mesh, num)
  micro = cfg.train.batch_size // cfg.train.grad_accum
  if micro % (data * fsdp):
    raise ConfigError(f"--devices {num}: the micro-batch of {micro} sequences (train.batch_size "
                      f"/ train.grad_accum) is not divisible by the {data * fsdp} batch shards "
                      f"of mesh data={data} fsdp={fsdp}")


def _libtpu_installed() -> bool:
  import importlib.util

  return importlib.util.find_spec("libtpu") is not None


def devices_for(topology: str | None, num: int | None):
  import jax

  if topology:
    try:
      from jax.experimental import topologies
      topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # libtpu missing, busy, or an unknown topology name
      if not _libtpu_installed():
        raise CalmError(f"--topology {topology}: compiling for a TPU slice needs libtpu, which "
                        f"is not installed: pip install -e '.[tpu]'") from None
      raise CalmError(f"--topology {topology}: libtpu cannot describe this TPU slice: "
                      f"{_first_line(e)}") from None
    devices = list(topo.devices)
  else:
    devices = jax.devices()
  if num is not None:
    if num > len(devices):
      raise CalmError(f"--devices {num}: only {len(devices)} devices are available")
    devices = devices[:num]
  return devices


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _chip(device, hbm_gib: float | None) -> tuple[float | None, float | None]:
  hbm, peak = CHIPS.get(device.device_kind, (None, None))
  if hbm_gib is not None:
    hbm = hbm_gib * GiB
  elif hbm is None:
    try:
      hbm = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # topology devices and some backends have no memory stats
      hbm = None
  return hbm, peak


@dataclasses.dataclass
class Compiled:
  """What a plan reads from one compiled step: memory analysis (bytes) and cost analysis."""

  memory: dict
  cost: dict
  params: int
  mesh: object
  seconds: float  # compiling in this launch
  reused_from: float | None = None  # set when the analysis came from an earlier launch


_MEMORY = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
           "temp_size_in_bytes")


def _compile_only(devices) -> bool:
  """Devices of a TPU topology description (no TPU here): jax's compilation cache writes their
  executables but cannot load them back without the TPU."""
  return type(devices[0].client).__name__ == "CompileOnlyPyClient"


def _analysis_path(lowered, devices) -> str | None:
  """Where this program's analysis is kept for later launches: in the compilation cache
  directory, keyed by the lowered program, the jax and compiler versions, the devices and the
  XLA flags (as jax keys its cache); None when the cache is off or the devices are real (jax's
  own cache serves those)."""
  from calm import compile_cache

  root = compile_cache.directory()
  if root is None or "://" in root or not _compile_only(devices):
    return None
  import jax
  import jaxlib

  client = devices[0].client
  parts = [lowered.as_text(), jax.__version__, jaxlib.__version__, client.platform,
           client.platform_version, devices[0].device_kind,
           [(d.id, list(getattr(d, "coords", ()) or ())) for d in devices],
           os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", "")]
  key = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
  return os.path.join(root, f"calm-plan-{key}.json")


def _save_analysis(path: str | None, record: dict) -> None:
  if path is None:
    return
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(record, f)
    os.replace(tmp, path)  # whole or not at all, whoever else writes it
  except OSError:  # a cache that cannot be written costs the next launch a compile, no more
    pass


def _load_analysis(path: str | None) -> dict | None:
  if path is None or not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      rec = json.load(f)
  except (OSError, ValueError):
    return None
  return rec if isinstance(rec, dict) else None


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def compile_step(cfg, devices) -> Compiled:
  """The trainer's abstract setup over `devices`, lowered and compiled; for a TPU topology
  described on this machine, the analysis of the same program compiled by an earlier launch is
  reused (kept beside the compilation cache)."""
  import jax

  from calm import sharding, trainer

  mesh = sharding.make_mesh(cfg.mesh, devices)
  s = trainer.setup(cfg, mesh=mesh, abstract=True)
  lowered = s.lower()
  path = _analysis_path(lowered, devices)
  if (rec := _load_analysis(path)) is not None:
    if "refused" in rec:
      raise CalmError(rec["refused"])
    return Compiled(memory=rec["memory"], cost=rec["cost"], params=s.num_params, mesh=mesh,
                    seconds=0.0, reused_from=float(rec["seconds"]))
  t = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses steps that cannot fit
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    msg = (f"does not fit: {_first_line(e).split(': ', 1)[-1]} "
           f"(stage={cfg.stage} remat={cfg.model.remat} attention="
           f"{cfg.model.attention}, {cfg.train.batch_size // cfg.train.grad_accum} x "
           f"{cfg.data.block_tokens} tokens per micro-batch over {len(devices)} "
           f"devices)")
    _save_analysis(path, {"refused": msg, "seconds": time.perf_counter() - t})
    raise CalmError(msg) from None
  seconds = time.perf_counter() - t
  mem = compiled.memory_analysis()
  memory = {k: int(getattr(mem, k, 0) or 0) for k in _MEMORY}
  cost = {k: float(v) for k, v in _cost(compiled).items()
          if k in ("flops", "optimal_seconds") and isinstance(v, (int, float))}
  _save_analysis(path, {"memory": memory, "cost": cost, "seconds": seconds})
  return Compiled(memory=memory, cost=cost, params=s.num_params, mesh=mesh, seconds=seconds)


def plan(cfg, devices, *, hbm_gib: float | None = None, baseline: bool = True) -> Plan:
  """Compiles `cfg`'s training step for `devices` and measures it (see the module docstring)."""
  from calm import config, metrics

  from calm.models import attention
  if cfg.model.attention == "auto":  # for the target devices, not this host
    impl = attention.resolve("auto", cfg.model.dtype, devices[0].platform)
    cfg = config.replace(cfg, **{"model.attention": impl})
  c = compile_step(cfg, devices)
  mem, cost = c.memory, c.cost
  hbm, peak = _chip(devices[0], hbm_gib)
  tokens = cfg.train.batch_size * cfg.data.block_tokens
  est = cost.get("optimal_seconds")
  p = Plan(devices=len(devices), device_kind=devices[0].device_kind, mesh=dict(c.mesh.shape),
           params=c.params, argument_bytes=mem["argument_size_in_bytes"],
           output_bytes=mem["output_size_in_bytes"], alias_bytes=mem["alias_size_in_bytes"],
           temp_bytes=mem["temp_size_in_bytes"], hbm_bytes=hbm,
           flops=float(cost.get("flops", 0.0)),
           model_flops=metrics.model_flops_per_token(cfg) * tokens / len(devices),
           est_seconds=float(est) if est and est > 0 else None, peak_flops=peak,
           compile_seconds=c.seconds, attention=cfg.model.attention, reused_from=c.reused_from)
  if cfg.model.remat == "none":
    p.flops_no_remat = p.flops
  elif baseline:
    try:
      ref = compile_step(config.replace(cfg, **{"model.remat": "none"}), devices)
      p.flops_no_remat = float(ref.cost.get("flops", 0.0)) or None
    except CalmError:  # the step without remat does not fit: no ratio to report
      p.baseline_note = "the step without remat does not fit on this chip (no FLOPs ratio)"
  return p


def _size(b: float) -> str:
  """Bytes in GiB, or in MiB below a tenth of a GiB."""
  return f"{b / GiB:.2f} GiB" if abs(b) >= GiB / 10 else f"{b / 2**20:.2f} MiB"


def report(cfg, p: Plan, *, with_verdict: bool = True) -> str:
  """The plan as rows of text; the verdict last, unless the caller reports it."""
  g = _size
  micro = cfg.train.batch_size // cfg.train.grad_accum
  rows = [
      f"config      stage={cfg.stage} dtype={cfg.model.dtype} remat={cfg.model.remat} "
      f"attention={p.attention} params={p.params / 1e6:.1f}M",
      f"batch       {cfg.train.batch_size} x {cfg.data.block_tokens} tokens per step = "
      f"{cfg.train.grad_accum} micro-batches of {micro} "
      f"({micro / (p.mesh['data'] * p.mesh['fsdp']):g} x {cfg.data.block_tokens} per chip)",
      f"devices     {p.devices} x {p.device_kind}, mesh {p.mesh}",
      f"compile     {p.compile_seconds:.1f} s" if p.reused_from is None else
      f"compile     none: this program's analysis from an earlier launch (compiled in "
      f"{p.reused_from:.1f} s), kept beside the compilation cache",
      f"memory      arguments {g(p.argument_bytes)} + outputs {g(p.output_bytes)} - aliased "
      f"{g(p.alias_bytes)} + temporaries {g(p.temp_bytes)} = {g(p.total_bytes)} per chip"
      + (f" of {g(p.hbm_bytes)} HBM ({p.total_bytes / p.hbm_bytes:.0%})" if p.hbm_bytes else ""),
      f"flops       {_flops(p.flops)} per chip per step (compiled); model {_flops(p.model_flops)}",
  ]
  if p.flops_no_remat:
    rows.append(f"remat cost  {p.flops / p.flops_no_remat:.3f}x the FLOPs of the step without "
                f"remat ({_flops(p.flops_no_remat)})")
  elif p.baseline_note:
    rows.append(f"remat cost  {p.baseline_note}")
  loops = [what for what, on in [("one micro-batch (train.grad_accum > 1)",
                                   cfg.train.grad_accum > 1),
                                  ("one backbone layer (model.scan_layers)",
                                   cfg.model.scan_layers)] if on]
  if loops:
    rows.append("note        XLA's cost analysis counts a loop body once: the compiled FLOPs above "
                f"may count only {' and '.join(loops)}")
  if p.est_seconds:  # from the same cost analysis: a loop's body is counted once
    mfu = (f", MFU {p.mfu:.1%} of {p.peak_flops / 1e12:.0f} TFLOP/s" if p.mfu and not loops
           else "")
    rows.append(f"step time   {p.est_seconds:.3f} s (compiler's estimate"
                f"{', loop bodies counted once' if loops else ''}){mfu}")
  if with_verdict:
    rows.append(verdict(p))
  return "\n".join(rows)


def _flops(f: float) -> str:
  return f"{f / 1e12:.2f} TFLOP" if f >= 1e11 else f"{f / 1e9:.3f} GFLOP"


def verdict(p: Plan) -> str:
  if p.hbm_bytes is None:
    return f"verdict     {_size(p.total_bytes)} per chip; no memory limit known here"
  spare = p.hbm_bytes - p.total_bytes
  if spare >= 0:
    return f"verdict     fits: {_size(spare)} to spare per chip"
  return (f"verdict     does not fit: {_size(p.total_bytes)} per chip needed, "
          f"{_size(p.hbm_bytes)} available ({_size(-spare)} over)")


if __name__ == "__main__":
  from calm.cli import plan as _entry

  sys.exit(_entry())
