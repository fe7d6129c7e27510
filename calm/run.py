"""A run directory resolved into what inference and resuming need.

A run directory holds `config.yaml` and `checkpoints/`. Paths inside a run's `config.yaml` are
written relative to the run directory (`run_dir: .`), and the checkpoint metadata records them
absolute, so a run can be moved, copied to another machine or used from any working directory.
A relative path from a run's config is looked up, first hit wins: against the run directory,
against the working directory (runs written before paths were made portable), then the absolute
path recorded at training time. A `key=value` override on the command line always wins and is
taken relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import pathlib
from typing import Sequence

from flax import nnx

from calm import checkpoint, config, data, stages
from calm.config import Config
from calm.errors import ConfigError, DataError
from calm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
# Config fields holding local paths (a `tfds:` source is not a path).
PATH_FIELDS = ("train.autoencoder", "data.tokenizer", "data.train", "data.eval", "eval.data",
               "data.tfds_data_dir")
_SCHEMES = ("tfds:",)


# ----------------------------------------------------------------------------- portable paths


def _get(cfg: Config, dotted: str) -> str:
  obj = cfg
  for part in dotted.split("."):
    obj = getattr(obj, part)
  return obj


def _is_local(value: str) -> bool:
  return bool(value) and not value.startswith(_SCHEMES)


def _exists(path: str) -> bool:
  return bool(glob.glob(path)) if glob.has_magic(path) else os.path.exists(path)


def absolute_paths(cfg: Config) -> dict[str, str]:
  """{field: absolute path} of every local path field that is set (for checkpoint metadata)."""
  out = {"run_dir": os.path.abspath(cfg.run_dir)}
  for f in PATH_FIELDS:
    v = _get(cfg, f)
    if _is_local(v):
      out[f] = os.path.abspath(v)
  return out


def portable(cfg: Config) -> Config:
  """`cfg` with `run_dir: .` and every local path relative to the run directory."""
  root = os.path.abspath(cfg.run_dir)
  changes = {f: os.path.relpath(os.path.abspath(_get(cfg, f)), root) for f in PATH_FIELDS
             if _is_local(_get(cfg, f))}
  return config.replace(cfg, run_dir=".", **changes)


def save_config(cfg: Config) -> pathlib.Path:
  """Writes the run's portable `config.yaml` into its run directory."""
  path = pathlib.Path(cfg.run_dir) / CONFIG_FILE
  config.dump(portable(cfg), path)
  return path


def _is_run_config(path: pathlib.Path, raw_run_dir: str | None) -> bool:
  return raw_run_dir in (".", "./") or (path.name == CONFIG_FILE and
                                        (path.parent / checkpoint.SUBDIR).is_dir())


def _recorded_paths(run_dir: pathlib.Path) -> dict[str, str]:
  """Absolute paths recorded in the latest checkpoint's metadata ({} if there is none)."""
  try:
    _, meta = checkpoint.read_metadata(run_dir)
  except Exception:  # noqa: BLE001 - no or unreadable checkpoint: nothing recorded
    return {}
  paths = dict(meta.get("paths") or {})
  if meta.get("autoencoder"):
    paths.setdefault("train.autoencoder", meta["autoencoder"])
  return paths


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
  """`config.load`, plus: a run's own config.yaml is resolved against the run directory."""
  cfg = config.load(path, overrides)
  path = pathlib.Path(path)
  given = {config.parse_override(o)[0] for o in overrides}
  raw_run_dir = config.read_yaml(path).get("run_dir")
  if not _is_run_config(path, raw_run_dir):
    return cfg
  run_dir = pathlib.Path(cfg.run_dir) if "run_dir" in given else path.parent
  recorded = _recorded_paths(run_dir)
  changes: dict[str, str] = {"run_dir": str(run_dir)}
  for f in PATH_FIELDS:
    v = _get(cfg, f)
    if f in given or not _is_local(v) or os.path.isabs(v):
      continue
    candidates = [str(run_dir / v), v, recorded.get(f, "")]
    found = next((c for c in candidates if c and _exists(c)), str(run_dir / v))
    changes[f] = os.path.normpath(os.path.abspath(found))
  return config.replace(cfg, **changes)


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
  loaded = load_model(ae_dir, mesh=mesh, expect_stage="autoencoder")
  checkpoint.check_compatible(loaded.config, cfg, keys=checkpoint.ARCH_KEYS["autoencoder"],
                              what=f"autoencoder {ae_dir}")
  return loaded


# ----------------------------------------------------------------------------- tokenizer


def _sample_texts(docs: Sequence[str], max_bytes: int) -> list[str]:
  """An evenly strided sample of documents totalling at most ~max_bytes characters."""
  total = sum(len(d) for d in docs)
  stride = max(1, -(-total // max(1, max_bytes)))
  out, n = [], 0
  for d in docs[::stride]:
    if n + len(d) > max_bytes:
      if not out:
        out.append(d[:max_bytes])
      break
    out.append(d)
    n += len(d)
  return out


def get_tokenizer(cfg: Config, run_dir: str | os.PathLike, *, ae_dir: str | os.PathLike | None = None,
                  train_if_missing: bool = True) -> Tokenizer:
  """`data.tokenizer`, else the autoencoder run's tokenizer.json, else the run's own, else (when
  training) a BPE trained on the training data and saved into the run directory."""
  local = pathlib.Path(run_dir) / "tokenizer.json"
  ae_tok = pathlib.Path(ae_dir) / "tokenizer.json" if ae_dir else None
  if cfg.data.tokenizer:
    tok, where = load_tokenizer(cfg.data.tokenizer), cfg.data.tokenizer
  elif ae_tok is not None and ae_tok.is_file():
    tok, where = load_tokenizer(ae_tok), str(ae_tok)
  elif local.is_file():
    tok, where = load_tokenizer(local), str(local)
  elif not train_if_missing:
    raise DataError(f"no tokenizer: {local} does not exist and data.tokenizer is not set")
  else:
    docs = data.read_documents(cfg.data.train, cfg.data)
    sample = _sample_texts(docs, cfg.data.tokenizer_train_bytes)
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
