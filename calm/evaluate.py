"""BrierLM of a CALM or AR checkpoint on held-out documents (reconstruction for an autoencoder).

`calm-eval` (`calm.cli.evaluation`) and `calm.open(...).score` run it on a run directory.

Protocol: each document (its tokens + EOS) is cut into consecutive blocks of `eval.block_tokens`;
context restarts at every block. CALM is scored at every chunk position whose next 4 tokens lie in
the block; the AR baseline at every K-th token position (the same positions as a CALM with the
same K). Scores are means over scored positions; uncertainty treats documents as independent.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calm import brier
from calm.errors import CalmError, ConfigError
from calm.models.transformer import BranchCache
from calm.sampling import decode_candidates

NGRAMS = brier.NGRAMS


GROUP_BUDGET_BYTES = 1 << 30  # V-sized float32 temporaries of one group of positions


def auto_group(kind: str, batch: int, vocab: int, chunk_size: int) -> int:
  """Positions per group so that one group's vocabulary-sized arrays stay within the budget
  (each stage says how many bytes one scored position needs)."""
  from calm import stages

  per_position = stages.get(kind).brier_bytes_per_position(batch, vocab, chunk_size)
  return max(1, GROUP_BUDGET_BYTES // per_position)


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


# ----------------------------------------------------------------------------- documents


def document_blocks(docs: Sequence[np.ndarray], block_tokens: int, multiple: int,
                    pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cuts each document into blocks → (ids [N, block], real-token count [N], doc index [N]).

  A document's last block is truncated to a multiple of `multiple` and padded with `pad_id`.
  """
  blocks, lens, owners = [], [], []
  for d, doc in enumerate(docs):
    for start in range(0, len(doc), block_tokens):
      piece = np.asarray(doc[start:start + block_tokens], np.int32)
      piece = piece[:len(piece) - len(piece) % multiple]
      if len(piece) <= NGRAMS:
        continue
      out = np.full(block_tokens, pad_id, np.int32)
      out[:len(piece)] = piece
      blocks.append(out)
      lens.append(len(piece))
      owners.append(d)
  if not blocks:
    raise CalmError(f"no document has more than {NGRAMS} tokens to score")
  return np.stack(blocks), np.asarray(lens), np.asarray(owners)


@functools.partial(jax.jit, static_argnames=("kind", "graphdefs", "chunk_size", "group"))
def _score_batch(states, ids_BT, key, *, kind, graphdefs, chunk_size, group):
  """Brier-1..4 of one batch of blocks; compiled once per (models, shapes, group)."""
  from calm import stages

  ms = [nnx.merge(d, s) for d, s in zip(graphdefs, states)]
  return stages.get(kind).brier_scores(ms, ids_BT, key, chunk_size, group)


def score_documents(kind: str, models: tuple, docs: Sequence[np.ndarray], *, block_tokens: int,
                    chunk_size: int, batch_size: int, seed: int, pad_id: int,
                    group: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Per-position Brier-1..4 over documents → (brier [N, 4], document index [N]).

  kind: the stage ("calm" with models = (calm, ae), "ar" with models = (ar,)). group: positions
  scored at once (0 = automatic from a memory budget); the scores do not depend on it.
  """
  from calm import stages

  stage = stages.get(kind)
  if not stage.generates:
    raise ConfigError(f"stage must be calm or ar for BrierLM, got {kind!r}")
  ids, lens, owners = document_blocks(docs, block_tokens, chunk_size, pad_id)
  defs, states = zip(*(nnx.split(m) for m in models))
  K = chunk_size
  first_tok = stage.brier_first_tokens(block_tokens, K)
  if group <= 0:
    group = auto_group(kind, batch_size, models[-1].embed.table.shape[0], K)
  key = jax.random.key(seed)
  n = len(ids)
  out, doc_of = [], []

  def collect(i, scores):
    scores = np.asarray(scores)
    for r in range(min(batch_size, n - i)):
      valid = first_tok <= lens[i + r]
      out.append(scores[r][valid])
      doc_of.append(np.full(int(valid.sum()), owners[i + r]))

  pending = None  # read a batch back only after the next one is dispatched
  for i in range(0, n, batch_size):
    batch = np.zeros((batch_size, block_tokens), np.int32) + pad_id
    batch[:min(batch_size, n - i)] = ids[i:i + batch_size]
    scores = _score_batch(states, jnp.asarray(batch), jax.random.fold_in(key, i), kind=kind,
                          graphdefs=defs, chunk_size=K, group=group)
    if pending is not None:
      collect(*pending)
    pending = (i, scores)
  collect(*pending)
  return np.concatenate(out), np.concatenate(doc_of)


def brierlm(r, docs: Sequence[np.ndarray], eval_cfg, *, source: str,
            energy_tokens: np.ndarray | None = None) -> dict:
  """The BrierLM report of a loaded CALM or AR run (`calm.run.Run`) on tokenised documents
  (each with its EOS): Brier-1..4, BrierLM with standard errors and a bootstrap interval over
  documents (`brier.summarize`), the protocol, and for heads with energy reference lines the
  held-out energy report on `energy_tokens` (the documents' token stream)."""
  if eval_cfg.max_documents > 0:
    docs = docs[:eval_cfg.max_documents]
  K = r.loaded.config.model.chunk_size
  models = (r.model,) if r.autoencoder is None else (r.model, r.autoencoder.model)
  t0 = time.time()
  est, doc_ids = score_documents(r.config.stage, models, docs,
                                 block_tokens=eval_cfg.block_tokens, chunk_size=K,
                                 batch_size=eval_cfg.batch_size, seed=eval_cfg.seed,
                                 pad_id=r.tokenizer.pad_id, group=eval_cfg.group)
  summary = brier.summarize(est, doc_ids, seed=eval_cfg.seed)
  if energy_tokens is not None and r.stage.energy_references(r.loaded.config.model):
    summary["energy"] = energy_report(r.config, r.loaded, r.autoencoder.model, energy_tokens,
                                      source)
  summary["protocol"] = {
      "stage": r.config.stage, "data": source, "block_tokens": eval_cfg.block_tokens,
      "chunk_size": K, "positions": r.stage.brier_positions(K),
      "scored_positions": summary["positions"], "documents": summary["documents"],
      "seed": eval_cfg.seed, "checkpoints": r.checkpoints,
      "seconds": round(time.time() - t0, 2)}
  return summary


# ----------------------------------------------------------------------------- CLI


def format_table(summary: dict) -> str:
  rows = [f"{'metric':<10} {'value':>9} {'stderr':>9}"]
  for n in range(NGRAMS):
    rows.append(f"Brier-{n + 1:<4} {summary['brier'][n]:>9.4f} {summary['brier_se'][n]:>9.4f}")
  se, ci = summary["brierlm_se"], summary["brierlm_ci95"]
  rows.append(f"{'BrierLM':<10} {summary['brierlm']:>9.3f} "
              + (f"{se:>9.3f}" if se is not None else f"{'-':>9}")
              + (f"   95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None else ""))
  return "\n".join(rows)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size", "sigmas"))
def _ae_batch(params, ids_BT, key, *, graphdef, chunk_size, sigmas):
  from calm.stages.autoencoder import reconstruction

  return reconstruction(nnx.merge(graphdef, params), ids_BT, key, chunk_size, sigmas)


def energy_report(cfg, loaded, ae, tokens: np.ndarray, source: str) -> dict[str, float]:
  """Held-out CALM energy loss with its reference lines and normalised score, on the blocks the
  training evaluation uses (the first train.eval_batches × train.batch_size blocks of
  data.block_tokens tokens of the token stream `tokens` of `source`, same keys), so it matches
  the run's last eval line; raise train.eval_batches for a tighter estimate."""
  from calm import data, losses, metrics, rng

  rc = loaded.config
  bs, block = rc.train.batch_size, rc.data.block_tokens
  blocks = np.asarray(data.pack_blocks(tokens, block, what=f"eval source {source}"))
  n = min((len(blocks) // bs) * bs, cfg.train.eval_batches * bs)
  micro = rc.train.micro_batch  # evaluated one micro-batch at a time, as in training
  if n == 0:
    raise ConfigError(f"train.batch_size: {source} has {len(blocks)} blocks of {block} tokens, "
                      f"fewer than one batch of {bs}")
  graphdef, params = nnx.split(loaded.model)
  ae_graphdef, ae_params = nnx.split(ae)
  loss = jax.jit(lambda p, a, ids, key: losses.calm_loss(
      nnx.merge(graphdef, p), nnx.merge(ae_graphdef, a), ids, key, rc.model)[1]["loss"])
  batches = [jnp.asarray(blocks[i:i + micro]) for i in range(0, n, micro)]
  keys = [jax.random.fold_in(rng.stream(rc.seed, rng.EVAL), j) for j in range(len(batches))]
  ev = {"loss": float(np.mean([loss(params, ae_params, b, k) for b, k in zip(batches, keys)]))}
  refs = metrics.energy_references(ae_graphdef, ae_params, batches, keys, rc.model)
  return metrics.with_references(ev, refs)


def format_energy(e: dict[str, float]) -> str:
  return (f"energy loss {e['loss']:.3f} (no-context baseline {e['baseline_loss']:.3f}, oracle "
          f"{e['oracle_loss']:.3f}): normalised score {e['norm_score']:.3f} "
          f"(0 = context unused, 1 = oracle)")


def reconstruction_report(r, source: str, eval_cfg) -> dict:
  """Held-out reconstruction of a loaded autoencoder run (`calm.run.Run`): token accuracy, chunk
  exact match and CE from μ, token accuracy with Gaussian noise σ ∈ eval.noise_sigmas added to
  the latent, on blocks of eval.block_tokens of `source` (eval.max_documents caps the blocks)."""
  from calm import config, data

  loaded, tok, cfg = r.loaded, r.tokenizer, r.config
  block_cfg = config.replace(cfg, **{"data.block_tokens": eval_cfg.block_tokens})
  blocks = data.eval_blocks(block_cfg, tok, None, source)
  bs = eval_cfg.batch_size
  n = (len(blocks) // bs) * bs
  if eval_cfg.max_documents:  # here: a cap on blocks
    n = min(n, (eval_cfg.max_documents // bs) * bs or bs)
  if n == 0:
    raise ConfigError(f"eval.batch_size: {source} has {len(blocks)} blocks of "
                      f"{eval_cfg.block_tokens} tokens, fewer than one batch of {bs}")
  graphdef, params = nnx.split(loaded.model)
  K = loaded.config.model.chunk_size
  fn = functools.partial(_ae_batch, graphdef=graphdef, chunk_size=K,
                         sigmas=tuple(eval_cfg.noise_sigmas))
  t0 = time.time()
  rows = [jax.device_get(fn(params, jnp.asarray(blocks[i:i + bs]),
                            jax.random.fold_in(jax.random.PRNGKey(eval_cfg.seed), i)))
          for i in range(0, n, bs)]
  summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
  summary["protocol"] = {"stage": cfg.stage, "data": source,
                         "block_tokens": eval_cfg.block_tokens, "chunk_size": K,
                         "tokens": int(n * eval_cfg.block_tokens), "seed": eval_cfg.seed,
                         "checkpoint": f"{loaded.run_dir} step {loaded.step}",
                         "seconds": round(time.time() - t0, 2)}
  return summary


def format_reconstruction(summary: dict) -> str:
  rows = [f"{'metric':<22}{'value':>10}"]
  rows += [f"{k:<22}{v:>10.5f}" for k, v in summary.items() if k != "protocol"]
  return "\n".join(rows)


if __name__ == "__main__":
  from calm.cli import evaluate as _entry

  sys.exit(_entry())
