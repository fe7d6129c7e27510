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

from calm import brier, stages
from calm.errors import CalmError, ConfigError
from calm.scoring import (NGRAMS, ar_block_scores, ar_positions, calm_block_scores,  # noqa: F401
                          decoded_brier)


GROUP_BUDGET_BYTES = 1 << 30  # V-sized float32 temporaries of one group of positions


def auto_group(kind: str, batch: int, vocab: int, chunk_size: int) -> int:
  """Positions per group so that one group's vocabulary-sized arrays stay within the budget
  (each stage says how many bytes one scored position needs)."""
  per_position = stages.get(kind).brier_bytes_per_position(batch, vocab, chunk_size)
  return max(1, GROUP_BUDGET_BYTES // per_position)


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
  ms = [nnx.merge(d, s) for d, s in zip(graphdefs, states)]
  return stages.get(kind).brier_scores(ms, ids_BT, key, chunk_size, group)


def score_documents(kind: str, models: tuple, docs: Sequence[np.ndarray], *, block_tokens: int,
                    chunk_size: int, batch_size: int, seed: int, pad_id: int,
                    group: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Per-position Brier-1..4 over documents → (brier [N, 4], document index [N]).

  kind: the stage ("calm" with models = (calm, ae), "ar" with models = (ar,)). group: positions
  scored at once (0 = automatic from a memory budget); the scores do not depend on it.
  """
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
            energy_if_enough: bool = False) -> dict:
  """The BrierLM report of a loaded CALM or AR run (`calm.run.Run`) on tokenised documents
  (each with its EOS): Brier-1..4, BrierLM with standard errors and a bootstrap interval over
  documents (`brier.summarize`), the protocol, and for heads with energy reference lines the
  held-out energy report on the documents' token stream. That report needs one training batch
  of blocks: fewer is a ConfigError, or with `energy_if_enough` the report is left out. Token
  ids outside the model's vocabulary are a DataError."""
  from calm import data

  rc = r.loaded.config
  for d in docs:
    data.check_token_ids(d, rc.model.vocab_size, source)
  tokens = np.concatenate(docs) if r.stage.energy_references(rc.model) else None
  if (tokens is not None and energy_if_enough
      and len(tokens) < rc.train.batch_size * rc.data.block_tokens):
    tokens = None
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
  if tokens is not None:
    summary["energy"] = energy_report(r.config, r.loaded, r.autoencoder.model, tokens, source)
  summary["protocol"] = {
      "stage": r.config.stage, "data": source, "block_tokens": eval_cfg.block_tokens,
      "chunk_size": K, "positions": r.stage.brier_positions(K),
      "scored_positions": summary["positions"], "documents": summary["documents"],
      "seed": eval_cfg.seed, "checkpoints": r.checkpoints, "precision": r.precision,
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
  keys = [rng.eval_row_keys(rc.seed, i, micro) for i in range(0, n, micro)]  # as training's
  ev = {"loss": float(np.mean([loss(params, ae_params, b, k) for b, k in zip(batches, keys)]))}
  refs = metrics.energy_references(ae_graphdef, ae_params, batches, keys, rc.model)
  return metrics.with_references(ev, refs)


def format_energy(e: dict[str, float]) -> str:
  score = (f"normalised score {e['norm_score']:.3f} (0 = context unused, 1 = oracle)"
           if "norm_score" in e else
           "normalised score n/a (the oracle is not clearly below the baseline on this data)")
  return (f"energy loss {e['loss']:.3f} (no-context baseline {e['baseline_loss']:.3f}, oracle "
          f"{e['oracle_loss']:.3f}): {score}")


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
                         "precision": r.precision, "seconds": round(time.time() - t0, 2)}
  return summary


def format_reconstruction(summary: dict) -> str:
  rows = [f"{'metric':<22}{'value':>10}"]
  rows += [f"{k:<22}{v:>10.5f}" for k, v in summary.items() if k != "protocol"]
  return "\n".join(rows)


if __name__ == "__main__":
  from calm.cli import evaluate as _entry

  sys.exit(_entry())
