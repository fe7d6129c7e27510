"""CALM: chunk compression → causal backbone → generative head (energy, flow or diffusion)."""

from __future__ import annotations

import jax
from flax import nnx

from calm import heads, losses
from calm.config import ModelConfig
from calm.models.layers import Embedding, LayerNorm, Linear
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
    setattr(self, f"{self.head_kind}_head", heads.get(self.head_kind)(cfg, rngs=rngs))

  @property
  def generator(self) -> nnx.Module:
    """The generative head (see `calm.heads`)."""
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

  def sample(self, h_BSD: jax.Array, key: jax.Array, num: int) -> jax.Array:
    """`num` head samples per position → z [num, B, S, L]."""
    return self.generator.sample(h_BSD, key, num)

  def draw(self, h_BD: jax.Array, key: jax.Array, num: int) -> jax.Array:
    """`num` head samples per row → z [B, num, L]; row b's randomness comes from its row key
    (`key[b]` for a batch of keys, fold_in(key, b) for one key), so a row's draws do not
    depend on the batch size."""
    return self.generator.draw(h_BD, losses.row_keys(key, h_BD.shape[0]), num)
