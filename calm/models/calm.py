"""CALM: chunk compression → causal backbone → generative head (energy, flow or diffusion)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from calm.config import ModelConfig
from calm.models.diffusion_head import DiffusionHead
from calm.models.flow_head import FlowHead
from calm.models.layers import (Embedding, LayerNorm, Linear, compute_dtype, remat, rows,
                               zeros_init)
from calm.models.transformer import KVCache, Transformer


class InputCompression(nnx.Module):
  """K token embeddings of a chunk → LayerNorm(Linear(SiLU(Linear(concat, 2d)), d))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, K, dt = cfg.backbone.hidden_dim, cfg.chunk_size, cfg.dtype
    self.up = Linear(K * d, 2 * d, ("chunk", "mlp"), use_bias=True, dtype=dt, rngs=rngs)
    self.down = Linear(2 * d, d, ("mlp", "embed"), use_bias=True, dtype=dt, rngs=rngs)
    self.norm = LayerNorm(d, cfg.backbone.norm_eps, rngs=rngs)

  def __call__(self, emb_BSKD: jax.Array) -> jax.Array:
    x_BSC = emb_BSKD.reshape(*emb_BSKD.shape[:-2], -1)
    return self.norm(self.down(jax.nn.silu(self.up(x_BSC))))


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
    self.noise_dim = h.noise_dim
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


HEADS = {"energy": EnergyHead, "flow": FlowHead, "diffusion": DiffusionHead}


class CALM(nnx.Module):
  """Continuous autoregressive LM over chunk vectors: its own token embedding (not the AE's),
  input compression, Llama backbone and a generative head (`energy_head`, `flow_head` or
  `diffusion_head`, per `model.head.kind`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.chunk_size, self.latent_dim = cfg.chunk_size, cfg.latent_dim
    self.head_kind = cfg.head.kind
    self.embed = Embedding(cfg.vocab_size, cfg.backbone.hidden_dim, dtype=cfg.dtype, rngs=rngs)
    self.compress = InputCompression(cfg, rngs=rngs)
    self.backbone = Transformer(cfg.backbone, dtype=cfg.dtype, remat=cfg.remat,
                                scan=cfg.scan_layers, attention=cfg.attention, rngs=rngs)
    setattr(self, f"{self.head_kind}_head", HEADS[self.head_kind](cfg, rngs=rngs))

  @property
  def generator(self) -> EnergyHead | FlowHead | DiffusionHead:
    """The generative head."""
    return getattr(self, f"{self.head_kind}_head")

  def init_cache(self, batch: int, max_chunks: int, dtype: str | None = None) -> KVCache:
    return self.backbone.init_cache(batch, max_chunks, dtype)

  def compress_chunks(self, ids_BSK: jax.Array) -> jax.Array:
    """Token chunks → backbone inputs [B, S, D]."""
    return self.compress(self.embed(ids_BSK))

  def hidden(self, ids_BSK: jax.Array, *, positions_BS: jax.Array | None = None,
             cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Hidden state at each chunk (predicting the next chunk's vector)."""
    return self.backbone(self.compress_chunks(ids_BSK), positions_BT=positions_BS, cache=cache)

  def head(self, h_BSD: jax.Array, noise_BSU: jax.Array) -> jax.Array:
    """Energy head: one latent per noise vector; noise may carry extra leading sample dims."""
    return self.energy_head(h_BSD, noise_BSU)

  def sample(self, h_BSD: jax.Array, key: jax.Array, num: int) -> jax.Array:
    """`num` head samples per position → z [num, B, S, L]."""
    return self.generator.sample(h_BSD, key, num)

  def draw(self, h_BD: jax.Array, key: jax.Array, num: int) -> jax.Array:
    """`num` head samples per row → z [B, num, L]; row b's randomness comes from
    fold_in(key, b), so a row's draws do not depend on the batch size."""
    keys_B = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(h_BD.shape[0]))
    return self.generator.draw(h_BD, keys_B, num)
