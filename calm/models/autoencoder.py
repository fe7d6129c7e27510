"""The K-tokens ↔ one-vector variational autoencoder (no attention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from calm.config import ModelConfig
from calm.models.layers import Embedding, Linear, RMSNorm, SwiGLU, remat, rows


class AEBlock(nnx.Module):
  """Pre-norm residual MLP block: x + SwiGLU(RMSNorm(x))."""

  def __init__(self, dim: int, ffn_dim: int, eps: float, *, dtype: str, rngs: nnx.Rngs):
    self.norm = RMSNorm(dim, eps, rngs=rngs)
    self.mlp = SwiGLU(dim, ffn_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.mlp(self.norm(x))


def _blocks(n: int, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.List:
  a = cfg.autoencoder
  return nnx.List([AEBlock(a.hidden_dim, a.ffn_dim, a.norm_eps, dtype=cfg.dtype, rngs=rngs)
                   for _ in range(n)])


class Autoencoder(nnx.Module):
  """Encoder: K token embeddings → per-token blocks → squeeze K·d→d → chunk blocks → norm →
  Linear → (μ, log σ).

  Decoder: z → d → chunk blocks → expand d→K·d → per-token blocks → norm → logits against the
  (tied) input embedding. Each side splits its n layers in halves: first ⌊n/2⌋, then the rest.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    a, K, L, dt = cfg.autoencoder, cfg.chunk_size, cfg.latent_dim, cfg.dtype
    d = a.hidden_dim
    self.chunk_size, self.latent_dim = K, L
    self.remat = cfg.remat
    self.embed = Embedding(cfg.vocab_size, d, dtype=dt, rngs=rngs)
    # blocks [0, split) act per token, [split, n) per chunk (encoder); mirrored in the decoder
    self.enc_split, self.dec_split = a.num_encoder_layers // 2, a.num_decoder_layers // 2
    self.enc_blocks = _blocks(a.num_encoder_layers, cfg, rngs)
    self.squeeze = Linear(K * d, d, ("chunk", "embed"), use_bias=True, dtype=dt, rngs=rngs)
    self.enc_norm = RMSNorm(d, a.norm_eps, rngs=rngs)
    self.to_latent = Linear(d, 2 * L, ("embed", "latent"), use_bias=True, dtype=dt, rngs=rngs)
    self.from_latent = Linear(L, d, ("latent", "embed"), use_bias=True, dtype=dt, rngs=rngs)
    self.dec_blocks = _blocks(a.num_decoder_layers, cfg, rngs)
    self.expand = Linear(d, K * d, ("embed", "chunk"), use_bias=True, dtype=dt, rngs=rngs)
    self.dec_norm = RMSNorm(d, a.norm_eps, rngs=rngs)

  def encode(self, ids_BSK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token chunks → (μ, log σ), each [B, S, L], float32."""
    run = lambda block, x: rows(remat(lambda block, x: block(x), self.remat)(block, rows(x)))
    x_BSKD = self.embed(ids_BSK)
    for block in self.enc_blocks[:self.enc_split]:
      x_BSKD = run(block, x_BSKD)
    x_BSD = self.squeeze(x_BSKD.reshape(*x_BSKD.shape[:-2], -1))
    for block in self.enc_blocks[self.enc_split:]:
      x_BSD = run(block, x_BSD)
    out_BS2L = self.to_latent(self.enc_norm(x_BSD)).astype(jnp.float32)
    return out_BS2L[..., :self.latent_dim], out_BS2L[..., self.latent_dim:]

  def decode_hidden(self, z_BSL: jax.Array) -> jax.Array:
    """Latents → final normalised hidden state per token [B, S, K, D]."""
    run = lambda block, x: rows(remat(lambda block, x: block(x), self.remat)(block, rows(x)))
    x_BSD = self.from_latent(z_BSL)
    for block in self.dec_blocks[:self.dec_split]:
      x_BSD = run(block, x_BSD)
    x_BSKD = self.expand(x_BSD).reshape(*x_BSD.shape[:-1], self.chunk_size, -1)
    for block in self.dec_blocks[self.dec_split:]:
      x_BSKD = run(block, x_BSKD)
    return self.dec_norm(x_BSKD)

  def decode(self, z_BSL: jax.Array) -> jax.Array:
    """Latents → token logits [B, S, K, V] (compute dtype)."""
    return self.embed.attend(self.decode_hidden(z_BSL))

  def decode_ids(self, z_BSL: jax.Array) -> jax.Array:
    """Latents → argmax token ids [B, S, K] int32 (the chunk a latent decodes to)."""
    return self.embed.attend_argmax(self.decode_hidden(z_BSL))

  def __call__(self, ids_BSK: jax.Array) -> jax.Array:
    """Deterministic reconstruction logits (decode of μ)."""
    mu_BSL, _ = self.encode(ids_BSK)
    return self.decode(mu_BSL)
