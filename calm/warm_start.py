"""Warm start: a new CALM model's token embedding and decoder (layers + final norm) copied from a
trained Llama-style model, an AR run of this project or `calm-convert --llama`'s OUT/ar; the input
compression and the generative head keep their fresh initialisation.

`check` reads metadata only, so a mismatch is refused before anything is loaded or written;
`apply` copies the weights into the new model's parameters, in their shardings.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax

from calm import checkpoint, config, pytree, stages
from calm.config import Config
from calm.errors import CalmError, ConfigError

KEY = "train.init_backbone"
SOURCE_STAGES = ("ar",)
# Config keys the source's backbone must share with the CALM model (shapes, RoPE, norms).
BACKBONE_KEYS = ("model.vocab_size", "model.backbone.hidden_dim", "model.backbone.num_layers",
                 "model.backbone.num_heads", "model.backbone.num_kv_heads",
                 "model.backbone.ffn_dim", "model.backbone.rope_theta",
                 "model.backbone.norm_eps")


def check(cfg: Config, ae_dir: str | pathlib.Path | None = None) -> tuple[int, dict]:
  """(step, metadata) of the source named by `train.init_backbone`, after checking its stage,
  backbone sizes and vocabulary against `cfg` (and the tokenizer fingerprint against the
  autoencoder in `ae_dir`, when both record one); a one-line ConfigError otherwise."""
  src = pathlib.Path(cfg.train.init_backbone)
  if not checkpoint.has_checkpoint(src):
    raise ConfigError(f"{KEY}: {src} is not a run directory with a checkpoint (give an AR run "
                      f"of this project or the ar/ directory calm-convert --llama writes)")
  try:
    step, meta = checkpoint.read_metadata(src)
  except CalmError as e:
    raise ConfigError(f"{KEY}: {e}") from None
  if meta.get("stage") not in SOURCE_STAGES:
    raise ConfigError(f"{KEY}: {src} holds a {meta.get('stage')!r} checkpoint; the backbone "
                      f"comes from an AR run (stage ar, or calm-convert --llama's ar/)")
  theirs = pytree.flatten_dict(meta.get("config") or {})
  ours = pytree.flatten_dict(config.to_dict(cfg))
  for k in BACKBONE_KEYS:
    a, b = theirs.get(k, "<missing>"), ours.get(k)
    if a != b:
      whose = "the autoencoder's and this CALM model's" if k == "model.vocab_size" else (
          "this CALM model's")
      raise ConfigError(f"{KEY}: {k} is {a} in {src} but {b} in {whose} config; the copied "
                        f"backbone must have the same size")
  if ae_dir is not None and checkpoint.has_checkpoint(ae_dir):
    want = checkpoint.read_metadata(ae_dir)[1].get("tokenizer_fingerprint")
    got = meta.get("tokenizer_fingerprint")
    if want and got and want != got:
      raise ConfigError(f"{KEY}: {src} was trained with another tokenizer (fingerprint "
                        f"{got[:12]}) than the autoencoder {ae_dir} ({want[:12]}); its token "
                        f"embedding would index other tokens")
  return step, meta


def apply(cfg: Config, params: Any, mesh, ae_dir: str | pathlib.Path | None = None
          ) -> tuple[Any, dict]:
  """`params` (a fresh CALM state) with the source's backbone parts copied in → (new params, the
  source record stored in the checkpoint metadata: path, step, fingerprint, stage)."""
  from calm import run

  step, meta = check(cfg, ae_dir)
  src = pathlib.Path(cfg.train.init_backbone).absolute()
  loaded = run.load_model(src, step=step, mesh=mesh, expect_stage=meta["stage"])
  parts = set(stages.get(cfg.stage).backbone_parts) & set(
      stages.get(meta["stage"]).backbone_parts)
  source = {path: pytree.value(leaf) for path, leaf in pytree.flatten(loaded.params)[0]
            if path[0] in parts}
  flat, treedef = pytree.flatten(params)
  leaves, copied, size = [], set(), 0
  for path, leaf in flat:
    if path[0] in parts:
      new = source.get(path)
      old = pytree.value(leaf)
      name = ".".join(path)
      if new is None or new.shape != old.shape or new.dtype != old.dtype:
        got = "missing" if new is None else f"{new.dtype}{list(new.shape)}"
        raise ConfigError(f"{KEY}: parameter {name} is {got} in {src} but "
                          f"{old.dtype}{list(old.shape)} in the CALM model")
      leaf = leaf.replace(jax.device_put(new, old.sharding)) if pytree.is_variable(leaf) else (
          jax.device_put(new, old.sharding))
      copied.add(path)
      size += new.size
    leaves.append(leaf)
  unused = sorted(".".join(p) for p in set(source) - copied)
  if unused:
    raise ConfigError(f"{KEY}: {src} has {len(unused)} backbone arrays the CALM model lacks "
                      f"({unused[0]}, ...)")
  _, fp = checkpoint.fingerprint(src, step)
  record = {"path": str(src), "step": step, "fingerprint": fp, "stage": meta["stage"],
            "parts": sorted(parts), "parameters": int(size)}
  if meta.get("converted_from"):
    record["converted_from"] = meta["converted_from"]
  if meta.get("tokenizer_fingerprint"):
    record["tokenizer_fingerprint"] = meta["tokenizer_fingerprint"]
  return jax.tree.unflatten(treedef, leaves), record
