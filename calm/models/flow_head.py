"""Flow-matching generative head: a velocity network integrated from Gaussian noise.

Path x_t = (1 − t)·x0 + t·x1 from x0 ~ N(0, I) to the target x1; the network predicts the
velocity x1 − x0 (squared error averaged over the latent). Sampling integrates dx/dt = v(x, t)
from t = 0 to 1 with Euler or midpoint steps. As in the reference, the network sees time as the
integer ⌊1000·t⌋.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calm.config import HeadConfig, ModelConfig
from calm.models.conditioning import AdaLNHeadParts, AdaLNMLP, adaln_train_macs_per_position

TIME_SCALE = 1000


def _time_index(t: jax.Array | np.ndarray) -> jax.Array:
  """⌊1000·t⌋ computed in float32 (t ∈ [0, 1))."""
  return jnp.floor(jnp.asarray(t, jnp.float32) * jnp.float32(TIME_SCALE))


@functools.cache
def solver_times(solver: str, steps: int) -> tuple[np.ndarray, np.ndarray, float]:
  """(t_k, midpoint t_k + dt/2 as time indices, dt) of a `steps`-step solver, float32 as the
  reference computes them."""
  dt = 1.0 / steps
  t = np.array([k / steps for k in range(steps)], np.float32)
  t_mid = t + np.float32(0.5 * dt)
  to_index = lambda x: np.floor(x * np.float32(TIME_SCALE)).astype(np.float32)
  return to_index(t), to_index(t_mid), dt


class FlowHead(AdaLNHeadParts, nnx.Module):
  """Velocity network v(x, t, h) on the backbone hidden h, its loss and its ODE sampler."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    h, d, L = cfg.head, cfg.backbone.hidden_dim, cfg.latent_dim
    self.latent_dim = L
    self.solver, self.steps = h.solver, h.flow_steps
    self.net = AdaLNMLP(L, d, L, d, h.num_blocks, dtype=cfg.dtype,
                        remat=cfg.remat, rngs=rngs)

  @property
  def calls_per_sample(self) -> int:
    return self.steps * (2 if self.solver == "midpoint" else 1)

  def velocity(self, x_L: jax.Array, t: jax.Array, c_D: jax.Array) -> jax.Array:
    """v(x, t, c) with t ∈ [0, 1)."""
    return self.net(x_L, _time_index(t), c_D)

  def loss_terms(self, c_D: jax.Array, x1_L: jax.Array, t: jax.Array, x0_L: jax.Array
                 ) -> jax.Array:
    """Per-sample loss mean_l (v(x_t, t, c) − (x1 − x0))² for given t and noise x0."""
    x1 = x1_L.astype(jnp.float32)
    tt = t.astype(jnp.float32)[..., None]
    xt = (1 - tt) * x0_L + tt * x1
    v = self.velocity(xt, t, c_D)
    return jnp.mean(jnp.square(v - (x1 - x0_L)), axis=-1)

  def loss(self, h_BSD: jax.Array, y_NBSL: jax.Array, keys_B: jax.Array
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching loss [N, B, S] of N target draws per position, t ~ U[0, 1); row b's t and
    noise come from keys_B[b] (so a row's draws do not depend on how the batch is split)."""
    def row(k):
      kt, kx = jax.random.split(k)
      shape = (y_NBSL.shape[0], *y_NBSL.shape[2:])
      return (jax.random.uniform(kt, shape[:-1], jnp.float32),
              jax.random.normal(kx, shape, jnp.float32))

    t_BNS, x0_BNSL = jax.vmap(row)(keys_B)
    loss_NBS = self.loss_terms(h_BSD, y_NBSL, jnp.moveaxis(t_BNS, 0, 1),
                               jnp.moveaxis(x0_BNSL, 0, 1))
    return loss_NBS, {}

  def solve(self, c_D: jax.Array, x0_L: jax.Array) -> jax.Array:
    """Integrates from x0 at t = 0 to t = 1. c [..., D] may broadcast over x0's leading dims
    (one conditioning vector for several samples): it is embedded once."""
    t_idx, tmid_idx, dt = solver_times(self.solver, self.steps)
    t_idx, tmid_idx = jnp.asarray(t_idx), jnp.asarray(tmid_idx)
    cond = self.net.cond(c_D)

    def v(x, t):
      return self.net.apply(x, self.net.time(t) + cond)

    def step(k, x):
      if self.solver == "midpoint":
        x_mid = x + (0.5 * dt) * v(x, t_idx[k])
        return x + dt * v(x_mid, tmid_idx[k])
      return x + dt * v(x, t_idx[k])

    return jax.lax.fori_loop(0, self.steps, step, x0_L.astype(jnp.float32))

  def draw(self, h_BD: jax.Array, keys_B: jax.Array, num: int) -> jax.Array:
    """`num` samples per row, row b's from keys_B[b] → z [B, num, L]."""
    x0_BNL = jax.vmap(lambda k: jax.random.normal(k, (num, self.latent_dim)))(keys_B)
    return self.solve(h_BD[:, None, :], x0_BNL)

  def sample(self, h_BSD: jax.Array, key: jax.Array, num: int) -> jax.Array:
    """`num` samples per position → z [num, B, S, L]."""
    x0 = jax.random.normal(key, (num, *h_BSD.shape[:-1], self.latent_dim))
    return self.solve(h_BSD, x0)

  # ----------------------------------------------------------------------- what the head owns

  @staticmethod
  def train_macs_per_position(m: ModelConfig) -> float:
    """Multiply-accumulates of the head and its loss per position in a training step."""
    return adaln_train_macs_per_position(m, m.latent_dim)

  @staticmethod
  def reference_config(h: HeadConfig) -> dict:
    """The head's fields of a reference config.json (beyond the shared ones)."""
    return dict(flow_solver=h.solver, flow_steps=h.flow_steps)

  architecture, model_type = "FlowTransformer", "flow"
