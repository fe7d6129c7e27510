"""The conditioning network of the flow and diffusion heads: an MLP with adaLN residual blocks.

net(x, t, c): x → Linear → blocks → final layer, every block modulated by y = time(t) + cond(c)
(MAR's `SimpleMLPAdaLN`). y only enters through the adaLN projections, so a y shared by many x
(several samples of one position at one time step) may carry a broadcast dimension of 1.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from calm.models.layers import LayerNorm, Linear, remat, zeros_init

FREQ_DIM = 256  # width of the sinusoidal time features
_EPS = 1e-6

xavier_init = nnx.initializers.xavier_uniform()
time_init = nnx.initializers.normal(stddev=0.02)


def timestep_embedding(t: jax.Array, dim: int = FREQ_DIM, max_period: float = 10000.0
                       ) -> jax.Array:
  """Sinusoidal features [..., dim] = [cos(t·f), sin(t·f)], f_i = max_period^(−i/(dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
  return emb


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale) + shift


class TimeEmbedding(nnx.Module):
  """t → Linear(SiLU(Linear(sinusoid(t))))."""

  def __init__(self, width: int, *, dtype: str, rngs: nnx.Rngs):
    self.fc1 = Linear(FREQ_DIM, width, (None, "mlp"), use_bias=True, dtype=dtype,
                      kernel_init=time_init, rngs=rngs)
    self.fc2 = Linear(width, width, ("mlp", "embed"), use_bias=True, dtype=dtype,
                      kernel_init=time_init, rngs=rngs)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.silu(self.fc1(timestep_embedding(t))))


class AdaLNBlock(nnx.Module):
  """x + gate · MLP(LN(x)·(1 + scale) + shift), (shift, scale, gate) = Linear(SiLU(y))."""

  def __init__(self, width: int, *, dtype: str, rngs: nnx.Rngs):
    self.norm = LayerNorm(width, _EPS, rngs=rngs)
    self.fc1 = Linear(width, width, ("embed", "mlp"), use_bias=True, dtype=dtype,
                      kernel_init=xavier_init, rngs=rngs)
    self.fc2 = Linear(width, width, ("mlp", "embed"), use_bias=True, dtype=dtype,
                      kernel_init=xavier_init, rngs=rngs)
    self.ada = Linear(width, 3 * width, (None, "mlp"), use_bias=True, dtype=dtype,
                      kernel_init=zeros_init, rngs=rngs)

  def __call__(self, x_D: jax.Array, y_D: jax.Array) -> jax.Array:
    shift, scale, gate = jnp.split(self.ada(jax.nn.silu(y_D)), 3, axis=-1)
    h = self.fc2(jax.nn.silu(self.fc1(_modulate(self.norm(x_D), shift, scale))))
    return x_D + (gate * h).astype(x_D.dtype)


class AdaLNFinal(nnx.Module):
  """Linear(LN(x)·(1 + scale) + shift) with a parameter-free LayerNorm."""

  def __init__(self, width: int, out_dim: int, *, dtype: str, rngs: nnx.Rngs):
    self.ada = Linear(width, 2 * width, (None, "mlp"), use_bias=True, dtype=dtype,
                      kernel_init=zeros_init, rngs=rngs)
    self.out = Linear(width, out_dim, ("embed", "latent"), use_bias=True, dtype=dtype,
                      kernel_init=zeros_init, rngs=rngs)

  def __call__(self, x_D: jax.Array, y_D: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.ada(jax.nn.silu(y_D)), 2, axis=-1)
    x32 = x_D.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = ((x32 - mean) * jax.lax.rsqrt(var + _EPS)).astype(x_D.dtype)
    return self.out(_modulate(normed, shift, scale))


class AdaLNMLP(nnx.Module):
  """net(x [..., in], t [...], c [..., cond]) → [..., out] float32, conditioned by y = time(t) +
  cond(c). Initialised as the reference: xavier weights, adaLN and output layers zero."""

  def __init__(self, in_dim: int, width: int, out_dim: int, cond_dim: int, num_blocks: int, *,
               dtype: str, remat: str = "none", rngs: nnx.Rngs):
    self.time = TimeEmbedding(width, dtype=dtype, rngs=rngs)
    self.cond = Linear(cond_dim, width, (None, "embed"), use_bias=True, dtype=dtype,
                       kernel_init=xavier_init, rngs=rngs)
    self.inp = Linear(in_dim, width, ("latent", "embed"), use_bias=True, dtype=dtype,
                      kernel_init=xavier_init, rngs=rngs)
    self.blocks = nnx.List([AdaLNBlock(width, dtype=dtype, rngs=rngs) for _ in range(num_blocks)])
    self.final = AdaLNFinal(width, out_dim, dtype=dtype, rngs=rngs)
    self.remat = remat  # model.remat, per block (the head runs once per sample and time)

  def apply(self, x_I: jax.Array, y_D: jax.Array) -> jax.Array:
    """The network for a given conditioning vector y = time(t) + cond(c)."""
    x = self.inp(x_I)
    run = remat(lambda block, x, y: block(x, y), self.remat)
    for block in self.blocks:
      x = run(block, x, y_D)
    return self.final(x, y_D).astype(jnp.float32)

  def __call__(self, x_I: jax.Array, t: jax.Array, c_C: jax.Array) -> jax.Array:
    return self.apply(x_I, self.time(t) + self.cond(c_C))


def adaln_train_macs_per_position(m, out_dim: int) -> float:
  """Multiply-accumulates per position of a training step of an `AdaLNMLP` head (flow,
  diffusion): the conditioning MLP once, the time MLP and the network once per target draw."""
  h, d, L = m.head, m.backbone.hidden_dim, m.latent_dim
  per_draw = 256 * d + d * d + L * d  # time MLP, input
  per_draw += h.num_blocks * (3 * d * d + 2 * d * d) + 2 * d * d + d * out_dim
  return d * d + h.num_samples * per_draw


class AdaLNHeadParts:
  """What the flow and diffusion heads own alike (see `calm.heads`)."""

  energy_references = False  # no energy score: no reference lines

  @staticmethod
  def validate(h) -> list[str]:
    """Problems of the head's config section, as `key: message` strings."""
    return []

  @staticmethod
  def target_draws(h) -> int:
    """Draws of the target posterior per position in the loss (each with its own time and
    noise, as the reference)."""
    return h.num_samples

  @staticmethod
  def reference_rows(ours: str) -> list:
    """Name-table rows of the reference `generative_head.net` (`SimpleMLPAdaLN`) → `ours.net`."""
    from calm.convert.tables import adaln_table

    return adaln_table("generative_head.net", f"{ours}.net")

  @staticmethod
  def normalize_reference(w: dict, where: str) -> dict:
    return w
