"""Multiply-accumulates of the model's parts, the pieces of every stage's FLOPs count
(`calm.stages`, `metrics.model_flops_per_token`)."""

from __future__ import annotations

from calm.config import ModelConfig


def backbone_macs_per_position(cfg: ModelConfig, context: float) -> float:
  """Multiply-accumulates of one position through the backbone with `context` keys attended."""
  b = cfg.backbone
  attn_proj = b.hidden_dim * (b.num_heads + 2 * b.num_kv_heads) * b.head_dim
  attn_proj += b.num_heads * b.head_dim * b.hidden_dim
  scores = 2 * context * b.num_heads * b.head_dim  # QKᵀ and AV
  return b.num_layers * (attn_proj + scores + 3 * b.hidden_dim * b.ffn_dim)


def ae_macs_per_chunk(cfg: ModelConfig) -> tuple[float, float]:
  """(encoder, decoder) multiply-accumulates for one chunk, logits included in the decoder."""
  a, K, L = cfg.autoencoder, cfg.chunk_size, cfg.latent_dim
  d, block = a.hidden_dim, 3 * a.hidden_dim * a.ffn_dim
  e1, d1 = a.num_encoder_layers // 2, a.num_decoder_layers // 2
  enc = (K * e1 + (a.num_encoder_layers - e1)) * block + K * d * d + d * 2 * L
  dec = L * d + (d1 + K * (a.num_decoder_layers - d1)) * block + d * K * d + K * d * cfg.vocab_size
  return enc, dec
