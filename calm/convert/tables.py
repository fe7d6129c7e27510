"""Building blocks of the official checkpoints' name tables and config.json fields. The stages
(`calm.stages`) and heads (`calm.heads`) assemble their own tables from these; `calm.convert`
dispatches to them. Imports no stage or model."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from calm.config import ModelConfig
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


def head_dim_problems(raw: Mapping[str, Any]) -> list[str]:
  """A backbone's `head_dim`, when given, must be hidden_size / num_attention_heads."""
  hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
  if raw.get("head_dim") is not None and hidden and heads and raw["head_dim"] != hidden // heads:
    return [f"head_dim={raw['head_dim']} (must be hidden_size / num_attention_heads)"]
  return []


def backbone_defaults(canon: Mapping[str, Any]) -> dict[str, Any]:
  """A Llama config without `num_key_value_heads` has one KV head per query head."""
  if "num_key_value_heads" in canon:
    return {}
  return {"model.backbone.num_kv_heads": canon["num_attention_heads"]}


def llama_fields(m: ModelConfig) -> dict[str, Any]:
  """The backbone's fields of a reference config.json."""
  b = m.backbone
  return {"vocab_size": m.vocab_size, "hidden_size": b.hidden_dim,
          "intermediate_size": b.ffn_dim, "num_hidden_layers": b.num_layers,
          "num_attention_heads": b.num_heads, "num_key_value_heads": b.num_kv_heads,
          "rope_theta": b.rope_theta, "rms_norm_eps": b.norm_eps, "hidden_act": "silu",
          "attention_bias": False, "mlp_bias": False, "rope_scaling": None}
