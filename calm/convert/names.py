"""State-dict name tables: official (PyTorch / Hugging Face) names ↔ calm-jax parameter paths,
and the checks that a set of weights is complete and well-shaped."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from calm.config import Config, ModelConfig
from calm.errors import CheckpointError




from calm.convert.tables import (Row, _layernorm, _linear, _merge_alias, _swiglu,  # noqa: F401
                                 adaln_table, ar_table, autoencoder_table, backbone_table,
                                 calm_table, values_match)


def table(stage: str, model_cfg: ModelConfig) -> list[Row]:
  """The name table of `stage` (see `calm.stages`)."""
  from calm import stages

  return stages.get(stage).name_table(model_cfg)


def _to_ours(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  return w.reshape(shape) if kind == "id" else w.T.reshape(shape)


def _to_ref(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "id":
    return x
  if kind == "heads_in":  # [D, n, h] → (n·h, D)
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_out":  # [n, h, D] → (D, n·h)
    return x.reshape(-1, x.shape[-1]).T
  return x.T


def _ref_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "id":
    return shape
  if kind == "heads_in":
    return (shape[1] * shape[2], shape[0])
  if kind == "heads_out":
    return (shape[2], shape[0] * shape[1])
  return shape[::-1]


def expected_params(stage: str, model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{dotted parameter path: shape} of a stage's model (built abstractly, nothing allocated)."""
  from flax import nnx

  from calm import stages

  cfg = Config(stage=stage, model=model_cfg)
  build = stages.get_stage(cfg).build
  abstract = nnx.state(nnx.eval_shape(lambda: build(model_cfg, nnx.Rngs(0))), nnx.Param)
  return {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(abstract)}


def expand(rows: Sequence[Row], params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
  """Instantiates `{i}` rows against the model's parameter paths → {ref name: (path, kind)}.

  Every parameter must be produced by exactly one row (checks the table itself)."""
  out: dict[str, tuple[str, str]] = {}
  covered: set[str] = set()
  for ref, ours, kind in rows:
    pattern = re.compile("^" + re.escape(ours).replace(r"\{i\}", r"(\d+)") + "$")
    for path in params:
      m = pattern.match(path)
      if m:
        out[ref.replace("{i}", m.group(1)) if m.groups() else ref] = (path, kind)
        covered.add(path)
  if covered != set(params):
    raise AssertionError(f"name table misses {sorted(set(params) - covered)}")
  return out


def short_list(names: Sequence[str], limit: int = 6) -> str:
  names = sorted(names)
  more = f", … {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def to_params(weights: Mapping[str, np.ndarray], stage: str, model_cfg: ModelConfig, *,
              where: str = "weights") -> dict[str, np.ndarray]:
  """Reference state_dict (normalised by `normalize`) → {our parameter path: float32 array}.

  Missing and unexpected tensors and shape mismatches are reported together in one CalmError.
  """
  params = expected_params(stage, model_cfg)
  names = expand(table(stage, model_cfg), params)
  missing = [n for n in names if n not in weights]
  extra = [n for n in weights if n not in names]
  wrong = []
  for n, (path, kind) in names.items():
    if n in weights:
      want = _ref_shape(kind, params[path])
      got = tuple(np.shape(weights[n]))
      if got != want:
        wrong.append(f"{n} {got} (expected {want})")
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} tensor(s): {short_list(missing)}")
  if extra:
    problems.append(f"{len(extra)} unexpected tensor(s): {short_list(extra)}")
  if wrong:
    problems.append(f"wrong shape: {short_list(wrong, 4)}")
  if problems:
    raise CheckpointError(f"{where}: {'; '.join(problems)}")
  return {path: np.ascontiguousarray(_to_ours(kind, np.asarray(weights[n], np.float32),
                                              params[path]))
          for n, (path, kind) in names.items()}


def from_params(flat: Mapping[str, np.ndarray], stage: str,
                model_cfg: ModelConfig) -> dict[str, np.ndarray]:
  """{our parameter path: array} → reference state_dict (torch layouts, float32).

  The autoencoder's tied embedding is written under both of its reference names
  (`encoder.embed_tokens.weight`, `decoder.lm_head_weight`), as the reference's own state_dict
  holds it: its loader fills each parameter by name only.
  """
  from calm import stages

  names = expand(table(stage, model_cfg), {k: np.shape(v) for k, v in flat.items()})
  out = {n: np.ascontiguousarray(_to_ref(kind, np.asarray(flat[path], np.float32)))
         for n, (path, kind) in names.items()}
  return stages.get(stage).with_reference_aliases(out)


# ----------------------------------------------------------------------------- state_dict aliases


def normalize(weights: Mapping[str, np.ndarray], stage: str, model_cfg: ModelConfig | None = None,
              *, where: str = "weights") -> dict[str, np.ndarray]:
  """Maps the name variants of the reference onto the names of `table(stage)` (each stage's
  `normalize_reference` says which: prefixes, tied aliases, buffers)."""
  from calm import stages

  return stages.get(stage).normalize_reference(dict(weights), model_cfg, where)


def embedded_autoencoder(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The `ae_model.*` tensors a CALM state_dict may carry (prefix removed)."""
  return {k[len("ae_model."):]: v for k, v in weights.items() if k.startswith("ae_model.")}
