"""Llama-style causal decoder (RoPE, RMSNorm, SwiGLU, grouped KV heads), functional KV cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from calm.config import BackboneConfig
from calm.models.attention import causal_attention, resolve
from calm.models.layers import (RMSNorm, SwiGLU, compute_dtype, default_init, param, remat,
                               rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys/values of every layer and the number of filled positions per row.

  A position's heads are stored side by side in one minor axis of kv_heads·head_dim (e.g. 768 =
  6·128), which a TPU tiles without padding; a compiled decode step then accesses fewer bytes
  than with separate [kv_heads, head_dim] axes (docs/quantization.md)."""

  k: jax.Array  # [layers, B, max_len, kv_heads·head_dim]
  v: jax.Array  # [layers, B, max_len, kv_heads·head_dim]
  length: jax.Array  # [B] int32

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BranchCache:
  """G branches per row that continue one shared prefix cache without copying it.

  Branch (b, g) (input row b·G + g) sees slots [0, prefix_len[b, g]) of row b of `prefix`, then
  its own suffix slots [0, length + t). Memory: the suffix only, [layers, B, G, S, kv·head_dim].
  """

  prefix: KVCache  # read only
  prefix_len: jax.Array  # [B, G] int32
  k: jax.Array  # [layers, B, G, S, kv_heads·head_dim]
  v: jax.Array
  length: jax.Array  # [] int32, suffix slots filled (the same for every branch)

  @staticmethod
  def create(prefix: KVCache, prefix_len_BC: jax.Array, suffix_len: int) -> BranchCache:
    L, B, _, kv_h = prefix.k.shape
    shape = (L, B, prefix_len_BC.shape[1], suffix_len, kv_h)
    z = jnp.zeros(shape, prefix.k.dtype)
    return BranchCache(prefix, prefix_len_BC.astype(jnp.int32), z, z, jnp.zeros((), jnp.int32))


def _branch_attention(q_BTHE, k_BTGE, v_BTGE, cache: BranchCache, layer: int):
  """Attention of branch rows over their shared prefix and own suffix → (out, suffix k, v)."""
  B, G = cache.prefix_len.shape
  t, n, h = q_BTHE.shape[1:]
  kv = k_BTGE.shape[2]
  dt = q_BTHE.dtype
  q = q_BTHE.reshape(B, G, t, kv, n // kv, h)
  start = (layer, 0, 0, cache.length, 0)
  k_all = jax.lax.dynamic_update_slice(
      cache.k, k_BTGE.reshape(1, B, G, t, kv * h).astype(cache.k.dtype), start)
  v_all = jax.lax.dynamic_update_slice(
      cache.v, v_BTGE.reshape(1, B, G, t, kv * h).astype(cache.v.dtype), start)
  m, s = cache.prefix.k.shape[2], k_all.shape[3]
  kp_BWGE, vp_BWGE = (c[layer].reshape(B, m, kv, h).astype(dt)
                      for c in (cache.prefix.k, cache.prefix.v))
  ks, vs = (c[layer].reshape(B, G, s, kv, h).astype(dt) for c in (k_all, v_all))
  prec = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if dt == jnp.bfloat16 else None
  scale = 1.0 / float(h) ** 0.5
  pre = jnp.einsum("bgtkrh,bmkh->bgkrtm", q, kp_BWGE, precision=prec,
                   preferred_element_type=jnp.float32) * scale
  suf = jnp.einsum("bgtkrh,bgskh->bgkrts", q, ks, precision=prec,
                   preferred_element_type=jnp.float32) * scale
  big_neg = jnp.finfo(jnp.float32).min
  pre_mask = jnp.arange(m)[None, None, :] < cache.prefix_len[:, :, None]  # [B, G, M]
  pre = jnp.where(pre_mask[:, :, None, None, None, :], pre, big_neg)
  suf_mask = jnp.arange(s)[None, :] <= cache.length + jnp.arange(t)[:, None]  # [t, S]
  suf = jnp.where(suf_mask, suf, big_neg)
  probs = jax.nn.softmax(jnp.concatenate([pre, suf], axis=-1), axis=-1).astype(dt)
  out = (jnp.einsum("bgkrtm,bmkh->bgtkrh", probs[..., :m], vp_BWGE)
         + jnp.einsum("bgkrts,bgskh->bgtkrh", probs[..., m:], vs))
  return out.reshape(B * G, t, n, h), k_all, v_all


def rope(x_BTHE: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, Hugging Face "rotate half" convention (dims i and i+H/2 paired)."""
  h = x_BTHE.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles_BTF)[..., None, :]
  sin = jnp.sin(angles_BTF)[..., None, :]
  x = x_BTHE.astype(jnp.float32)
  x1, x2 = x[..., :h // 2], x[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHE.dtype)


class Attention(nnx.Module):
  """Multi-head attention with grouped KV heads and RoPE; no biases."""

  def __init__(self, cfg: BackboneConfig, *, dtype: str, impl: str = "auto", rngs: nnx.Rngs):
    d, n, kv, h = cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q = param(rngs, default_init, (d, n, h), ("embed", "heads", "head_dim"))
    self.k = param(rngs, default_init, (d, kv, h), ("embed", "kv_heads", "head_dim"))
    self.v = param(rngs, default_init, (d, kv, h), ("embed", "kv_heads", "head_dim"))
    self.o = param(rngs, default_init, (n, h, d), ("heads", "head_dim", "embed"))
    self.theta = cfg.rope_theta
    self.dtype = compute_dtype(dtype)
    self.impl = impl  # model.attention; resolved against the backend when traced

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, kv_cache=None):
    """kv_cache: None (causal self-attention), (k, v, length_B, layer) with k, v the whole
    [layers, B, max_len, kv_heads·head_dim] buffers, or (BranchCache, layer); returns
    (y_BTD, updated (k, v) or None)."""
    dt = self.dtype
    x = x_BTD.astype(dt)
    q_BTHE = rope(jnp.einsum("btd,dnh->btnh", x, self.q[...].astype(dt)), positions_BT, self.theta)
    k_BTGE = rope(jnp.einsum("btd,dkh->btkh", x, self.k[...].astype(dt)), positions_BT, self.theta)
    v_BTGE = jnp.einsum("btd,dkh->btkh", x, self.v[...].astype(dt))
    if kv_cache is None:
      impl = resolve(self.impl, dt)
      out_BTHE = checkpoint_name(causal_attention(q_BTHE, k_BTGE, v_BTGE, impl),
                                 "attention")  # kept by model.remat=minimal
      new_cache = None
    elif isinstance(kv_cache[0], BranchCache):
      out_BTHE, k_all, v_all = _branch_attention(q_BTHE, k_BTGE, v_BTGE, *kv_cache)
      new_cache = (k_all, v_all)
    else:
      k_all, v_all, length_B, layer = kv_cache
      b, t, m = x.shape[0], x.shape[1], k_all.shape[2]
      slots_BT = length_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
      rows_B1 = jnp.arange(b)[:, None]
      merged = lambda x_BTGE: x_BTGE.reshape(b, t, -1).astype(k_all.dtype)  # heads side by side
      k_all = k_all.at[layer, rows_B1, slots_BT].set(merged(k_BTGE), mode="drop")
      v_all = v_all.at[layer, rows_B1, slots_BT].set(merged(v_BTGE), mode="drop")
      # the query in slot length + t sees slots 0 .. length + t
      mask_B1TW = (jnp.arange(m)[None, None, :] <= slots_BT[:, :, None])[:, None]
      heads = lambda c: c[layer].reshape(b, m, *k_BTGE.shape[2:]).astype(dt)
      out_BTHE = jax.nn.dot_product_attention(
          q_BTHE, heads(k_all), heads(v_all), mask=mask_B1TW)
      new_cache = (k_all, v_all)
    return jnp.einsum("btnh,nhd->btd", out_BTHE, self.o[...].astype(dt)), new_cache


class DecoderLayer(nnx.Module):
  """x + attn(norm(x)); x + mlp(norm(x))."""

  def __init__(self, cfg: BackboneConfig, *, dtype: str, attention: str = "auto",
               rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_dim, cfg.norm_eps, rngs=rngs)
    self.attn = Attention(cfg, dtype=dtype, impl=attention, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_dim, cfg.norm_eps, rngs=rngs)
    self.mlp = SwiGLU(cfg.hidden_dim, cfg.ffn_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x_BTD, positions_BT, kv_cache=None):
    a, new_cache = self.attn(self.attn_norm(x_BTD), positions_BT, kv_cache)
    x_BTD = x_BTD + a.astype(x_BTD.dtype)
    return x_BTD + self.mlp(self.mlp_norm(x_BTD)).astype(x_BTD.dtype), new_cache


class Transformer(nnx.Module):
  """Stack of decoder layers followed by the final RMSNorm (like HF `LlamaModel`)."""

  def __init__(self, cfg: BackboneConfig, *, dtype: str = "float32", remat: str = "none",
               scan: bool = False, attention: str = "auto", rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = compute_dtype(dtype)
    self.cache_dtype = self.dtype  # of `init_cache` (calm.quantize may lower it for inference)
    self.remat = remat  # model.remat, applied per layer in the cache-free (training) forward
    self.scan = scan  # model.scan_layers
    self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, attention=attention, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_dim, cfg.norm_eps, rngs=rngs)

  def init_cache(self, batch: int, max_len: int, dtype: str | jnp.dtype | None = None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` positions."""
    c = self.cfg
    shape = (c.num_layers, batch, max_len, c.num_kv_heads * c.head_dim)
    dt = compute_dtype(dtype) if dtype is not None else self.cache_dtype
    return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch,), jnp.int32))

  def _over_layers(self, fn, x_BTD: jax.Array, carry):
    """Threads (x, carry) through `fn(layer, x, i, carry)` for every layer i: unrolled, or as one
    lax.scan over the layers' stacked weights (compiled once, whatever the depth)."""
    if not self.scan:
      for i, layer in enumerate(self.layers):
        x_BTD, carry = fn(layer, x_BTD, i, carry)
      return x_BTD, carry
    graphdef = nnx.split(self.layers[0])[0]
    stacked = jax.tree.map(lambda *w: jnp.stack(w), *(nnx.state(l) for l in self.layers))

    def step(x_carry, xs):
      state, i = xs
      return fn(nnx.merge(graphdef, state), x_carry[0], i, x_carry[1]), None

    (x_BTD, carry), _ = jax.lax.scan(step, (x_BTD, carry),
                                     (stacked, jnp.arange(len(self.layers), dtype=jnp.int32)))
    return x_BTD, carry

  def __call__(self, x_BTD: jax.Array, *, positions_BT: jax.Array | None = None,
               cache: KVCache | BranchCache | None = None
               ) -> tuple[jax.Array, KVCache | BranchCache | None]:
    """Causal forward. With a cache, the T new positions are appended at `cache.length` (per row),
    attend to everything before them, and the returned cache has `length + T`. With a
    BranchCache the rows are its B·G branches, appended after their prefix and suffix."""
    b, t = x_BTD.shape[:2]
    if isinstance(cache, BranchCache):
      if positions_BT is None:
        start_R = (cache.prefix_len + cache.length).reshape(-1)
        positions_BT = start_R[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

      def branch(layer, x, i, kv):
        return layer(x, positions_BT, (dataclasses.replace(cache, k=kv[0], v=kv[1]), i))

      x_BTD, (k, v) = self._over_layers(branch, x_BTD.astype(self.dtype), (cache.k, cache.v))
      return self.norm(x_BTD), dataclasses.replace(cache, k=k, v=v, length=cache.length + t)
    if positions_BT is None:
      start_B = cache.length if cache is not None else jnp.zeros((b,), jnp.int32)
      positions_BT = start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    x_BTD = x_BTD.astype(self.dtype)
    if cache is None:
      run = remat(lambda layer, x, pos: layer(x, pos)[0], self.remat)
      x_BTD, _ = self._over_layers(
          lambda layer, x, i, _: (rows(run(layer, rows(x), positions_BT)), None), x_BTD, None)
      return self.norm(x_BTD), None

    def cached(layer, x, i, kv):
      return layer(x, positions_BT, (*kv, cache.length, i))

    x_BTD, (k, v) = self._over_layers(cached, x_BTD, (cache.k, cache.v))
    return self.norm(x_BTD), KVCache(k, v, cache.length + t)
