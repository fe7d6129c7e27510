"""Energy-score generative head (the paper's "MLP generator"): one network call maps the backbone
hidden state and uniform noise to one latent sample; trained with the energy score of N samples
against M draws of the target posterior."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from calm import losses
from calm.config import HeadConfig, ModelConfig
from calm.models.layers import LayerNorm, Linear, compute_dtype, remat, rows, zeros_init


class HeadBlock(nnx.Module):
  """x + down(silu(g) * v), (g, v) = fc3(silu(fc2(silu(fc1([norm(x), y]))))).

  fc1's kernel [2d, d] is applied as two halves so the conditioning half (y) can be computed
  once per position and broadcast over the N noise samples.
  """

  def __init__(self, d: int, eps: float, *, dtype: str, rngs: nnx.Rngs):
    self.norm = LayerNorm(d, eps, rngs=rngs)
    self.fc1 = Linear(2 * d, d, (None, "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
    self.fc2 = Linear(d, d, ("mlp", None), use_bias=True, dtype=dtype, rngs=rngs)
    self.fc3 = Linear(d, 2 * d, (None, "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
    self.down = Linear(d, d, ("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs)
    self.dtype = compute_dtype(dtype)

  def condition(self, y_D: jax.Array) -> jax.Array:
    """The y half of fc1 (plus its bias): shared by every sample at a position."""
    d = y_D.shape[-1]
    w = self.fc1.kernel[d:].astype(self.dtype)
    b = self.fc1.bias[...].astype(self.dtype)
    return jnp.einsum("...i,io->...o", y_D.astype(self.dtype), w) + b

  def __call__(self, x_D: jax.Array, cond_D: jax.Array) -> jax.Array:
    d = x_D.shape[-1]
    w = self.fc1.kernel[:d].astype(self.dtype)
    h = jnp.einsum("...i,io->...o", self.norm(x_D).astype(self.dtype), w) + cond_D
    h = self.fc3(jax.nn.silu(self.fc2(jax.nn.silu(h))))
    g, v = jnp.split(h, 2, axis=-1)
    return x_D + self.down(jax.nn.silu(g) * v).astype(x_D.dtype)


class EnergyHead(nnx.Module):
  """Maps (backbone hidden h, uniform noise u) to one latent sample z (the "MLP generator")."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    h, d, L, dt = cfg.head, cfg.backbone.hidden_dim, cfg.latent_dim, cfg.dtype
    self.noise_dim, self.num_samples, self.beta = h.noise_dim, h.num_samples, h.beta
    self.remat = cfg.remat
    self.noise_in = Linear(h.noise_dim, d, ("noise", "embed"), use_bias=True, dtype=dt, rngs=rngs)
    self.hidden_in = Linear(d, d, (None, "embed"), use_bias=True, dtype=dt, rngs=rngs)
    self.noise_norm = LayerNorm(d, h.norm_eps, rngs=rngs)
    self.hidden_norm = LayerNorm(d, h.norm_eps, rngs=rngs)
    self.blocks = nnx.List([HeadBlock(d, h.norm_eps, dtype=dt, rngs=rngs)
                            for _ in range(h.num_blocks)])
    self.out_norm = LayerNorm(d, h.norm_eps, rngs=rngs)
    self.out_fc1 = Linear(d, d, ("embed", "mlp"), use_bias=True, dtype=dt, rngs=rngs)
    # zero-initialised: every sample starts at z = 0
    self.out_fc2 = Linear(d, L, ("mlp", "latent"), use_bias=True, dtype=dt,
                          kernel_init=zeros_init, rngs=rngs)

  def __call__(self, h_D: jax.Array, noise_U: jax.Array) -> jax.Array:
    """h [..., D] and noise [N..., ..., U] (broadcastable leading dims) → z [..., L] float32."""
    # Every piece that runs once per noise sample is rematerialised (model.remat): with N
    # samples per position they hold most of the head's activations.
    embed = remat(lambda head, u: head.noise_norm(head.noise_in(u)), self.remat)
    run = remat(lambda block, x, c: block(x, c), self.remat)
    readout = remat(lambda head, x: head.out_fc2(jax.nn.silu(head.out_fc1(head.out_norm(x)))),
                    self.remat)
    b = max(noise_U.ndim - 3, 0)  # the batch axis of the samples [N..., B, S, U]
    x = rows(embed(self, noise_U), b)
    y = self.hidden_norm(self.hidden_in(h_D))
    for block in self.blocks:
      x = rows(run(block, x, block.condition(y)), b)
    return readout(self, x).astype(jnp.float32)

  calls_per_sample = 1

  def draw(self, h_BD: jax.Array, keys_B: jax.Array, num: int) -> jax.Array:
    """`num` samples per row, row b's noise from keys_B[b] → z [B, num, L]."""
    noise_BNU = jax.vmap(lambda k: jax.random.uniform(
        k, (num, self.noise_dim), jnp.float32, -0.5, 0.5))(keys_B)
    return self(h_BD[:, None, :], noise_BNU)

  def sample(self, h_BSD: jax.Array, key: jax.Array, num: int) -> jax.Array:
    """`num` samples per position with u ~ U(−0.5, 0.5)^noise_dim → z [num, B, S, L]."""
    noise_NBSU = jax.random.uniform(key, (num, *h_BSD.shape[:-1], self.noise_dim),
                                    jnp.float32, -0.5, 0.5)
    return self(h_BSD, noise_NBSU)

  # ----------------------------------------------------------------------- what the head owns

  @staticmethod
  def validate(h: HeadConfig) -> list[str]:
    """Problems of the head's config section, as `key: message` strings."""
    return [] if h.num_samples >= 2 else ["model.head.num_samples: the energy score needs N >= 2"]

  @staticmethod
  def target_draws(h: HeadConfig) -> int:
    """Draws of the target posterior per position in the loss (M)."""
    return h.num_target_samples

  # The held-out energy loss has reference lines (no-context baseline, oracle): see
  # `losses.reference_energy_losses` and the normalised score.
  energy_references = True

  def loss(self, h_BSD: jax.Array, y_MBSL: jax.Array, keys_B: jax.Array
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """−energy score [B, S] of N head samples against the M target draws; row b's noise comes
    from keys_B[b]."""
    noise_NBSU = losses.draw_rows(
        keys_B, lambda k, s: jax.random.uniform(k, s, jnp.float32, -0.5, 0.5),
        (self.num_samples, *h_BSD.shape[:-1], self.noise_dim), axis=1)
    score, dxx, dxy = losses.energy_terms(self(h_BSD, noise_NBSU), y_MBSL, self.beta)
    return -score, {"energy_score": jnp.mean(score), "dist_xx": jnp.mean(dxx),
                    "dist_xy": jnp.mean(dxy)}

  @staticmethod
  def train_macs_per_position(m: ModelConfig) -> float:
    """Multiply-accumulates of the head and its loss per position in a training step."""
    h, d, L = m.head, m.backbone.hidden_dim, m.latent_dim
    shared = d * d + h.num_blocks * d * d  # hidden_in and the y half of each fc1
    per_sample = h.noise_dim * d + h.num_blocks * (d * d + d * d + d * 2 * d + d * d)
    per_sample += d * d + d * L
    return shared + h.num_samples * per_sample + h.num_samples * h.num_target_samples * L

  # conversion: the reference's `mlp_generator` (also saved as `generative_head`)
  architecture, model_type = "EnergyTransformer", "energy"

  @staticmethod
  def reference_rows(ours: str) -> list:
    """Name-table rows (see `calm.convert.names`) of the reference head → `ours`."""
    from calm.convert.tables import _layernorm, _linear

    g = "mlp_generator"
    rows = _linear(f"{g}.noise_embd", f"{ours}.noise_in")
    rows += _linear(f"{g}.hidden_embd", f"{ours}.hidden_in")
    rows += _layernorm(f"{g}.norm_noise", f"{ours}.noise_norm")
    rows += _layernorm(f"{g}.norm_hidden", f"{ours}.hidden_norm")
    rows += _layernorm(f"{g}.mlp_blocks.{{i}}.in_ln", f"{ours}.blocks.{{i}}.norm")
    for ref, mine in (("linears.0", "fc1"), ("linears.2", "fc2"), ("linears.4", "fc3"),
                      ("down_proj", "down")):
      rows += _linear(f"{g}.mlp_blocks.{{i}}.{ref}", f"{ours}.blocks.{{i}}.{mine}")
    rows += _layernorm(f"{g}.final_layer.in_ln", f"{ours}.out_norm")
    rows += _linear(f"{g}.final_layer.linears.0", f"{ours}.out_fc1")
    return rows + _linear(f"{g}.final_layer.linears.2", f"{ours}.out_fc2")

  @staticmethod
  def normalize_reference(w: dict, where: str) -> dict:
    """`generative_head.*` is the same module as `mlp_generator.*` in the reference."""
    from calm.convert.tables import _merge_alias

    for k in [k for k in w if k.startswith("generative_head.")]:
      _merge_alias(w, k, "mlp_generator." + k[len("generative_head."):], where)
    return w

  @staticmethod
  def reference_config(h: HeadConfig) -> dict:
    """The head's fields of a reference config.json (beyond the shared ones)."""
    return {}
