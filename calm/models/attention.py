"""Causal self-attention kernels: XLA, query-chunked XLA, cuDNN flash (GPU), Pallas splash (TPU).

All take q [B, T, N, H], k and v [B, T, KV, H] (N a multiple of KV, grouped heads) and return
[B, T, N, H]; softmax(q·kᵀ/√H + causal mask)·v in each.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from calm.errors import ConfigError

IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "splash")
CHUNK = 512  # query rows per block of the chunked path
_NEEDS = {"cudnn": "an NVIDIA GPU with cuDNN", "splash": "a TPU"}


def target_platform() -> str:
  """The platform being compiled for: the current mesh's devices' (which may be a TPU topology
  compiled ahead of time on another host), else the default backend's."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


@functools.cache
def _has_cudnn() -> bool:
  try:
    from jax._src.lib import cuda_versions  # None without the CUDA plugin
    return cuda_versions is not None and cuda_versions.cudnn_get_version() > 0
  except Exception:  # no CUDA libraries: no cuDNN
    return False


def available(platform: str) -> tuple[str, ...]:
  """The implementations that can run on `platform`."""
  runs = {"cudnn": platform in ("gpu", "cuda") and _has_cudnn(), "splash": platform == "tpu"}
  return tuple(i for i in IMPLEMENTATIONS if runs.get(i, True))


def check(impl: str, platform: str | None = None) -> str:
  """`impl` if it can run on `platform` (default: the target), else a one-line ConfigError."""
  platform = platform or target_platform()
  if impl not in IMPLEMENTATIONS:
    raise ConfigError(f"model.attention: unknown implementation {impl!r}; one of auto, "
                      f"{', '.join(IMPLEMENTATIONS)}")
  if impl not in available(platform):
    raise ConfigError(f"model.attention={impl} needs {_NEEDS[impl]}, and this compiles for "
                      f"{platform}; available here: auto, {', '.join(available(platform))}")
  return impl


def resolve(name: str, dtype: jnp.dtype, platform: str | None = None) -> str:
  """`model.attention` → the implementation used: auto picks cuDNN on GPU in 16-bit dtypes,
  splash on TPU, XLA elsewhere; an explicit choice the platform cannot run is a ConfigError."""
  platform = platform or target_platform()
  if name != "auto":
    return check(name, platform)
  if platform == "gpu" and jnp.dtype(dtype).itemsize == 2:
    return "cudnn"
  if platform == "tpu":
    return "splash"
  return "xla"


def causal_attention(q_BTHE: jax.Array, k_BTGE: jax.Array, v_BTGE: jax.Array,
                     impl: str) -> jax.Array:
  if impl == "xla":
    return jax.nn.dot_product_attention(q_BTHE, k_BTGE, v_BTGE, is_causal=True,
                                        implementation="xla")
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q_BTHE, k_BTGE, v_BTGE, is_causal=True,
                                        implementation="cudnn")
  if impl == "chunked":
    return chunked_attention(q_BTHE, k_BTGE, v_BTGE)
  if impl == "splash":
    return splash_attention(q_BTHE, k_BTGE, v_BTGE)
  raise ValueError(f"unknown attention implementation {impl!r}")


def chunked_attention(q_BTHE: jax.Array, k_BTGE: jax.Array, v_BTGE: jax.Array,
                      chunk: int = CHUNK) -> jax.Array:
  """XLA attention one block of `chunk` queries at a time, each block rematerialised, so neither
  the forward nor the backward holds more than [B, N, chunk, T] scores."""
  t0 = q_BTHE.shape[1]
  if t0 <= chunk:
    return causal_attention(q_BTHE, k_BTGE, v_BTGE, "xla")
  q_BTHE, k_BTGE, v_BTGE = (_pad_time(x, chunk) for x in (q_BTHE, k_BTGE, v_BTGE))
  b, t, n, h = q_BTHE.shape
  q_CBcNH = jnp.moveaxis(q_BTHE.reshape(b, t // chunk, chunk, n, h), 1, 0)

  @jax.checkpoint
  def block(args):
    i, q_BcNH = args
    qpos = i * chunk + jnp.arange(chunk)
    mask_11cT = (jnp.arange(t)[None, :] <= qpos[:, None])[None, None]
    return jax.nn.dot_product_attention(q_BcNH, k_BTGE, v_BTGE, mask=mask_11cT,
                                        implementation="xla")

  out_CBcNH = jax.lax.map(block, (jnp.arange(t // chunk), q_CBcNH))
  return jnp.moveaxis(out_CBcNH, 0, 1).reshape(b, t, n, h)[:, :t0]


def splash_attention(q_BTHE: jax.Array, k_BTGE: jax.Array, v_BTGE: jax.Array) -> jax.Array:
  """Pallas splash attention (TPU). Under a mesh (`jax.set_mesh`) it runs per shard: rows over
  ("data", "fsdp") and heads over "tensor", the layout of the surrounding activations."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # TPU-only import
      splash_attention_kernel as sk, splash_attention_mask as sm)

  b, t0, n, h = q_BTHE.shape
  kv = k_BTGE.shape[2]
  q_BTHE, k_BTGE, v_BTGE = (_pad_time(x, 128) for x in (q_BTHE, k_BTGE, v_BTGE))
  t = q_BTHE.shape[1]
  q_BHTE = jnp.swapaxes(q_BTHE, 1, 2) * jnp.asarray(h ** -0.5, q_BTHE.dtype)
  k_BGTE, v_BGTE = jnp.swapaxes(k_BTGE, 1, 2), jnp.swapaxes(v_BTGE, 1, 2)

  def local(q, k, v):
    heads = q.shape[1]
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(heads)])
    block = max(c for c in (512, 256, 128) if t % c == 0)
    sizes = sk.BlockSizes(block_q=block, block_kv_compute=block, block_kv=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes)
    if k.shape[1] != heads:  # grouped KV heads: repeat them up to the query heads
      k = jnp.repeat(k, heads // k.shape[1], axis=1)
      v = jnp.repeat(v, heads // v.shape[1], axis=1)
    return jax.vmap(kernel)(q, k, v)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    out_BHTE = local(q_BHTE, k_BGTE, v_BGTE)
  else:
    rows = tuple(a for a in ("data", "fsdp") if b % _size(mesh, ("data", "fsdp")) == 0)
    heads = "tensor" if n % mesh.shape["tensor"] == 0 and kv % mesh.shape["tensor"] == 0 else None
    spec = P(rows or None, heads, None, None)
    out_BHTE = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                             check_vma=False)(q_BHTE, k_BGTE, v_BGTE)
  return jnp.swapaxes(out_BHTE, 1, 2)[:, :t0]


def _pad_time(x_BT__: jax.Array, multiple: int) -> jax.Array:
  """Zero-pads the time axis up to a multiple; causal masking keeps the padded keys (all after
  the real positions) out of every real query's view."""
  pad = -x_BT__.shape[1] % multiple
  return x_BT__ if pad == 0 else jnp.pad(x_BT__, ((0, 0), (0, pad)) + ((0, 0),) * (x_BT__.ndim - 2))


def _size(mesh, axes) -> int:
  return functools.reduce(lambda a, x: a * mesh.shape[x], axes, 1)
