"""The official `config.json` ↔ calm-jax config fields, in both directions."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Iterable, Mapping

from calm import config as config_lib, stages
from calm.config import Config, ModelConfig
from calm.convert.tables import backbone_defaults, head_dim_problems, llama_fields  # noqa: F401
from calm.errors import ConfigError


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


def _check_fixed(raw: Mapping[str, Any], stage, where: str) -> None:
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
  bad += stage.check_reference(raw)
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
  stage = stages.get(kind)
  _check_fixed(raw, stage, where)
  missing = [k for k in REQUIRED[kind] if k not in canon] + stage.missing_reference_fields(canon)
  if missing:
    raise ConfigError(f"{where}: missing required field(s) {', '.join(missing)}")
  out: dict[str, Any] = {}
  for name, value in canon.items():
    for dotted in fields[name]:
      out[dotted] = value
  return {**out, **stage.fields_from_reference(raw, canon)}


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
  return stages.get(cfg.stage).reference_config(cfg)
