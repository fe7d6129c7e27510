"""State-dict name tables: official (PyTorch / Hugging Face) names ↔ calm-jax parameter paths,
and the checks that a set of weights is complete and well-shaped."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from calm.config import Config, ModelConfig
from calm.errors import CheckpointError




# ----------------------------------------------------------------------------- name tables
# Row: (reference name, our parameter path, kind); `{i}` stands for a layer index in both.
# Kinds: "id" (as is), "linear" (torch (out, in) ↔ our (in, out)), "heads_in" (q/k/v_proj
# (heads·head_dim, D) ↔ [D, heads, head_dim]), "heads_out" (o_proj (D, heads·head_dim) ↔
# [heads, head_dim, D]). Both sides use the Hugging Face "rotate half" RoPE layout, so q/k need
# no permutation.
Row = tuple[str, str, str]


def _linear(ref: str, ours: str, bias: bool = True) -> list[Row]:
  rows = [(f"{ref}.weight", f"{ours}.kernel", "linear")]
  return rows + [(f"{ref}.bias", f"{ours}.bias", "id")] if bias else rows


def _layernorm(ref: str, ours: str) -> list[Row]:
  return [(f"{ref}.weight", f"{ours}.scale", "id"), (f"{ref}.bias", f"{ours}.bias", "id")]


def _swiglu(ref: str, ours: str) -> list[Row]:
  return [r for p in ("gate", "up", "down") for r in _linear(f"{ref}.{p}_proj", f"{ours}.{p}",
                                                             bias=False)]


def autoencoder_table() -> list[Row]:
  """Reference autoencoder names (without `ae_model.`) → `Autoencoder`."""
  rows = [("encoder.embed_tokens.weight", "embed.table", "id"),
          ("encoder.encoder_layers.{i}.layernorm.weight", "enc_blocks.{i}.norm.scale", "id"),
          ("encoder.norm.weight", "enc_norm.scale", "id"),
          ("decoder.decoder_layers.{i}.layernorm.weight", "dec_blocks.{i}.norm.scale", "id"),
          ("decoder.norm.weight", "dec_norm.scale", "id")]
  rows += _swiglu("encoder.encoder_layers.{i}.mlp", "enc_blocks.{i}.mlp")
  rows += _swiglu("decoder.decoder_layers.{i}.mlp", "dec_blocks.{i}.mlp")
  rows += _linear("encoder.squeeze_layer", "squeeze")
  rows += _linear("encoder.hidden_to_latent", "to_latent")
  rows += _linear("decoder.latent_to_hidden", "from_latent")
  rows += _linear("decoder.expand_layer", "expand")
  return rows


def backbone_table() -> list[Row]:
  """Hugging Face `LlamaModel` names → `Transformer` (under `backbone.`) + `embed.table`."""
  layer = "backbone.layers.{i}"
  rows = [(f"layers.{{i}}.self_attn.{p}_proj.weight", f"{layer}.attn.{p}", "heads_in")
          for p in ("q", "k", "v")]
  rows += [("layers.{i}.self_attn.o_proj.weight", f"{layer}.attn.o", "heads_out"),
           ("layers.{i}.input_layernorm.weight", f"{layer}.attn_norm.scale", "id"),
           ("layers.{i}.post_attention_layernorm.weight", f"{layer}.mlp_norm.scale", "id"),
           ("norm.weight", "backbone.norm.scale", "id"),
           ("embed_tokens.weight", "embed.table", "id")]
  return rows + _swiglu("layers.{i}.mlp", f"{layer}.mlp")


def adaln_table(ref: str, ours: str) -> list[Row]:
  """The flow / diffusion heads' `SimpleMLPAdaLN` (`{ref}.*`) → `AdaLNMLP` (`{ours}.*`)."""
  rows = _linear(f"{ref}.time_embed.mlp.0", f"{ours}.time.fc1")
  rows += _linear(f"{ref}.time_embed.mlp.2", f"{ours}.time.fc2")
  rows += _linear(f"{ref}.cond_embed", f"{ours}.cond") + _linear(f"{ref}.input_proj", f"{ours}.inp")
  b, o = f"{ref}.res_blocks.{{i}}", f"{ours}.blocks.{{i}}"
  rows += _layernorm(f"{b}.in_ln", f"{o}.norm")
  rows += _linear(f"{b}.mlp.0", f"{o}.fc1") + _linear(f"{b}.mlp.2", f"{o}.fc2")
  rows += _linear(f"{b}.adaLN_modulation.1", f"{o}.ada")
  rows += _linear(f"{ref}.final_layer.linear", f"{ours}.final.out")
  return rows + _linear(f"{ref}.final_layer.adaLN_modulation.1", f"{ours}.final.ada")


def calm_table(kind: str = "energy") -> list[Row]:
  """Reference CALM names (`transformer.*`, `embed_proj.*`, and the head's own: see
  `calm.heads`) → `CALM`."""
  from calm import heads

  rows = [("transformer." + r, o, k) for r, o, k in backbone_table()]
  rows += _linear("embed_proj.0", "compress.up") + _linear("embed_proj.2", "compress.down")
  rows += _layernorm("embed_proj.3", "compress.norm")
  return rows + heads.get(kind).reference_rows(f"{kind}_head")


def ar_table(tied: bool = False) -> list[Row]:
  """Hugging Face `LlamaForCausalLM` names → `ARModel` (no `lm_head` when tied)."""
  rows = [("model." + r, o, k) for r, o, k in backbone_table()]
  return rows if tied else rows + [("lm_head.weight", "lm_head.kernel", "linear")]


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


def values_match(a: np.ndarray, b: np.ndarray, rtol: float = 0.0) -> bool:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if a.shape != b.shape:
    return False
  if rtol == 0.0:
    return bool(np.array_equal(a, b))
  return bool(np.allclose(a, b, rtol=rtol, atol=rtol * float(np.max(np.abs(b), initial=0.0))))


def _merge_alias(w: dict[str, np.ndarray], alias: str, name: str, where: str) -> None:
  """Drops `alias` (a second name of the tensor `name`), keeping it if `name` is absent."""
  if alias not in w:
    return
  value = w.pop(alias)
  if name not in w:
    w[name] = value
  elif not values_match(w[name], value):
    raise CheckpointError(f"{where}: {alias} should be tied to {name} but holds different values")


def normalize(weights: Mapping[str, np.ndarray], stage: str, model_cfg: ModelConfig | None = None,
              *, where: str = "weights") -> dict[str, np.ndarray]:
  """Maps the name variants of the reference onto the names of `table(stage)` (each stage's
  `normalize_reference` says which: prefixes, tied aliases, buffers)."""
  from calm import stages

  return stages.get(stage).normalize_reference(dict(weights), model_cfg, where)


def embedded_autoencoder(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The `ae_model.*` tensors a CALM state_dict may carry (prefix removed)."""
  return {k[len("ae_model."):]: v for k, v in weights.items() if k.startswith("ae_model.")}
