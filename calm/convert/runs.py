"""Converted weights → calm-jax run directories, and a run → the official layout (export)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from calm import config as config_lib, paths, pytree
from calm.config import Config
from calm.convert.hf_config import (build_config, config_fields, merge_fields, read_config_json,
                                    reference_config)
from calm.convert.names import (embedded_autoencoder, from_params, normalize, short_list, to_params,
                                values_match)
from calm.convert.weights import read_weights
from calm.errors import CalmError, CheckpointError, ConfigError


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ----------------------------------------------------------------------------- writing runs


def _copy_tokenizer(srcs: Sequence[pathlib.Path], dst: pathlib.Path) -> str:
  """Copies the tokenizer files of the first source that has a tokenizer.json → its new path."""
  for src in srcs:
    src = src if src.is_dir() else src.parent
    if (src / "tokenizer.json").is_file():
      for name in TOKENIZER_FILES:
        if (src / name).is_file():
          shutil.copyfile(src / name, dst / name)
      return str(dst / "tokenizer.json")
  return ""


def write_run(run_dir: str | pathlib.Path, cfg: Config, params: Mapping[str, np.ndarray], *,
              source: str = "") -> pathlib.Path:
  """Writes a step-0 checkpoint of `params` ({dotted path: array}) and config.yaml."""
  from calm import checkpoint, paths

  run_dir = pathlib.Path(run_dir).absolute()
  ckpt_dir = run_dir / checkpoint.SUBDIR
  if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
    raise CheckpointError(f"{run_dir} already holds checkpoints; choose another --out")
  run_dir.mkdir(parents=True, exist_ok=True)
  cfg = config_lib.replace(cfg, run_dir=str(run_dir))
  paths.save_config(cfg)
  meta = {"stage": cfg.stage, "config": config_lib.to_dict(cfg),
          "paths": paths.absolute_paths(cfg), "autoencoder": cfg.train.autoencoder,
          "converted_from": source}
  with checkpoint.Checkpointer(run_dir, cfg.checkpoint, metadata=meta) as ckpt:
    ckpt.save_now(0, params=pytree.nest((tuple(k.split(".")), v) for k, v in params.items()))
  return run_dir


# ----------------------------------------------------------------------------- conversion


def _find_tokenizer(srcs: Sequence[pathlib.Path]) -> pathlib.Path | None:
  for src in srcs:
    src = src if src.is_dir() else src.parent
    if (src / "tokenizer.json").is_file():
      return src
  return None


def _prepare(stage: str, src: pathlib.Path, run_dir: pathlib.Path, fields: Mapping[str, Any],
             weights: Mapping[str, np.ndarray], *, autoencoder: str = "",
             tokenizer_srcs: Sequence[pathlib.Path] = ()) -> tuple:
  """Checks one stage completely, writing nothing → (stage, src, run_dir, cfg, params, tok)."""
  from calm import checkpoint

  run_dir = run_dir.absolute()
  ckpt_dir = run_dir / checkpoint.SUBDIR
  if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
    raise CheckpointError(f"{run_dir} already holds checkpoints; choose another --out")
  tok = _find_tokenizer(tokenizer_srcs or [src])
  try:
    cfg = build_config(stage, fields, run_dir, autoencoder=autoencoder,
                       tokenizer=str(run_dir / "tokenizer.json") if tok else "")
  except ConfigError as e:
    raise ConfigError(f"{src / 'config.json'} gives an invalid model: {e}") from None
  where = str(src)
  params = to_params(normalize(weights, stage, cfg.model, where=where), stage, cfg.model,
                     where=where)
  return stage, src, run_dir, cfg, params, tok


def convert(out: str | pathlib.Path, *, ae: str | pathlib.Path | None = None,
            calm: str | pathlib.Path | None = None, llama: str | pathlib.Path | None = None,
            ignore_fields: Iterable[str] = ()) -> dict[str, pathlib.Path]:
  """Converts reference checkpoints into run directories under `out` → {stage: run_dir}.

  `calm` needs `ae` (the autoencoder it was trained with); if the CALM checkpoint embeds
  `ae_model.*` tensors they must match `ae`'s (up to bfloat16 rounding). Every source is read and
  checked before anything is written.
  """
  if calm is not None and ae is None:
    raise CalmError("--calm needs --ae: the autoencoder the CALM model was trained with")
  if ae is None and llama is None:
    raise CalmError("nothing to convert: give --ae [--calm] and/or --llama")
  out = pathlib.Path(out).absolute()
  if out.exists() and not out.is_dir():
    raise CalmError(f"--out {out}: exists and is not a directory")
  ignore = tuple(ignore_fields)
  jobs = []
  if ae is not None:
    ae = pathlib.Path(ae)
    ae_where = str(ae / "config.json")
    ae_fields = config_fields(read_config_json(ae), "autoencoder", where=ae_where, ignore=ignore)
    ae_weights = read_weights(ae)
    jobs.append(_prepare("autoencoder", ae, out / "autoencoder", ae_fields, ae_weights,
                         tokenizer_srcs=[ae, *([pathlib.Path(calm)] if calm else [])]))
    if calm is not None:
      calm = pathlib.Path(calm)
      calm_where = str(calm / "config.json")
      fields = merge_fields(ae_fields, config_fields(read_config_json(calm), "calm",
                                                     where=calm_where, ignore=ignore),
                            ae_where, calm_where)
      calm_weights = read_weights(calm)
      _check_embedded(calm_weights, ae_weights, calm, ae)
      jobs.append(_prepare("calm", calm, out / "calm", fields, calm_weights,
                           autoencoder=str(out / "autoencoder"), tokenizer_srcs=[calm, ae]))
  if llama is not None:
    llama = pathlib.Path(llama)
    fields = config_fields(read_config_json(llama), "ar", where=str(llama / "config.json"),
                           ignore=ignore)
    jobs.append(_prepare("ar", llama, out / "ar", fields, read_weights(llama)))
  runs: dict[str, pathlib.Path] = {}
  for stage, src, run_dir, cfg, params, tok in jobs:  # the autoencoder first: CALM records it
    run_dir.mkdir(parents=True, exist_ok=True)
    if tok is not None:
      _copy_tokenizer([tok], run_dir)
    runs[stage] = write_run(run_dir, cfg, params, source=str(src.absolute()))
  return runs


def _check_embedded(calm_weights: Mapping[str, np.ndarray], ae_weights: Mapping[str, np.ndarray],
                    calm: pathlib.Path, ae: pathlib.Path) -> None:
  inner = embedded_autoencoder(calm_weights)
  if not inner:
    return
  theirs = normalize(inner, "autoencoder", where=str(calm))
  ours = normalize(ae_weights, "autoencoder", where=str(ae))
  differ = [k for k in theirs if k not in ours or not values_match(theirs[k], ours[k], rtol=1e-2)]
  if differ:
    raise CheckpointError(f"{calm} embeds an autoencoder that differs from {ae} "
                          f"({short_list(differ, 3)}); pass the autoencoder it was trained with")


# ----------------------------------------------------------------------------- export


WEIGHT_FILES = ("model.safetensors", "model.npz")


def export_reference(run_dir: str | pathlib.Path, out_dir: str | pathlib.Path,
                     format: str = "safetensors", *, step: int | None = None,
                     force: bool = False) -> pathlib.Path:
  """Our checkpoint → a reference-layout directory: config.json + model.safetensors / model.npz
  (+ the run's tokenizer files).

  `out_dir` must be new or empty unless `force`, which replaces an export there (and removes the
  other format's weights and tokenizer files the run does not have, so nothing stale is read).
  Everything is checked and computed before the first file is written; each file is written
  under a temporary name and renamed.
  """
  import jax
  from flax import nnx

  from calm import run

  if format not in ("safetensors", "npz"):
    raise CalmError(f"format must be safetensors or npz, got {format!r}")
  out_dir = _export_dir(out_dir, force)
  loaded = run.load_model(run_dir, step=step)
  flat = {".".join(map(str, p)): np.asarray(jax.device_get(v[...]))
          for p, v in nnx.to_flat_state(loaded.params)}
  weights = from_params(flat, loaded.config.stage, loaded.config.model)
  tok = loaded.config.data.tokenizer
  tok_src = _find_tokenizer([*([pathlib.Path(tok).parent] if tok else []), loaded.run_dir])
  tok_files = [n for n in TOKENIZER_FILES if tok_src and (tok_src / n).is_file()]
  if tok_src is not None:  # the tokenizer shipped with the weights is the one they were trained on
    from calm.tokenizer import load_tokenizer

    run.check_tokenizer(load_tokenizer(tok_src / "tokenizer.json"), loaded.metadata,
                        f"the model in {run_dir}")
  config_json = json.dumps(reference_config(loaded.config), indent=2)

  out_dir.mkdir(parents=True, exist_ok=True)
  weights_name = f"model.{format}"
  written = {weights_name, "config.json", *tok_files}
  if format == "npz":
    def savez(path: pathlib.Path) -> None:
      with open(path, "wb") as f:  # a path would get ".npz" appended
        np.savez(f, **weights)

    _write_atomic(out_dir / weights_name, savez)
  else:
    from safetensors.numpy import save_file

    _write_atomic(out_dir / weights_name,
                  lambda t: save_file(weights, str(t), metadata={"format": "pt"}))
  for name in tok_files:
    _write_atomic(out_dir / name, lambda t, name=name: shutil.copyfile(tok_src / name, t))
  _write_atomic(out_dir / "config.json", lambda t: t.write_text(config_json))
  for name in (*WEIGHT_FILES, *TOKENIZER_FILES):  # a replaced export's other files
    if name not in written:
      (out_dir / name).unlink(missing_ok=True)
  return out_dir


def _export_dir(out_dir: str | pathlib.Path, force: bool) -> pathlib.Path:
  """--out of an export: a new or empty directory, or (with `force`) one to replace files in."""
  out = paths.output_dir(out_dir, "export into")
  if out.is_dir() and any(out.iterdir()) and not force:
    raise CalmError(f"--out {out} is not empty; choose another directory or pass --force to "
                    "replace the export there")
  return out


def _write_atomic(path: pathlib.Path, write) -> None:
  """Calls `write(temporary path)` beside `path`, then renames it to `path` with the mode a new
  file gets (0666 less the umask, whatever mode the writer chose)."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
