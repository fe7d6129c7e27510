"""Portable run directories.

A run directory holds `config.yaml` and `checkpoints/`. Paths inside a run's `config.yaml` are
written relative to the run directory (`run_dir: .`), and the checkpoint metadata records them
absolute, so a run can be moved, copied to another machine or used from any working directory.
A relative path from a run's config is looked up, first hit wins: against the run directory,
against the working directory (runs written before paths were made portable), then the absolute
path recorded at training time. A `key=value` override on the command line always wins and is
taken relative to the working directory. Light: no jax import.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
from typing import Sequence

from calm import config
from calm.config import Config
from calm.errors import ConfigError

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"  # = calm.checkpoint.SUBDIR
# Config fields holding local paths. A `tfds:NAME` source is not a path; `prepared:DIR` is a path
# behind a prefix.
PATH_FIELDS = ("train.autoencoder", "train.init_backbone", "data.tokenizer", "data.train", "data.eval", "eval.data",
               "data.tfds_data_dir")
_NOT_PATHS = ("tfds:",)
_PREFIXES = ("prepared:",)


# ----------------------------------------------------------------------------- portable paths


def _get(cfg: Config, dotted: str) -> str:
  obj = cfg
  for part in dotted.split("."):
    obj = getattr(obj, part)
  return obj


def _split(value: str) -> tuple[str, str] | None:
  """(prefix, path) of a local path value, None for an empty or non-path value."""
  if not value or value.startswith(_NOT_PATHS):
    return None
  for pre in _PREFIXES:
    if value.startswith(pre):
      return pre, value[len(pre):]
  return "", value


def _map(value: str, fn) -> str:
  """`value` with `fn` applied to its path part (prefix kept)."""
  pre, path = _split(value)
  return pre + fn(path)


def _exists(path: str) -> bool:
  return bool(glob.glob(path)) if glob.has_magic(path) else os.path.exists(path)


def absolute_paths(cfg: Config) -> dict[str, str]:
  """{field: absolute path} of every local path field that is set (for checkpoint metadata)."""
  out = {"run_dir": os.path.abspath(cfg.run_dir)}
  for f in PATH_FIELDS:
    v = _get(cfg, f)
    if _split(v):
      out[f] = _map(v, os.path.abspath)
  return out


def portable(cfg: Config) -> Config:
  """`cfg` with `run_dir: .` and every local path relative to the run directory."""
  root = os.path.abspath(cfg.run_dir)
  rel = lambda path: os.path.relpath(os.path.abspath(path), root)
  changes = {f: _map(_get(cfg, f), rel) for f in PATH_FIELDS if _split(_get(cfg, f))}
  return config.replace(cfg, run_dir=".", **changes)


def save_config(cfg: Config) -> pathlib.Path:
  """Writes the run's portable `config.yaml` into its run directory."""
  path = pathlib.Path(cfg.run_dir) / CONFIG_FILE
  config.dump(portable(cfg), path)
  return path


def _is_run_config(path: pathlib.Path, raw_run_dir: str | None) -> bool:
  return raw_run_dir in (".", "./") or (path.name == CONFIG_FILE and
                                        (path.parent / CHECKPOINTS).is_dir())


def _recorded_paths(run_dir: pathlib.Path) -> dict[str, str]:
  """Absolute paths recorded in the latest checkpoint's metadata ({} if there is none)."""
  files = glob.glob(str(run_dir / CHECKPOINTS / "*" / "metadata" / "metadata"))
  steps = sorted((int(pathlib.Path(f).parts[-3]), f) for f in files
                 if pathlib.Path(f).parts[-3].isdigit())
  try:
    meta = json.loads(pathlib.Path(steps[-1][1]).read_text()) if steps else {}
  except (OSError, ValueError):
    return {}
  paths = dict(meta.get("paths") or {})
  if meta.get("autoencoder"):
    paths.setdefault("train.autoencoder", meta["autoencoder"])
  return paths


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
  """`config.load` (None: the defaults), plus: a run's own config.yaml is resolved against the
  run directory."""
  cfg = config.load(path, overrides)
  if path is None:
    return cfg
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
    if f in given or not _split(v) or os.path.isabs(_split(v)[1]):
      continue
    pre, rel = _split(v)
    recorded_path = (_split(recorded.get(f, "")) or ("", ""))[1]
    candidates = [str(run_dir / rel), rel, recorded_path]
    found = next((c for c in candidates if c and _exists(c)), str(run_dir / rel))
    changes[f] = pre + os.path.normpath(os.path.abspath(found))
  return config.replace(cfg, **changes)


def output_dir(out: str | os.PathLike, what: str) -> pathlib.Path:
  """`--out` as a directory that exists or can be made (a ConfigError otherwise; nothing is
  made). `what`: the command's output, for the message ("prepare into")."""
  if not str(out).strip():
    raise ConfigError(f"--out: name the directory to {what}")
  root = pathlib.Path(out)
  if root.exists() and not root.is_dir():
    raise ConfigError(f"--out {root}: exists and is not a directory")
  for parent in root.absolute().parents:
    if parent.exists():
      if not parent.is_dir():
        raise ConfigError(f"--out {root}: {parent} is not a directory")
      break
  return root


def autoencoder_dir(cfg: Config, metadata: dict | None = None) -> pathlib.Path:
  """The autoencoder run a CALM config depends on: `train.autoencoder`, else the path recorded
  in the CALM checkpoint's metadata; a ConfigError if neither names a directory."""
  ae = cfg.train.autoencoder or (metadata or {}).get("autoencoder", "")
  if not ae:
    raise ConfigError("train.autoencoder: the calm stage needs the autoencoder's run directory")
  path = pathlib.Path(ae)
  if not path.is_dir():
    raise ConfigError(f"train.autoencoder: autoencoder run {path} not found; give its "
                      f"directory with train.autoencoder=DIR")
  return path
