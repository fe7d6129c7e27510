"""Brier-1..4 estimates at the scored positions of token blocks, for CALM (two samples per
position) and the AR baseline (exact probabilities): the per-stage cores of BrierLM
(`calm.evaluate` cuts documents into blocks and summarises)."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from calm import brier
from calm.models.transformer import BranchCache
from calm.sampling import decode_candidates

NGRAMS = brier.NGRAMS


def _groups(n: int, group: int) -> tuple[jax.Array, int]:
  """Position indices [n_groups, G] (the last group padded with n − 1) and G."""
  G = n if group <= 0 else min(group, n)
  n_groups = -(-n // G)
  return jnp.minimum(jnp.arange(n_groups * G).reshape(n_groups, G), n - 1), G


def _ungroup(x_ABC: jax.Array, n: int) -> jax.Array:
  """[n_groups, B, G, ...] → [B, n, ...] (padding dropped)."""
  x = jnp.moveaxis(x_ABC, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :n]


def _per_position_keys(key: jax.Array, pos_C: jax.Array) -> jax.Array:
  """One key per scored position, so draws do not depend on how positions are grouped."""
  return jax.vmap(lambda p: jax.random.fold_in(key, p))(pos_C)


# ----------------------------------------------------------------------------- CALM


def calm_block_scores(calm, ae, ids_BT: jax.Array, key: jax.Array, group: int = 0,
                      draw: Callable | None = None) -> tuple[jax.Array, jax.Array]:
  """Brier-1..4 estimates at chunk positions of token blocks → (brier_BP4, scored_BP).

  Position s reads chunks 0..s and is scored against the next 4 tokens (chunks s+1, …). Two
  samples per position from `draw(h_RD, key, n) → ids [R, n, K]` (default: head samples decoded
  by argmax). K ≥ 4: x1, x2 are the two samples; by default a sample's token is decoded only
  while it can still change an indicator (`decoded_brier`). K < 4 (m = ⌈4/K⌉ chunks): accuracy
  terms multiply match indicators of independent samples at positions s, …, s+m−1 on the TRUE
  prefix (expectation ∏ P(y-chunk | true prefix) = P(y[:n])); the collision term continues along
  sample 1's path from the shared prefix cache, drawing two samples per step (expectation
  Σ_u P(u)² over n-grams, as in the reference). P = S − m positions; `group` > 0 positions are
  drawn and continued at once (0 = all); results do not depend on it.
  """
  B, T = ids_BT.shape
  K = calm.chunk_size
  S = T // K
  m = -(-NGRAMS // K)
  P = S - m
  lazy = draw is None and m == 1
  if draw is None:
    draw = functools.partial(decode_candidates, calm, ae)
  chunks_BSK = ids_BT.reshape(B, S, K)
  cache = calm.init_cache(B, S - 1) if m > 1 else None
  h_BSD, cache = calm.hidden(chunks_BSK[:, :-1], cache=cache)
  ks, kc = jax.random.split(key)

  def draw_at(s_C, h_BCD, k, draw=draw):  # two draws for each of B rows at each position in s_C
    keys_C = _per_position_keys(k, s_C)
    return jnp.moveaxis(jax.vmap(lambda h, kk: draw(h, kk, 2))(jnp.moveaxis(h_BCD, 1, 0),
                                                                keys_C), 0, 1)

  s_AC, _ = _groups(S - 1, group)
  if lazy:
    hidden = lambda h, k, n: ae.decode_hidden(calm.draw(h, k, n))  # decode_candidates' states
    tile = max(1, ae.embed.argmax_tile_rows() // B)

    def score(s_C):
      hid_BC2KD = draw_at(s_C, h_BSD[:, s_C], ks, hidden)
      return decoded_brier(ae.embed, hid_BC2KD, chunks_BSK[:, s_C + 1], tile)

    return _ungroup(jax.lax.map(score, s_AC), P), jnp.ones((B, P), bool)

  x_BS2K = _ungroup(jax.lax.map(lambda s_C: draw_at(s_C, h_BSD[:, s_C], ks), s_AC), S - 1)
  y_BPT = jnp.stack([chunks_BSK[:, 1 + j:1 + j + P] for j in range(m)], axis=2).reshape(B, P, -1)
  x1_BPT = jnp.stack([x_BS2K[:, j:j + P, 0] for j in range(m)], axis=2).reshape(B, P, -1)
  x2_BPT = jnp.stack([x_BS2K[:, j:j + P, 1] for j in range(m)], axis=2).reshape(B, P, -1)
  if m == 1:
    return brier.brier_terms_from_samples(x1_BPT, x2_BPT, y_BPT), jnp.ones((B, P), bool)

  def cumeq(a, b):
    return jnp.cumprod((a[..., :NGRAMS] == b[..., :NGRAMS]).astype(jnp.float32), axis=-1)

  acc_BP4 = cumeq(x1_BPT, y_BPT) + cumeq(x2_BPT, y_BPT)

  def collide(s_C):  # branches (b, s) continue sample 1 after prefix chunks 0..s
    G = s_C.shape[0]
    c = BranchCache.create(cache, jnp.broadcast_to(s_C + 1, (B, G)), m - 1)
    a_list, b_list = [x_BS2K[:, s_C, 0]], [x_BS2K[:, s_C, 1]]
    for j in range(1, m):
      h_R1D, c = calm.hidden(a_list[-1].reshape(B * G, 1, K), cache=c)
      ab_BC2K = draw_at(s_C, h_R1D.reshape(B, G, -1), jax.random.fold_in(kc, j))
      a_list.append(ab_BC2K[:, :, 0])
      b_list.append(ab_BC2K[:, :, 1])
    return cumeq(jnp.concatenate(a_list, -1), jnp.concatenate(b_list, -1))

  s_AC, _ = _groups(P, group)
  coll_BP4 = _ungroup(jax.lax.map(collide, s_AC), P)
  return acc_BP4 - coll_BP4, jnp.ones((B, P), bool)


def decoded_brier(embed, hid_BC2KD: jax.Array, y_BCK: jax.Array, tile: int) -> jax.Array:
  """`brier.brier_terms_from_samples` of two samples given as decoder states [B, C, 2, K, D]
  (their tokens: argmax of `embed.attend`) against the truth y → [B, C, 4].

  Token j of a sample is decoded only while its first j tokens equal y's or the other sample's:
  otherwise no indicator can change. Each token's vocabulary product runs over just those rows
  (`attend_argmax_where`, `tile` rows per batch row and product), so the estimates equal the
  full decode's, ties included.
  """
  B, C, _, _, D = hid_BC2KD.shape
  on_y_BC2 = jnp.ones((B, C, 2), bool)  # prefix of sample i == y's
  on_x_BC = jnp.ones((B, C), bool)  # prefixes of the two samples equal
  out = []
  for j in range(NGRAMS):
    need_BR = (on_y_BC2 | on_x_BC[..., None]).reshape(B, 2 * C)
    ids_BR = embed.attend_argmax_where(hid_BC2KD[:, :, :, j].reshape(B, 2 * C, D), need_BR, tile)
    ids_BC2 = ids_BR.reshape(B, C, 2)
    on_y_BC2 &= ids_BC2 == y_BCK[:, :, None, j]
    on_x_BC &= ids_BC2[..., 0] == ids_BC2[..., 1]
    out.append(jnp.sum(on_y_BC2, -1, dtype=jnp.float32) - on_x_BC.astype(jnp.float32))
  return jnp.stack(out, -1)


# ----------------------------------------------------------------------------- AR baseline


def ar_positions(T: int, stride: int) -> np.ndarray:
  """Scored token positions p (predicting tokens p..p+3 from tokens < p) of a block."""
  return np.arange(stride, T - NGRAMS + 1, stride)


def ar_block_scores(model, ids_BT: jax.Array, key: jax.Array, stride: int,
                    group: int = 0) -> jax.Array:
  """Brier-1..4 at `ar_positions` (see `brier.brier_terms_from_logits`) → [B, P, 4].

  Sample 1's path (3 tokens) continues from the block's cache, shared by all branches (each
  keeps only its 3-token suffix). `group` > 0 positions are scored at once (0 = all), and every
  vocabulary-sized array is reduced as soon as it is made: memory is O(B·G·V), not O(B·P·V).
  """
  B, T = ids_BT.shape
  pos_P = jnp.asarray(ar_positions(T, stride))
  P = pos_P.shape[0]
  h_BTD, cache = model.hidden(ids_BT, cache=model.init_cache(B, T))
  p_AC, G = _groups(P, group)

  def log_softmax(h):
    return jax.nn.log_softmax(model.logits(h).astype(jnp.float32), axis=-1)

  # log p(ids[t+1] | ids[≤t]) at every t, G positions at a time
  next_BT = jnp.concatenate([ids_BT[:, 1:], ids_BT[:, :1]], axis=1)
  logp_next_TB = jax.lax.map(
      lambda a: jnp.take_along_axis(log_softmax(a[0]), a[1][:, None], axis=-1)[:, 0],
      (jnp.moveaxis(h_BTD, 1, 0), next_BT.T), batch_size=min(T, G))
  logp_y_BP4 = logp_next_TB.T[:, pos_P[:, None] - 1 + jnp.arange(NGRAMS)]

  def path(i_C):
    p_C = pos_P[i_C]
    logp_BCV = log_softmax(h_BTD[:, p_C - 1])
    c = BranchCache.create(cache, jnp.broadcast_to(p_C, (B, G)), NGRAMS - 1)
    lsq, lx = [], []
    for j in range(NGRAMS):
      lsq.append(jax.nn.logsumexp(2.0 * logp_BCV, axis=-1))
      if j == NGRAMS - 1:
        break
      V = logp_BCV.shape[-1]
      gumbel_CBV = jax.vmap(lambda k: jax.random.gumbel(k, (B, V)))(
          _per_position_keys(jax.random.fold_in(key, j), p_C))
      x_BC = jnp.argmax(logp_BCV + jnp.moveaxis(gumbel_CBV, 0, 1), axis=-1)
      lx.append(jnp.take_along_axis(logp_BCV, x_BC[..., None], axis=-1)[..., 0])
      h_R1D, c = model.hidden(x_BC.reshape(B * G, 1).astype(jnp.int32), cache=c)
      logp_BCV = log_softmax(h_R1D[:, 0]).reshape(B, G, V)
    return jnp.stack(lx, -1), jnp.stack(lsq, -1)

  lx_ABC3, lsq_ABC4 = jax.lax.map(path, p_AC)
  return brier.brier_terms_from_logprobs(logp_y_BP4, _ungroup(lx_ABC3, P),
                                         _ungroup(lsq_ABC4, P))
