"""A run directory resolved into what inference and resuming need: its model, the frozen
autoencoder a CALM run depends on, and the tokenizer (see `calm.paths` for how a run's config
finds its files)."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Callable, Iterable, Sequence

from flax import nnx

from calm import checkpoint, data, shards, stages
from calm.config import Config
from calm.errors import ConfigError, DataError
from calm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- models


def load_model(run_dir: str | os.PathLike, *, step: int | None = None, mesh=None,
               expect_stage: str | None = None) -> checkpoint.Loaded:
  """The model of a run's checkpoint (default the latest step), rebuilt from its saved config."""
  return checkpoint.load_for_inference(run_dir, stages.build_model, step=step, mesh=mesh,
                                       expect_stage=expect_stage)


def autoencoder_dir(cfg: Config, metadata: dict | None = None) -> pathlib.Path:
  """The autoencoder run a CALM config depends on: `train.autoencoder`, else the path recorded
  in the CALM checkpoint's metadata."""
  ae = cfg.train.autoencoder or (metadata or {}).get("autoencoder", "")
  if not ae:
    raise ConfigError("train.autoencoder: the calm stage needs the autoencoder's run directory")
  return pathlib.Path(ae)


def frozen_autoencoder(cfg: Config, mesh=None, metadata: dict | None = None) -> checkpoint.Loaded:
  """The CALM stage's autoencoder, checked against `cfg.model` (K, vocab, latent, sizes)."""
  ae_dir = autoencoder_dir(cfg, metadata)
  if not ae_dir.is_dir():
    raise ConfigError(f"train.autoencoder: autoencoder run {ae_dir} not found; give its "
                      f"directory with train.autoencoder=DIR")
  loaded = load_model(ae_dir, mesh=mesh, expect_stage="autoencoder")
  checkpoint.check_compatible(loaded.config, cfg, keys=checkpoint.ARCH_KEYS["autoencoder"],
                              what=f"autoencoder {ae_dir}")
  return loaded


# ----------------------------------------------------------------------------- tokenizer


def _sample_texts(docs: Callable[[], Iterable[str]], max_bytes: int) -> list[str]:
  """An evenly strided sample of documents totalling at most ~max_bytes characters; two streamed
  passes over `docs()` (memory: the sample, not the corpus)."""
  total = sum(len(d) for d in docs())
  stride = max(1, -(-total // max(1, max_bytes)))
  out, n = [], 0
  for i, d in enumerate(docs()):
    if i % stride:
      continue
    if n + len(d) > max_bytes:
      if not out:
        out.append(d[:max_bytes])
      break
    out.append(d)
    n += len(d)
  return out


def get_tokenizer(cfg: Config, run_dir: str | os.PathLike, *, ae_dir: str | os.PathLike | None = None,
                  train_if_missing: bool = True) -> Tokenizer:
  """`data.tokenizer`, else the autoencoder run's tokenizer.json, else the run's own, else a
  prepared training source's, else (when training) a BPE trained on the training data and saved
  into the run directory."""
  local = pathlib.Path(run_dir) / "tokenizer.json"
  ae_tok = pathlib.Path(ae_dir) / "tokenizer.json" if ae_dir else None
  if cfg.data.tokenizer:
    tok, where = load_tokenizer(cfg.data.tokenizer), cfg.data.tokenizer
  elif ae_tok is not None and ae_tok.is_file():
    tok, where = load_tokenizer(ae_tok), str(ae_tok)
  elif local.is_file():
    tok, where = load_tokenizer(local), str(local)
  elif (prepared := shards.prepared_dir(cfg.data.train)) is not None:
    src = prepared / shards.TOKENIZER
    if not src.is_file():
      raise DataError(f"no tokenizer: {src} does not exist and data.tokenizer is not set")
    tok, where = load_tokenizer(src), str(src)
    if train_if_missing:  # a training run keeps its own copy, as for a trained one
      tok.save(local)
  elif not train_if_missing:
    raise DataError(f"no tokenizer: {local} does not exist and data.tokenizer is not set")
  else:
    sample = _sample_texts(lambda: data.iter_documents(cfg.data.train, cfg.data),
                           cfg.data.tokenizer_train_bytes)
    log.info("training a %d-token BPE on %d documents (%d characters)", cfg.model.vocab_size,
             len(sample), sum(map(len, sample)))
    tok, where = train_tokenizer(sample, cfg.model.vocab_size), str(local)
    tok.save(local)
  if tok.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"model.vocab_size: tokenizer {where} has {tok.vocab_size} tokens but "
                      f"model.vocab_size is {cfg.model.vocab_size}; set it to at least "
                      f"{tok.vocab_size}")
  return tok


# ----------------------------------------------------------------------------- a whole run


@dataclasses.dataclass
class Run:
  """A trained run ready for inference: its model, frozen autoencoder (CALM) and tokenizer."""

  config: Config
  loaded: checkpoint.Loaded
  autoencoder: checkpoint.Loaded | None
  tokenizer: Tokenizer

  @property
  def model(self) -> nnx.Module:
    return self.loaded.model

  @property
  def checkpoints(self) -> dict[str, str]:
    """{stage: "run_dir step N"} of the checkpoints in use (for reports)."""
    out = {self.config.stage: f"{self.loaded.run_dir} step {self.loaded.step}"}
    if self.autoencoder is not None:
      out["autoencoder"] = f"{self.autoencoder.run_dir} step {self.autoencoder.step}"
    return out


def load(cfg: Config, *, step: int | None = None, mesh=None,
         stages_allowed: Sequence[str] = ("autoencoder", "calm", "ar")) -> Run:
  """Loads the run `cfg.run_dir` (checkpoint step `step`, default the latest)."""
  if cfg.stage not in stages_allowed:
    raise ConfigError(f"stage: this command needs a {' or '.join(stages_allowed)} run, got "
                      f"{cfg.stage}")
  loaded = load_model(cfg.run_dir, step=step, mesh=mesh, expect_stage=cfg.stage)
  ae = ae_dir = None
  if cfg.stage == "calm":
    ae = frozen_autoencoder(cfg, mesh, loaded.metadata)
    ae_dir = ae.run_dir
  tok = get_tokenizer(cfg, cfg.run_dir, ae_dir=ae_dir, train_if_missing=False)
  return Run(config=cfg, loaded=loaded, autoencoder=ae, tokenizer=tok)
