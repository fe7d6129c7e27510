"""Llama-style causal decoder (RoPE, RMSNorm, SwiGLU, grouped KV heads), functional KV cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from calm.config import BackboneConfig
from calm.models.layers import RMSNorm, SwiGLU, compute_dtype, default_init, param


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys/values of every layer and the number of filled positions per row."""

  k: jax.Array  # [layers, B, max_len, kv_heads, head_dim]
  v: jax.Array  # [layers, B, max_len, kv_heads, head_dim]
  length: jax.Array  # [B] int32

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, Hugging Face "rotate half" convention (dims i and i+H/2 paired)."""
  h = x_BTNH.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles_BTF)[..., None, :]
  sin = jnp.sin(angles_BTF)[..., None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = x[..., :h // 2], x[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


class Attention(nnx.Module):
  """Multi-head attention with grouped KV heads and RoPE; no biases."""

  def __init__(self, cfg: BackboneConfig, *, dtype: str, rngs: nnx.Rngs):
    d, n, kv, h = cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q = param(rngs, default_init, (d, n, h), ("embed", "heads", "head_dim"))
    self.k = param(rngs, default_init, (d, kv, h), ("embed", "kv_heads", "head_dim"))
    self.v = param(rngs, default_init, (d, kv, h), ("embed", "kv_heads", "head_dim"))
    self.o = param(rngs, default_init, (n, h, d), ("heads", "head_dim", "embed"))
    self.theta = cfg.rope_theta
    self.dtype = compute_dtype(dtype)

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, kv_cache=None):
    """kv_cache: None (causal self-attention) or (k, v, length_B, layer) with k, v the whole
    [layers, B, max_len, kv_heads, head_dim] buffers; returns (y_BTD, (k, v) or None)."""
    dt = self.dtype
    x = x_BTD.astype(dt)
    q_BTNH = rope(jnp.einsum("btd,dnh->btnh", x, self.q[...].astype(dt)), positions_BT, self.theta)
    k_BTKH = rope(jnp.einsum("btd,dkh->btkh", x, self.k[...].astype(dt)), positions_BT, self.theta)
    v_BTKH = jnp.einsum("btd,dkh->btkh", x, self.v[...].astype(dt))
    if kv_cache is None:
      out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True)
      new_cache = None
    else:
      k_all, v_all, length_B, layer = kv_cache
      b, t, m = x.shape[0], x.shape[1], k_all.shape[2]
      slots_BT = length_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
      rows_B1 = jnp.arange(b)[:, None]
      k_all = k_all.at[layer, rows_B1, slots_BT].set(k_BTKH.astype(k_all.dtype), mode="drop")
      v_all = v_all.at[layer, rows_B1, slots_BT].set(v_BTKH.astype(v_all.dtype), mode="drop")
      # the query in slot length + t sees slots 0 .. length + t
      mask_B1TM = (jnp.arange(m)[None, None, :] <= slots_BT[:, :, None])[:, None]
      out_BTNH = jax.nn.dot_product_attention(
          q_BTNH, k_all[layer].astype(dt), v_all[layer].astype(dt), mask=mask_B1TM)
      new_cache = (k_all, v_all)
    return jnp.einsum("btnh,nhd->btd", out_BTNH, self.o[...].astype(dt)), new_cache


class DecoderLayer(nnx.Module):
  """x + attn(norm(x)); x + mlp(norm(x))."""

  def __init__(self, cfg: BackboneConfig, *, dtype: str, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_dim, cfg.norm_eps, rngs=rngs)
    self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_dim, cfg.norm_eps, rngs=rngs)
    self.mlp = SwiGLU(cfg.hidden_dim, cfg.ffn_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x_BTD, positions_BT, kv_cache=None):
    a, new_cache = self.attn(self.attn_norm(x_BTD), positions_BT, kv_cache)
    x_BTD = x_BTD + a.astype(x_BTD.dtype)
    return x_BTD + self.mlp(self.mlp_norm(x_BTD)).astype(x_BTD.dtype), new_cache


class Transformer(nnx.Module):
  """Stack of decoder layers followed by the final RMSNorm (like HF `LlamaModel`)."""

  def __init__(self, cfg: BackboneConfig, *, dtype: str = "float32", rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = compute_dtype(dtype)
    self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_dim, cfg.norm_eps, rngs=rngs)

  def init_cache(self, batch: int, max_len: int, dtype: str | jnp.dtype | None = None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` positions."""
    c = self.cfg
    shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
    dt = compute_dtype(dtype) if dtype is not None else self.dtype
    return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch,), jnp.int32))

  def __call__(self, x_BTD: jax.Array, *, positions_BT: jax.Array | None = None,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Causal forward. With a cache, the T new positions are appended at `cache.length` (per row),
    attend to everything before them, and the returned cache has `length + T`."""
    b, t = x_BTD.shape[:2]
    if positions_BT is None:
      start_B = cache.length if cache is not None else jnp.zeros((b,), jnp.int32)
      positions_BT = start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    x_BTD = x_BTD.astype(self.dtype)
    if cache is None:
      for layer in self.layers:
        x_BTD, _ = layer(x_BTD, positions_BT)
      return self.norm(x_BTD), None
    k, v = cache.k, cache.v
    for i, layer in enumerate(self.layers):
      x_BTD, (k, v) = layer(x_BTD, positions_BT, (k, v, cache.length, i))
    return self.norm(x_BTD), KVCache(k, v, cache.length + t)
