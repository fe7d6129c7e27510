"""Inference precision chosen at load time: the weight matrices in float32, bfloat16 or int8, and
the KV cache in float32 or bfloat16 (`calm.open(path, weights=..., cache=...)`, `--weights`,
`--cache`).

int8 is weight-only, symmetric and per output channel (one float32 scale per row of an embedding
table, per output column of every other matrix), quantised by qwix (`qwix.quantize`, absmax
calibration). The model reads a weight as `w[...]` (or a slice of it); an int8 weight gives back
`qvalue · scale`, so the product runs in the model's compute dtype (`model.dtype`) on weights
streamed as int8: inside `jax.jit` the dequantisation fuses into the matmul's operand. Vectors
(norm scales, biases) stay float32. On a TPU, `place` stores the int8 values once in the memory
tiling the compiled steps read them in (`weight_format`). See docs/quantization.md for the
measurements.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.layout import Format, Layout

from calm.errors import CalmError

WEIGHTS = ("float32", "bf16", "int8")
CACHES = ("float32", "bf16")
_DTYPES = {"float32": jnp.float32, "bf16": jnp.bfloat16}
# Matrices left in float32 by default (regular expressions on the parameter's path): none; the
# measurements in docs/quantization.md found no layer whose int8 weights cost quality.
KEEP: tuple[str, ...] = ()
# The tile a TPU step reads an int8 matrix in when it dequantises it for a bf16 / float32 product
# (docs/quantization.md); the TPU's default for an int8 array is (32, 128).
INT8_TILE = (8, 128)


def check(weights: str, cache: str | None) -> None:
  """A one-line CalmError for an unknown weight or cache precision, or int8 without qwix."""
  if weights not in WEIGHTS:
    raise CalmError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
  if cache is not None and cache not in CACHES:
    raise CalmError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
  if weights == "int8":
    _qwix()


def _qwix():
  try:
    import qwix
  except ImportError:
    raise CalmError("int8 weights need qwix: pip install 'calm-jax[quant]'") from None
  return qwix


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Weight:
  """An int8 matrix and its float32 scales (1 on the contracted axes); reads as float32."""

  qvalue: jax.Array  # int8, the weight's shape
  scale: jax.Array  # float32, broadcastable to the weight's shape

  shape = property(lambda self: self.qvalue.shape)
  ndim = property(lambda self: self.qvalue.ndim)
  dtype = property(lambda self: self.scale.dtype)

  def dequantize(self) -> jax.Array:
    return self.qvalue.astype(self.scale.dtype) * self.scale

  def __getitem__(self, index) -> jax.Array:
    return self.dequantize()[index]

  def astype(self, dtype) -> jax.Array:
    return self.dequantize().astype(dtype)


def channel_axes(name: str, ndim: int) -> tuple[int, ...]:
  """The axes with their own scale: an embedding table's rows (its output in a vocabulary
  projection, one row per looked-up token); the last axis of the attention output projection
  [heads, head_dim, embed]; every axis but the first (the input) of the other matrices."""
  if name == "table":
    return (0,)
  if name == "o":
    return (ndim - 1,)
  return tuple(range(1, ndim))


def quantize_int8(w: jax.Array, axes: Sequence[int]) -> Int8Weight:
  """Symmetric int8 with one scale per index of `axes` (qwix absmax calibration)."""
  q = _qwix().quantize(w.astype(jnp.float32), jnp.int8, channelwise_axes=tuple(axes))
  return Int8Weight(q.qvalue, q.scale.astype(jnp.float32))


def _matrices(model: nnx.Module, keep: Sequence[str]):
  """(module, attribute name, path, Param) of every parameter with ≥ 2 axes not matched by `keep`."""
  for path, module in nnx.iter_modules(model):
    for name, value in list(vars(module).items()):
      if isinstance(value, nnx.Param) and value.ndim >= 2:
        where = ".".join(map(str, (*path, name)))
        if not any(re.search(k, where) for k in keep):
          yield module, name, where, value


def apply(model: nnx.Module, weights: str = "float32", cache: str | None = None, *,
          keep: Sequence[str] = KEEP) -> nnx.Module:
  """`model` (changed in place and returned) with its matrices stored in `weights` precision and
  its backbone's KV cache (if it has one) in `cache` (None: the compute dtype)."""
  check(weights, cache)
  if weights != "float32":
    for _, name, _, p in _matrices(model, keep):
      w = p.get_value()
      p.set_value(w.astype(jnp.bfloat16) if weights == "bf16"
                  else quantize_int8(w, channel_axes(name, w.ndim)))
  if cache is not None:
    for _, module in nnx.iter_modules(model):
      if hasattr(module, "cache_dtype"):
        module.cache_dtype = jnp.dtype(_DTYPES[cache])
  return model


def _default_layout(shape, dtype, sharding) -> Layout | None:
  """The layout the platform of `sharding` gives such an array by default (None but on a TPU)."""
  device = next(iter(sharding.device_set))
  if device.platform != "tpu":
    return None
  return Layout.from_pjrt_layout(device.client.get_default_layout(
      np.dtype(dtype), sharding.shard_shape(tuple(shape)), device))


def weight_format(x, sharding):
  """Where and how to store the weight leaf `x` (an array or a ShapeDtypeStruct) on `sharding`:
  `sharding` itself (the platform's default layout) for every leaf but an int8 matrix on a TPU,
  which gets `Format(layout, sharding)`: the TPU's default dimension order for its shard, in
  (8, 128) tiles instead of the default (32, 128), the tiling the compiled steps read it in.
  Stored in the default tiling, every step would first copy each int8 matrix to that tiling (the
  whole embedding table and LM head per token). Matrices the default does not tile by (32, 128)
  (a few rows) keep the default."""
  if x.dtype != jnp.int8 or x.ndim < 2:
    return sharding
  default = _default_layout(x.shape, x.dtype, sharding)
  if default is None or not default.tiling or tuple(default.tiling[0]) != (32, 128):
    return sharding
  return Format(default.update(tiling=(INT8_TILE, *default.tiling[1:])), sharding)


def place(params):
  """`params` (a pytree of arrays, e.g. an `nnx.State`) with every int8 matrix moved once to the
  format `weight_format` chooses; the other leaves, and every leaf off a TPU, are returned as
  they are. A jitted call takes a committed argument's layout as its input layout, so the
  engine's steps then read the int8 weights without a per-step copy."""
  def put(x):
    if not isinstance(x, jax.Array):
      return x
    f = weight_format(x, x.sharding)
    return x if f is x.sharding else jax.device_put(x, f)

  return jax.tree.map(put, params)


def weight_bytes(model: nnx.Module) -> int:
  """Bytes of the model's parameters as stored (int8 values and their scales included)."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return int(sum(x.size * x.dtype.itemsize for x in leaves))
