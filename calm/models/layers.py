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
    """argmax(attend(x)) as int32 ids [...]."""
    if x_D.size // x_D.shape[-1] > VOCAB_MAJOR_MAX_ROWS:
      return jnp.argmax(self.attend(x_D), axis=-1).astype(jnp.int32)
    # Few rows (generation): vocab-major logits [V, ...] let the matmul stream the table once.
    logits_V = jnp.einsum("vd,...d->v...", self.table[...].astype(self.dtype),
                          x_D.astype(self.dtype))
    return jnp.argmax(logits_V, axis=0).astype(jnp.int32)
