"""Token-level autoregressive baseline (a Llama `LlamaForCausalLM`)."""

from __future__ import annotations

import jax
from flax import nnx

from calm.config import ModelConfig
from calm.models.layers import Embedding, Linear
from calm.models.transformer import KVCache, Transformer


class ARModel(nnx.Module):
  """Embedding → Transformer (with final RMSNorm) → LM head (untied unless tie_ar_embeddings)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.backbone.hidden_dim
    self.embed = Embedding(cfg.vocab_size, d, dtype=cfg.dtype, rngs=rngs)
    self.backbone = Transformer(cfg.backbone, dtype=cfg.dtype, remat=cfg.remat,
                                scan=cfg.scan_layers, attention=cfg.attention, rngs=rngs)
    self.lm_head = (None if cfg.tie_ar_embeddings else
                    Linear(d, cfg.vocab_size, ("embed", "vocab"), dtype=cfg.dtype, rngs=rngs))

  def init_cache(self, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
    return self.backbone.init_cache(batch, max_len, dtype)

  def __call__(self, ids_BT: jax.Array, *, positions_BT: jax.Array | None = None,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Next-token logits [B, T, V] (compute dtype) and the updated cache."""
    h_BTD, cache = self.hidden(ids_BT, positions_BT=positions_BT, cache=cache)
    return self.logits(h_BTD), cache

  def hidden(self, ids_BT: jax.Array, *, positions_BT: jax.Array | None = None,
             cache=None) -> tuple[jax.Array, KVCache | None]:
    """Final hidden states [B, T, D] (before the LM head) and the updated cache."""
    return self.backbone(self.embed(ids_BT), positions_BT=positions_BT, cache=cache)

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """LM head: hidden states → logits [..., V] (compute dtype)."""
    return self.embed.attend(h_BTD) if self.lm_head is None else self.lm_head(h_BTD)
