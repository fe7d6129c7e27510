"""Building blocks shared by every model: parameters with logical axes, norms, MLP, embedding."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from calm import sharding

Initializer = Callable[..., jax.Array]
AxisNames = Sequence[str | None]

default_init: Initializer = nnx.initializers.normal(stddev=0.02)
zeros_init: Initializer = nnx.initializers.zeros_init()
ones_init: Initializer = nnx.initializers.ones_init()


REMAT_POLICIES = {
    # keep matmul-with-weights outputs and attention outputs; recompute norms, activations and
    # the attention scores, which cost little compute but much memory
    "minimal": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("attention")),
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's inputs
}


def remat(fn: Callable, policy: str) -> Callable:
  """`fn(module, *args)` rematerialised in training under a `model.remat` policy name."""
  if policy == "none":
    return fn

  def wrapped(module: nnx.Module, *args):
    graphdef, state = nnx.split(module)  # modules are read-only in the forward pass
    pure = lambda state, *args: fn(nnx.merge(graphdef, state), *args)
    return jax.checkpoint(pure, policy=REMAT_POLICIES[policy])(state, *args)

  return wrapped


def rows(x: jax.Array, axis: int = 0) -> jax.Array:
  """Pins an activation to the batch layout: dimension `axis` over the mesh's batch shards,
  the rest whole (left to XLA, a sharded matmul may instead gather activations across devices)."""
  names = [None] * x.ndim
  names[axis] = "batch"
  return sharding.constrain(x, names)


def compute_dtype(name: str | jnp.dtype) -> jnp.dtype:
  """`"float32"` / `"bfloat16"` (config strings) → a jnp dtype."""
  return jnp.dtype(name)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: AxisNames) -> nnx.Param:
  """A float32 parameter carrying its logical axis names as `out_sharding` metadata.

  Eager sharding is off: the mesh placement is decided later from the names (calm/sharding.py),
  so modules can be built outside any mesh, under `jax.eval_shape` or inside a jitted init.
  """
  if len(names) != len(shape):
    raise ValueError(f"{len(names)} axis names for a parameter of shape {tuple(shape)}")
  value = init(rngs.params(), tuple(shape), jnp.float32)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class Linear(nnx.Module):
  """y = x·W (+ b); W is [in, out] with logical names (in_name, out_name)."""

  def __init__(self, in_dim: int, out_dim: int, names: tuple[str | None, str | None], *,
               use_bias: bool = False, dtype: str | jnp.dtype = "float32",
               kernel_init: Initializer = default_init, rngs: nnx.Rngs):
    self.kernel = param(rngs, kernel_init, (in_dim, out_dim), names)
    self.bias = param(rngs, zeros_init, (out_dim,), (names[1],)) if use_bias else None
    self.dtype = compute_dtype(dtype)

  def __call__(self, x_ID: jax.Array) -> jax.Array:
    y = jnp.einsum("...i,io->...o", x_ID.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """Llama RMSNorm: statistics in float32, learned scale, output in the input dtype."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
    self.scale = param(rngs, ones_init, (dim,), ("norm",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...] * x32).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias, statistics in float32."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
    self.scale = param(rngs, ones_init, (dim,), ("norm",))
    self.bias = param(rngs, zeros_init, (dim,), ("norm",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(x.dtype)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, dim: int, ffn_dim: int, *, dtype: str | jnp.dtype, rngs: nnx.Rngs):
    self.gate = Linear(dim, ffn_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.up = Linear(dim, ffn_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.down = Linear(ffn_dim, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


# Up to this many rows, `attend_argmax` computes vocab-major logits [V, rows]: on a CPU that
# matmul ran ~1.4× faster for 4 rows and ~1.1× for 32, even at 64, slower beyond (1.6× at 800;
# V=32000, D=256).
VOCAB_MAJOR_MAX_ROWS = 32
# Beyond that, logits are made and reduced a tile of rows at a time, about this many bytes of
# float32 per tile: for 4032 rows (V=32000, D=256, CPU) tiles of 262 rows with a max-then-first-
# index reduction ran 1.7× faster than one [4032, V] array reduced by jnp.argmax.
ARGMAX_TILE_BYTES = 32 << 20


def first_argmax(logits_RV: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (first index among equal maxima; a NaN counts as the maximum)
  as two reductions that vectorise better than argmax's (value, index) pairs → int32 [R]."""
  top_R1 = jnp.max(logits_RV, axis=-1, keepdims=True)
  hit_RV = (logits_RV == top_R1) | jnp.isnan(logits_RV)
  iota_V = jnp.arange(logits_RV.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(hit_RV, iota_V, logits_RV.shape[-1]), axis=-1)


class Embedding(nnx.Module):
  """Token table [V, D]; `attend` gives logits against the same table (weight tying)."""

  def __init__(self, vocab_size: int, dim: int, *, dtype: str | jnp.dtype, rngs: nnx.Rngs):
    self.table = param(rngs, default_init, (vocab_size, dim), ("vocab", "embed"))
    self.dtype = compute_dtype(dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.table[...], ids, axis=0).astype(self.dtype)

  def attend(self, x_D: jax.Array) -> jax.Array:
    return jnp.einsum("...d,vd->...v", x_D.astype(self.dtype), self.table[...].astype(self.dtype))

  def attend_argmax(self, x_D: jax.Array) -> jax.Array:
    """argmax(attend(x)) as int32 ids [...] (ties: the first index, as jnp.argmax)."""
    D = x_D.shape[-1]
    R = x_D.size // D
    if R <= VOCAB_MAJOR_MAX_ROWS:
      # Few rows (generation): vocab-major logits [V, ...] let the matmul stream the table once.
      logits_V = jnp.einsum("vd,...d->v...", self.table[...].astype(self.dtype),
                            x_D.astype(self.dtype))
      return jnp.argmax(logits_V, axis=0).astype(jnp.int32)
    n = -(-R // self.argmax_tile_rows())
    tile = -(-R // n)  # balanced tiles: under n rows of padding
    x_RD = jnp.pad(x_D.reshape(R, D), ((0, n * tile - R), (0, 0)))
    ids = jax.lax.map(self.argmax_rows, x_RD.reshape(n, tile, D))
    return ids.reshape(-1)[:R].reshape(x_D.shape[:-1])

  def attend_argmax_where(self, x_BRD: jax.Array, where_BR: jax.Array, tile: int) -> jax.Array:
    """`attend_argmax` of the rows where `where_BR`, −1 elsewhere → int32 [B, R]. Only those
    rows are projected onto the vocabulary: each product takes the next `tile` selected rows of
    every batch row b (B × tile rows; a batch sharded over devices stays there)."""
    B, R, D = x_BRD.shape
    tile = max(min(tile, R), 2 if B == 1 else 1)  # a one-row product sums in another order
    n = -(-R // tile)
    order_BR = jnp.argsort(~where_BR, axis=1, stable=True)  # each row's selected rows first
    order_BR = jnp.pad(order_BR, ((0, 0), (0, n * tile - R)), mode="edge")

    def step(i, ids_BR):
      rows_Bt = jax.lax.dynamic_slice_in_dim(order_BR, i * tile, tile, axis=1)
      x_BtD = jnp.take_along_axis(x_BRD, rows_Bt[..., None], axis=1)
      ids_Bt = self.argmax_rows(x_BtD.reshape(B * tile, D)).reshape(B, tile)
      return jax.vmap(lambda ids, rows, new: ids.at[rows].set(new))(ids_BR, rows_Bt, ids_Bt)

    count = jnp.max(jnp.sum(where_BR, axis=1, dtype=jnp.int32))
    ids_BR = jax.lax.fori_loop(0, (count + tile - 1) // tile, step, jnp.zeros((B, R), jnp.int32))
    return jnp.where(where_BR, ids_BR, -1)

  def argmax_tile_rows(self) -> int:
    """Rows per product in `attend_argmax` (about ARGMAX_TILE_BYTES of float32 logits)."""
    return max(2, ARGMAX_TILE_BYTES // (4 * self.table.shape[0]))

  def argmax_rows(self, x_RD: jax.Array) -> jax.Array:
    """argmax(attend(x)) of rows [R, D] from one token-major product → int32 [R]."""
    return first_argmax(self.attend(x_RD))
