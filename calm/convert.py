"""Official PyTorch CALM / Hugging Face Llama checkpoints ↔ calm-jax Orbax checkpoints.

    python -m calm.convert --ae AE_DIR [--calm CALM_DIR] [--llama LLAMA_DIR] --out RUN_DIR
    python -m calm.convert --export RUN_DIR/calm --out REF_DIR [--format safetensors|npz]

A source is a Hugging Face-style directory: `config.json` plus weights as `model.safetensors`,
`*.npz` or `pytorch_model.bin` (sharded `*.index.json` variants too; `.bin` needs torch). The
autoencoder is written to RUN_DIR/autoencoder, the CALM model to RUN_DIR/calm (its
`train.autoencoder` pointing at the former), a Llama baseline to RUN_DIR/ar; each holds a step-0
checkpoint, a `config.yaml` usable by `sample.py` / `python -m calm.evaluate`, and the source's
tokenizer files if it has any. A CALM config.json's `model_type` (energy, flow or diffusion)
selects the generative head, in both directions.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import struct
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from calm import config as config_lib
from calm.config import Config, ModelConfig
from calm.errors import CalmError, CheckpointError, ConfigError, cli

STAGES = ("autoencoder", "calm", "ar")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

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
  """Reference CALM names (`transformer.*`, `embed_proj.*`, and the head: `mlp_generator.*` for
  energy, `generative_head.net.*` for flow / diffusion) → `CALM`."""
  rows = [("transformer." + r, o, k) for r, o, k in backbone_table()]
  rows += _linear("embed_proj.0", "compress.up") + _linear("embed_proj.2", "compress.down")
  rows += _layernorm("embed_proj.3", "compress.norm")
  if kind != "energy":
    return rows + adaln_table("generative_head.net", f"{kind}_head.net")
  g, h = "mlp_generator", "energy_head"
  rows += _linear(f"{g}.noise_embd", f"{h}.noise_in")
  rows += _linear(f"{g}.hidden_embd", f"{h}.hidden_in")
  rows += _layernorm(f"{g}.norm_noise", f"{h}.noise_norm")
  rows += _layernorm(f"{g}.norm_hidden", f"{h}.hidden_norm")
  rows += _layernorm(f"{g}.mlp_blocks.{{i}}.in_ln", f"{h}.blocks.{{i}}.norm")
  for ref, ours in (("linears.0", "fc1"), ("linears.2", "fc2"), ("linears.4", "fc3"),
                    ("down_proj", "down")):
    rows += _linear(f"{g}.mlp_blocks.{{i}}.{ref}", f"{h}.blocks.{{i}}.{ours}")
  rows += _layernorm(f"{g}.final_layer.in_ln", f"{h}.out_norm")
  rows += _linear(f"{g}.final_layer.linears.0", f"{h}.out_fc1")
  rows += _linear(f"{g}.final_layer.linears.2", f"{h}.out_fc2")
  return rows


def ar_table(tied: bool = False) -> list[Row]:
  """Hugging Face `LlamaForCausalLM` names → `ARModel` (no `lm_head` when tied)."""
  rows = [("model." + r, o, k) for r, o, k in backbone_table()]
  return rows if tied else rows + [("lm_head.weight", "lm_head.kernel", "linear")]


def table(stage: str, model_cfg: ModelConfig) -> list[Row]:
  if stage == "autoencoder":
    return autoencoder_table()
  if stage == "calm":
    return calm_table(model_cfg.head.kind)
  return ar_table(model_cfg.tie_ar_embeddings)


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


def _names(names: Sequence[str], limit: int = 6) -> str:
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
    problems.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
  if extra:
    problems.append(f"{len(extra)} unexpected tensor(s): {_names(extra)}")
  if wrong:
    problems.append(f"wrong shape: {_names(wrong, 4)}")
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
  names = expand(table(stage, model_cfg), {k: np.shape(v) for k, v in flat.items()})
  out = {n: np.ascontiguousarray(_to_ref(kind, np.asarray(flat[path], np.float32)))
         for n, (path, kind) in names.items()}
  if stage == "autoencoder":
    out["decoder.lm_head_weight"] = out["encoder.embed_tokens.weight"].copy()
  return out


# ----------------------------------------------------------------------------- state_dict aliases


def _same(a: np.ndarray, b: np.ndarray, rtol: float = 0.0) -> bool:
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
  elif not _same(w[name], value):
    raise CheckpointError(f"{where}: {alias} should be tied to {name} but holds different values")


def normalize(weights: Mapping[str, np.ndarray], stage: str, model_cfg: ModelConfig | None = None,
              *, where: str = "weights") -> dict[str, np.ndarray]:
  """Maps the name variants of the reference onto the names of `table(stage)`.

  autoencoder: `ae_model.` prefix optional (when present, other tensors are ignored: a CALM
  directory that embeds its autoencoder); the tied `decoder.lm_head_weight` must equal the
  embedding. calm: `ae_model.*` dropped (see `embedded_autoencoder`); for the energy head
  `generative_head.*` is the same module as `mlp_generator.*` (the flow / diffusion heads'
  tensors are `generative_head.net.*`). ar: `rotary_emb.inv_freq` buffers dropped; a tied `lm_head`
  must equal the embedding.
  """
  w = dict(weights)
  if stage == "autoencoder":
    if any(k.startswith("ae_model.") for k in w):
      w = {k[len("ae_model."):]: v for k, v in w.items() if k.startswith("ae_model.")}
    for alias in ("decoder.lm_head_weight", "decoder.lm_head.weight"):
      _merge_alias(w, alias, "encoder.embed_tokens.weight", where)
  elif stage == "calm":
    w = {k: v for k, v in w.items() if not k.startswith("ae_model.")}
    if model_cfg is None or model_cfg.head.kind == "energy":
      for k in [k for k in w if k.startswith("generative_head.")]:
        _merge_alias(w, k, "mlp_generator." + k[len("generative_head."):], where)
  elif stage == "ar":
    w = {k: v for k, v in w.items() if not k.endswith("rotary_emb.inv_freq")}
    if model_cfg is not None and model_cfg.tie_ar_embeddings:
      _merge_alias(w, "lm_head.weight", "model.embed_tokens.weight", where)
  return w


def embedded_autoencoder(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The `ae_model.*` tensors a CALM state_dict may carry (prefix removed)."""
  return {k[len("ae_model."):]: v for k, v in weights.items() if k.startswith("ae_model.")}


# ----------------------------------------------------------------------------- reading weights


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """safetensors via its numpy API; BF16 tensors (no numpy dtype) are widened to float32."""
  from safetensors import safe_open

  with open(path, "rb") as fh:
    (n,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(n))
  header.pop("__metadata__", None)
  bf16 = {k for k, v in header.items() if v.get("dtype") == "BF16"}
  out: dict[str, np.ndarray] = {}
  with safe_open(str(path), framework="np") as f:
    for k in f.keys():
      if k not in bf16:
        out[k] = f.get_tensor(k)
  if bf16:
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    for k in bf16:
      start, end = header[k]["data_offsets"]
      u16 = np.frombuffer(raw[start:end], dtype="<u2").astype(np.uint32) << 16
      out[k] = u16.view(np.float32).reshape(header[k]["shape"])
  return out


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise CalmError(f"{path}: reading pytorch_model.bin needs PyTorch (pip install torch, "
                    f"next to pip install 'calm-jax[convert]'), or save the weights as "
                    f"model.safetensors") from None
  state = torch.load(str(path), map_location="cpu", weights_only=True)
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()
          if hasattr(v, "detach") and v.is_floating_point()}


_READERS: dict[str, Callable[[pathlib.Path], dict[str, np.ndarray]]] = {
    ".safetensors": _read_safetensors, ".npz": _read_npz, ".bin": _read_torch, ".pt": _read_torch,
    ".pth": _read_torch}


def _weight_files(src: pathlib.Path) -> list[pathlib.Path]:
  for name in ("model.safetensors", "pytorch_model.bin"):
    if (src / name).is_file():
      return [src / name]
    index = src / f"{name}.index.json"
    if index.is_file():
      try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      except (OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
      return [src / s for s in shards]
  found = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.npz"))
  if found:
    return found
  raise CheckpointError(f"{src}: no weights found (model.safetensors, *.npz or pytorch_model.bin)")


def read_weights(src: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory (or one weights file), by state_dict name."""
  src = pathlib.Path(src)
  if not src.exists():
    raise CheckpointError(f"checkpoint directory not found: {src}")
  files = [src] if src.is_file() else _weight_files(src)
  out: dict[str, np.ndarray] = {}
  for f in files:
    reader = _READERS.get(f.suffix)
    if reader is None:
      raise CheckpointError(f"{f}: unsupported weights format (use .safetensors, .npz or .bin)")
    if not f.is_file():
      raise CheckpointError(f"{f}: weights file not found")
    try:
      out.update(reader(f))
    except CalmError:
      raise
    except Exception as e:  # noqa: BLE001 - any parse failure is a damaged file
      msg = " ".join(str(e).split())[:200]
      raise CheckpointError(f"{f}: unreadable weights ({type(e).__name__}: {msg})") from None
  return out


# ----------------------------------------------------------------------------- config.json

# Reference field → our dotted config key(s), per kind of source.
_AE_FIELDS: dict[str, tuple[str, ...]] = {
    "vocab_size": ("model.vocab_size",),
    "patch_size": ("model.chunk_size",),
    "latent_size": ("model.latent_dim",),
    "hidden_size": ("model.autoencoder.hidden_dim",),
    "intermediate_size": ("model.autoencoder.ffn_dim",),
    "num_encoder_layers": ("model.autoencoder.num_encoder_layers",),
    "num_decoder_layers": ("model.autoencoder.num_decoder_layers",),
    "ae_num_layers": ("model.autoencoder.num_encoder_layers",
                      "model.autoencoder.num_decoder_layers"),
    "rms_norm_eps": ("model.autoencoder.norm_eps",),
    "ae_dropout": ("model.autoencoder.token_dropout", "model.autoencoder.latent_dropout"),
    "token_dropout": ("model.autoencoder.token_dropout",),
    "latent_dropout": ("model.autoencoder.latent_dropout",),
    "kl_weight": ("model.autoencoder.kl_weight",),
    "kl_clamp": ("model.autoencoder.kl_clamp",),
}
_LLAMA_FIELDS: dict[str, tuple[str, ...]] = {
    "vocab_size": ("model.vocab_size",),
    "hidden_size": ("model.backbone.hidden_dim",),
    "intermediate_size": ("model.backbone.ffn_dim",),
    "num_hidden_layers": ("model.backbone.num_layers",),
    "num_attention_heads": ("model.backbone.num_heads",),
    "num_key_value_heads": ("model.backbone.num_kv_heads",),
    "rope_theta": ("model.backbone.rope_theta",),
    "rms_norm_eps": ("model.backbone.norm_eps",),
}
_CALM_FIELDS: dict[str, tuple[str, ...]] = {
    **_LLAMA_FIELDS,
    "patch_size": ("model.chunk_size",),
    "latent_size": ("model.latent_dim",),
    "noise_size": ("model.head.noise_dim",),
    "num_mlp_layers": ("model.head.num_blocks",),
    "num_samples": ("model.head.num_samples",),
    "num_target_samples": ("model.head.num_target_samples",),
    "beta": ("model.head.beta",),
    "layer_norm_eps": ("model.head.norm_eps",),
    # flow / diffusion sampler settings (the reference fixes them in code; recorded on export)
    "flow_solver": ("model.head.solver",),
    "flow_steps": ("model.head.flow_steps",),
    "noise_schedule": ("model.head.schedule",),
    "diffusion_steps": ("model.head.diffusion_steps",),
    "num_sampling_steps": ("model.head.sampling_steps",),
    "noise_temperature": ("model.head.noise_temperature",),
    # the autoencoder's shape, when the CALM config repeats it: must agree with the AE's config
    "num_encoder_layers": ("model.autoencoder.num_encoder_layers",),
    "num_decoder_layers": ("model.autoencoder.num_decoder_layers",),
    "ae_num_layers": ("model.autoencoder.num_encoder_layers",
                      "model.autoencoder.num_decoder_layers"),
}
FIELDS = {"autoencoder": _AE_FIELDS, "calm": _CALM_FIELDS, "ar": _LLAMA_FIELDS}
REQUIRED = {
    "autoencoder": ("vocab_size", "patch_size", "latent_size", "hidden_size", "intermediate_size"),
    "calm": ("vocab_size", "patch_size", "latent_size", "hidden_size", "intermediate_size",
             "num_hidden_layers", "num_attention_heads", "noise_size", "num_mlp_layers"),
    "ar": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
           "num_attention_heads"),
}
# A CALM config.json's `model_type` → model.head.kind ("calm": older exports of ours).
HEAD_KINDS = {"energy": "energy", "calm": "energy", "flow": "flow", "diffusion": "diffusion"}
# The reference's model class of each head.
HEAD_ARCHITECTURES = {"energy": "EnergyTransformer", "flow": "FlowTransformer",
                      "diffusion": "DiffusionTransformer"}
# Other spellings (the parity fixture's `meta`, our own names) → reference field.
ALIASES = {
    "vocab": "vocab_size", "K": "patch_size", "chunk_size": "patch_size", "latent": "latent_size",
    "latent_dim": "latent_size", "hidden": "hidden_size", "hidden_dim": "hidden_size",
    "ffn": "intermediate_size", "ffn_dim": "intermediate_size", "enc_layers": "num_encoder_layers",
    "dec_layers": "num_decoder_layers", "layers": "num_hidden_layers",
    "num_layers": "num_hidden_layers", "heads": "num_attention_heads",
    "num_heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
    "num_kv_heads": "num_key_value_heads", "head_blocks": "num_mlp_layers",
    "num_blocks": "num_mlp_layers", "noise": "noise_size", "noise_dim": "noise_size",
    "rms_eps": "rms_norm_eps", "ln_eps": "layer_norm_eps",
}
# Fields that do not change the converted model (training, generation, bookkeeping).
INFORMATIONAL = frozenset("""
    architectures auto_map model_type torch_dtype dtype transformers_version initializer_range use_cache
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id
    max_position_embeddings pretraining_tp attention_dropout hidden_dropout dropout
    ae_path ae_name_or_path tokenizer_class tie_word_embeddings return_dict output_attentions
    output_hidden_states torchscript use_bfloat16 is_decoder is_encoder_decoder add_cross_attention
    tie_encoder_decoder cross_attention_hidden_size chunk_size_feed_forward pruned_heads
    tf_legacy_loss finetuning_task id2label label2id problem_type task_specific_params prefix
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
    temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
    ae_dropout kl_weight kl_clamp token_dropout latent_dropout
""".split())


def read_config_json(src: str | pathlib.Path) -> dict:
  src = pathlib.Path(src)
  path = src / "config.json" if src.is_dir() or not src.exists() else src.with_name("config.json")
  if not path.is_file():
    raise ConfigError(f"{path} not found: a checkpoint directory needs its config.json")
  try:
    raw = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: invalid JSON ({e})") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: must hold a JSON object")
  return raw


def _check_fixed(raw: Mapping[str, Any], kind: str, where: str) -> None:
  """Architecture fields whose only supported value is the Llama default."""
  bad = []
  act = raw.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    bad.append(f"hidden_act={act!r} (only silu)")
  for k in ("attention_bias", "mlp_bias"):
    if raw.get(k):
      bad.append(f"{k}=true (no biases supported)")
  scaling = raw.get("rope_scaling")
  if scaling and not (isinstance(scaling, dict) and
                      scaling.get("rope_type", scaling.get("type")) == "default"):
    bad.append(f"rope_scaling={raw['rope_scaling']!r} (plain RoPE only)")
  if kind != "autoencoder" and raw.get("head_dim") is not None:
    hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
    if hidden and heads and raw["head_dim"] != hidden // heads:
      bad.append(f"head_dim={raw['head_dim']} (must be hidden_size / num_attention_heads)")
  if kind == "ar" and raw.get("model_type", "llama") != "llama":
    bad.append(f"model_type={raw['model_type']!r} (a Llama model is expected)")
  if kind == "calm" and raw.get("model_type", "energy") not in HEAD_KINDS:
    bad.append(f"model_type={raw['model_type']!r} (a CALM head: energy, flow or diffusion)")
  if bad:
    raise ConfigError(f"{where}: unsupported {'; '.join(bad)}")


def config_fields(raw: Mapping[str, Any], kind: str, *, where: str = "config.json",
                  ignore: Iterable[str] = ()) -> dict[str, Any]:
  """A reference config.json → {our dotted config key: value}.

  Unknown fields (neither mapped, checked nor informational, and not in `ignore`) are an error
  naming them all: they may change the architecture.
  """
  fields = FIELDS[kind]
  raw = dict(raw)
  rope = raw.pop("rope_parameters", None)  # newer transformers: {"rope_type", "rope_theta"}
  if isinstance(rope, dict):
    if rope.get("rope_type", "default") != "default":
      raise ConfigError(f"{where}: unsupported rope_parameters {rope!r} (plain RoPE only)")
    if "rope_theta" in rope:
      raw.setdefault("rope_theta", rope["rope_theta"])
  canon: dict[str, Any] = {}
  unknown = []
  fixed = {"hidden_act", "attention_bias", "mlp_bias", "rope_scaling", "head_dim"}
  ignore = set(ignore)
  for key, value in raw.items():
    name = ALIASES.get(key, key) if ALIASES.get(key, key) in fields else key
    if name in fields:
      if name in canon and canon[name] != value:
        raise ConfigError(f"{where}: {key}={value!r} contradicts {name}={canon[name]!r}")
      canon[name] = value
    elif not (key in fixed or key in INFORMATIONAL or key in ignore or key.startswith("_")):
      unknown.append(key)
  if unknown:
    raise ConfigError(f"{where}: unknown config field(s) {', '.join(sorted(unknown))} (they may "
                      f"change the architecture; pass --ignore-field NAME if they do not)")
  _check_fixed(raw, kind, where)
  missing = [k for k in REQUIRED[kind] if k not in canon]
  if kind == "autoencoder" and "ae_num_layers" not in canon:
    missing += [k for k in ("num_encoder_layers", "num_decoder_layers") if k not in canon]
  if missing:
    raise ConfigError(f"{where}: missing required field(s) {', '.join(missing)}")
  out: dict[str, Any] = {}
  for name, value in canon.items():
    for dotted in fields[name]:
      out[dotted] = value
  if kind == "ar":
    out["model.tie_ar_embeddings"] = bool(raw.get("tie_word_embeddings", False))
  if kind == "calm":
    out["model.head.kind"] = HEAD_KINDS[raw.get("model_type", "energy")]
  if kind != "autoencoder" and "num_key_value_heads" not in canon:
    out["model.backbone.num_kv_heads"] = canon["num_attention_heads"]
  return out


def merge_fields(a: Mapping[str, Any], b: Mapping[str, Any], where_a: str,
                 where_b: str) -> dict[str, Any]:
  """Union of two dotted field maps; a key both set differently is an error."""
  for k in sorted(set(a) & set(b)):
    if a[k] != b[k]:
      raise ConfigError(f"{k.split('.')[-1]}: {a[k]!r} in {where_a} but {b[k]!r} in {where_b}")
  return {**a, **b}


def build_config(stage: str, fields: Mapping[str, Any], run_dir: pathlib.Path, *,
                 autoencoder: str = "", tokenizer: str = "") -> Config:
  """A full, validated Config for a converted stage (block sizes rounded to a multiple of K)."""
  raw: dict = {}
  for k, v in fields.items():
    config_lib._set_dotted(raw, k, v)
  k_size = int(raw.get("model", {}).get("chunk_size", ModelConfig().chunk_size) or 1)
  block = max(k_size, 2048 // max(k_size, 1) * k_size)
  raw.update(stage=stage, run_dir=str(run_dir))
  raw.setdefault("data", {}).update(block_tokens=block, tokenizer=tokenizer)
  raw.setdefault("eval", {}).update(block_tokens=max(block, 4 * k_size))
  raw.setdefault("train", {}).update(autoencoder=autoencoder)
  raw["checkpoint"] = {"async_save": False}
  return config_lib.from_dict(raw)


def reference_config(cfg: Config) -> dict:
  """Our config → the reference config.json of its stage."""
  m = cfg.model
  a, b, h = m.autoencoder, m.backbone, m.head
  if cfg.stage == "autoencoder":
    out = {"architectures": ["Autoencoder"], "model_type": "autoencoder",
           "vocab_size": m.vocab_size, "hidden_size": a.hidden_dim,
           "intermediate_size": a.ffn_dim, "num_encoder_layers": a.num_encoder_layers,
           "num_decoder_layers": a.num_decoder_layers, "latent_size": m.latent_dim,
           "patch_size": m.chunk_size, "rms_norm_eps": a.norm_eps, "hidden_act": "silu",
           "kl_weight": a.kl_weight, "kl_clamp": a.kl_clamp, "tie_word_embeddings": True}
    if a.token_dropout == a.latent_dropout:
      out["ae_dropout"] = a.token_dropout
    else:
      out.update(token_dropout=a.token_dropout, latent_dropout=a.latent_dropout)
    return {**out, "torch_dtype": "float32"}
  llama = {"vocab_size": m.vocab_size, "hidden_size": b.hidden_dim,
           "intermediate_size": b.ffn_dim, "num_hidden_layers": b.num_layers,
           "num_attention_heads": b.num_heads, "num_key_value_heads": b.num_kv_heads,
           "rope_theta": b.rope_theta, "rms_norm_eps": b.norm_eps, "hidden_act": "silu",
           "attention_bias": False, "mlp_bias": False, "rope_scaling": None}
  if cfg.stage == "ar":
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **llama,
            "tie_word_embeddings": m.tie_ar_embeddings, "torch_dtype": "float32"}
  out = {"architectures": [HEAD_ARCHITECTURES[h.kind]], "model_type": h.kind, **llama,
         "patch_size": m.chunk_size, "latent_size": m.latent_dim, "noise_size": h.noise_dim,
         "num_mlp_layers": h.num_blocks, "num_samples": h.num_samples,
         "num_target_samples": h.num_target_samples, "beta": h.beta,
         "layer_norm_eps": h.norm_eps, "num_encoder_layers": a.num_encoder_layers,
         "num_decoder_layers": a.num_decoder_layers}
  if h.kind == "flow":
    out.update(flow_solver=h.solver, flow_steps=h.flow_steps)
  elif h.kind == "diffusion":
    out.update(noise_schedule=h.schedule, diffusion_steps=h.diffusion_steps,
               num_sampling_steps=h.sampling_steps, noise_temperature=h.noise_temperature)
  return {**out, "torch_dtype": "float32"}


# ----------------------------------------------------------------------------- writing runs


def _nest(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    parts = path.split(".")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return out


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
    ckpt.save_now(0, params=_nest(params))
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
  differ = [k for k in theirs if k not in ours or not _same(theirs[k], ours[k], rtol=1e-2)]
  if differ:
    raise CheckpointError(f"{calm} embeds an autoencoder that differs from {ae} "
                          f"({_names(differ, 3)}); pass the autoencoder it was trained with")


# ----------------------------------------------------------------------------- export


def export_reference(run_dir: str | pathlib.Path, out_dir: str | pathlib.Path,
                     format: str = "safetensors", *, step: int | None = None) -> pathlib.Path:
  """Our checkpoint → a reference-layout directory: config.json + model.safetensors / model.npz
  (+ the run's tokenizer files)."""
  import jax
  from flax import nnx

  from calm import run

  if format not in ("safetensors", "npz"):
    raise CalmError(f"format must be safetensors or npz, got {format!r}")
  loaded = run.load_model(run_dir, step=step)
  flat = {".".join(map(str, p)): np.asarray(jax.device_get(v[...]))
          for p, v in nnx.to_flat_state(loaded.params)}
  weights = from_params(flat, loaded.config.stage, loaded.config.model)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "config.json").write_text(json.dumps(reference_config(loaded.config), indent=2))
  if format == "npz":
    path = out_dir / "model.npz"
    np.savez(path, **weights)
  else:
    from safetensors.numpy import save_file

    path = out_dir / "model.safetensors"
    save_file(weights, str(path), metadata={"format": "pt"})
  tok = loaded.config.data.tokenizer
  srcs = [pathlib.Path(tok).parent] if tok else []
  _copy_tokenizer([*srcs, loaded.run_dir], out_dir)
  return out_dir


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m calm.convert",
                               description="Convert official CALM / Hugging Face Llama "
                                           "checkpoints to calm-jax runs, or export back.")
  ap.add_argument("--ae", help="reference autoencoder directory")
  ap.add_argument("--calm", help="reference CALM directory (needs --ae)")
  ap.add_argument("--llama", help="Hugging Face LlamaForCausalLM directory (AR baseline)")
  ap.add_argument("--export", metavar="RUN_DIR", help="export this calm-jax run instead")
  ap.add_argument("--format", choices=("safetensors", "npz"), default="safetensors",
                  help="weights format of --export")
  ap.add_argument("--out", required=True, help="output run directory (or export directory)")
  ap.add_argument("--ignore-field", action="append", default=[], metavar="NAME",
                  help="config.json field known not to change the model (repeatable)")
  args = ap.parse_args(argv)
  if args.export:
    if args.ae or args.calm or args.llama:
      raise CalmError("--export cannot be combined with --ae/--calm/--llama")
    print(f"exported {args.export} → {export_reference(args.export, args.out, args.format)}")
    return 0
  runs = convert(args.out, ae=args.ae, calm=args.calm, llama=args.llama,
                 ignore_fields=args.ignore_field)
  for stage, path in runs.items():
    print(f"{stage}: {path} (config {path / 'config.yaml'})")
  return 0


if __name__ == "__main__":
  sys.exit(cli(main)())
