"""Diffusion generative head (MAR's diffusion loss): ε prediction with a learned-range variance.

The network outputs (ε, v) with v ∈ [−1, 1] interpolating the reverse-step log-variance between
the posterior's (v = −1) and β's (v = 1). Training: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε at a uniform step
t; loss = mean (ε − ε̂)² + the variational bound term of step t in bits (KL of the true posterior
to the model's reverse step, the discretised decoder NLL at t = 0), the latter training the
variance only. Sampling runs the respaced reverse chain from N(0, I) with each step's noise
scaled by a temperature. Tables are float64 on the host, used as float32 as the reference does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from calm.config import HeadConfig, ModelConfig
from calm.models.conditioning import AdaLNHeadParts, AdaLNMLP, adaln_train_macs_per_position
from calm.models.diffusion_schedule import Schedule, make_schedule

_LN2 = math.log(2.0)


def _at(sched: Schedule, name: str, t: jax.Array) -> jax.Array:
  """Table `name` at steps t [...] → [..., 1] float32 (a scalar t gives [1])."""
  return jnp.asarray(sched.f32(name))[t][..., None]


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log P(x) of a Gaussian discretised into bins of width 2/255 on [−1, 1] (open end bins)."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def reverse_step(sched: Schedule, out_L2: jax.Array, x_L: jax.Array, t: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """p(x_{t−1} | x_t) from the network output (ε, v) → (mean, log_variance, pred_x0)."""
  eps, v = jnp.split(out_L2, 2, axis=-1)
  frac = (v + 1) / 2
  log_var = frac * _at(sched, "log_betas", t) + (1 - frac) * _at(sched, "post_log_var", t)
  x0 = _at(sched, "sqrt_recip_ac", t) * x_L - _at(sched, "sqrt_recipm1_ac", t) * eps
  mean = _at(sched, "post_coef1", t) * x0 + _at(sched, "post_coef2", t) * x_L
  return mean, log_var, x0


class DiffusionHead(AdaLNHeadParts, nnx.Module):
  """Noise-prediction network ε(x, t, h) on the backbone hidden h, its loss and its sampler."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    h, d, L = cfg.head, cfg.backbone.hidden_dim, cfg.latent_dim
    self.latent_dim = L
    self.schedule, self.train_steps = h.schedule, h.diffusion_steps
    self.sampling_steps, self.noise_temperature = h.sampling_steps, h.noise_temperature
    self.net = AdaLNMLP(L, d, 2 * L, d, h.num_blocks, dtype=cfg.dtype,
                        remat=cfg.remat, rngs=rngs)

  @property
  def train_schedule(self) -> Schedule:
    return make_schedule(self.schedule, self.train_steps)

  @property
  def sample_schedule(self) -> Schedule:
    return make_schedule(self.schedule, self.train_steps, self.sampling_steps)

  @property
  def calls_per_sample(self) -> int:
    return self.sampling_steps

  def training_terms(self, c_D: jax.Array, x0_L: jax.Array, t: jax.Array, noise_L: jax.Array
                     ) -> dict[str, jax.Array]:
    """{loss, mse, vb} per sample for given steps t (int) and noise."""
    s = self.train_schedule
    x0 = x0_L.astype(jnp.float32)
    xt = _at(s, "sqrt_ac", t) * x0 + _at(s, "sqrt_1m_ac", t) * noise_L
    out = self.net(xt, t, c_D)
    eps = out[..., :self.latent_dim]
    # the bound trains the variance only: the mean it sees carries no gradient
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), out[..., self.latent_dim:]], axis=-1)
    mean, log_var, _ = reverse_step(s, frozen, xt, t)
    true_mean = _at(s, "post_coef1", t) * x0 + _at(s, "post_coef2", t) * xt
    kl = normal_kl(true_mean, _at(s, "post_log_var", t), mean, log_var)
    kl = jnp.mean(kl, axis=-1) / _LN2
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
    nll = jnp.mean(nll, axis=-1) / _LN2
    vb = jnp.where(t == 0, nll, kl)
    mse = jnp.mean(jnp.square(noise_L - eps), axis=-1)
    return {"loss": mse + vb, "mse": mse, "vb": vb}

  def loss(self, h_BSD: jax.Array, y_NBSL: jax.Array, keys_B: jax.Array
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Diffusion loss [N, B, S] of N target draws per position, t uniform over the steps; row
    b's t and noise come from keys_B[b] (so a row's draws do not depend on the batch split)."""
    def row(k):
      kt, kn = jax.random.split(k)
      shape = (y_NBSL.shape[0], *y_NBSL.shape[2:])
      return (jax.random.randint(kt, shape[:-1], 0, self.train_steps),
              jax.random.normal(kn, shape, jnp.float32))

    t_BNS, noise_BNSL = jax.vmap(row)(keys_B)
    terms = self.training_terms(h_BSD, y_NBSL, jnp.moveaxis(t_BNS, 0, 1),
                                jnp.moveaxis(noise_BNSL, 0, 1))
    return terms["loss"], {"mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"])}

  def step_outputs(self, c_D: jax.Array, x_L: jax.Array, i: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One reverse step of the sampling chain at its step index i (not the network's time)."""
    s = self.sample_schedule
    out = self.net(x_L, jnp.asarray(s.timesteps)[i], c_D)
    return reverse_step(s, out, x_L, i)

  def denoise(self, c_D: jax.Array, xT_L: jax.Array, noise_fn, temperature: float | None = None
              ) -> jax.Array:
    """Runs the reverse chain from x_T. `noise_fn(k)` gives the noise of the k-th step taken
    (step index S−1−k); c [..., D] may broadcast over x's leading dims (embedded once)."""
    s = self.sample_schedule
    temp = self.noise_temperature if temperature is None else temperature
    steps, timesteps = s.num_steps, jnp.asarray(s.timesteps)
    cond = self.net.cond(c_D)

    def body(k, x):
      i = steps - 1 - k
      out = self.net.apply(x, self.net.time(timesteps[i]) + cond)
      mean, log_var, _ = reverse_step(s, out, x, i)
      nonzero = (i != 0).astype(jnp.float32)  # the last step adds no noise
      return mean + nonzero * jnp.exp(0.5 * log_var) * noise_fn(k) * temp

    return jax.lax.fori_loop(0, steps, body, xT_L.astype(jnp.float32))

  def draw(self, h_BD: jax.Array, keys_B: jax.Array, num: int) -> jax.Array:
    """`num` samples per row, row b's from keys_B[b] → z [B, num, L]."""
    L = self.latent_dim
    normal = jax.vmap(lambda k: jax.random.normal(k, (num, L)))
    start_B, steps_B = jax.vmap(jax.random.split, out_axes=1)(keys_B)
    noise_fn = lambda k: normal(jax.vmap(lambda kb: jax.random.fold_in(kb, k))(steps_B))
    return self.denoise(h_BD[:, None, :], normal(start_B), noise_fn)

  def sample(self, h_BSD: jax.Array, key: jax.Array, num: int) -> jax.Array:
    """`num` samples per position → z [num, B, S, L]."""
    shape = (num, *h_BSD.shape[:-1], self.latent_dim)
    k_start, k_steps = jax.random.split(key)
    noise_fn = lambda k: jax.random.normal(jax.random.fold_in(k_steps, k), shape)
    return self.denoise(h_BSD, jax.random.normal(k_start, shape), noise_fn)

  # ----------------------------------------------------------------------- what the head owns

  @staticmethod
  def train_macs_per_position(m: ModelConfig) -> float:
    """Multiply-accumulates of the head and its loss per position in a training step."""
    return adaln_train_macs_per_position(m, 2 * m.latent_dim)

  @staticmethod
  def reference_config(h: HeadConfig) -> dict:
    """The head's fields of a reference config.json (beyond the shared ones)."""
    return dict(noise_schedule=h.schedule, diffusion_steps=h.diffusion_steps,
                num_sampling_steps=h.sampling_steps, noise_temperature=h.noise_temperature)

  architecture, model_type = "DiffusionTransformer", "diffusion"
