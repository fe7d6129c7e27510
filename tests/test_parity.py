"""Numerical parity with the official PyTorch CALM on a tiny model (fixture from ../shared)."""

from __future__ import annotations

import json
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calm import config as config_lib
from calm.losses import energy_score
from calm.models.ar import ARModel
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM

from conftest import SHARED

FIXTURE = SHARED / "fixtures" / "reference_tiny.npz"

# ----------------------------------------------------------------------------- name mapping
# Each row: reference state_dict name (with {i} for a layer index) → parameter path in our module
# (dots; integers index nnx.List) → transform of the torch tensor. Torch Linear is (out, in);
# ours is (in, out). Attention projections are split per head: [D, heads, head_dim].


def _t(w: np.ndarray) -> np.ndarray:
  return w.T


def _id(w: np.ndarray) -> np.ndarray:
  return w


def _heads_in(head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
  """q/k/v_proj (heads·head_dim, D) → [D, heads, head_dim]."""
  return lambda w: w.T.reshape(w.shape[1], -1, head_dim)


def _heads_out(head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
  """o_proj (D, heads·head_dim) → [heads, head_dim, D]."""
  return lambda w: w.T.reshape(-1, head_dim, w.shape[0])


def _linear(ref: str, ours: str) -> list[tuple[str, str, Callable]]:
  return [(f"{ref}.weight", f"{ours}.kernel", _t), (f"{ref}.bias", f"{ours}.bias", _id)]


def _layernorm(ref: str, ours: str) -> list[tuple[str, str, Callable]]:
  return [(f"{ref}.weight", f"{ours}.scale", _id), (f"{ref}.bias", f"{ours}.bias", _id)]


def _swiglu(ref: str, ours: str) -> list[tuple[str, str, Callable]]:
  return [(f"{ref}.{p}_proj.weight", f"{ours}.{p}.kernel", _t) for p in ("gate", "up", "down")]


def autoencoder_table() -> list[tuple[str, str, Callable]]:
  """Reference `ae_model.*` (prefix stripped) → `Autoencoder`."""
  rows = [("encoder.embed_tokens.weight", "embed.table", _id),
          ("encoder.encoder_layers.{i}.layernorm.weight", "enc_blocks.{i}.norm.scale", _id),
          ("encoder.norm.weight", "enc_norm.scale", _id),
          ("decoder.decoder_layers.{i}.layernorm.weight", "dec_blocks.{i}.norm.scale", _id),
          ("decoder.norm.weight", "dec_norm.scale", _id)]
  rows += _swiglu("encoder.encoder_layers.{i}.mlp", "enc_blocks.{i}.mlp")
  rows += _swiglu("decoder.decoder_layers.{i}.mlp", "dec_blocks.{i}.mlp")
  rows += _linear("encoder.squeeze_layer", "squeeze")
  rows += _linear("encoder.hidden_to_latent", "to_latent")
  rows += _linear("decoder.latent_to_hidden", "from_latent")
  rows += _linear("decoder.expand_layer", "expand")
  # decoder.lm_head_weight is the tied encoder.embed_tokens.weight (checked, not loaded)
  return rows


def backbone_table(head_dim: int) -> list[tuple[str, str, Callable]]:
  """HF Llama decoder names (prefix stripped) → `Transformer` (under `backbone.`)."""
  rows = [(f"layers.{{i}}.self_attn.{p}_proj.weight", f"backbone.layers.{{i}}.attn.{p}",
           _heads_in(head_dim)) for p in ("q", "k", "v")]
  layer = "backbone.layers.{i}"
  rows += [("layers.{i}.self_attn.o_proj.weight", f"{layer}.attn.o", _heads_out(head_dim)),
           ("layers.{i}.input_layernorm.weight", f"{layer}.attn_norm.scale", _id),
           ("layers.{i}.post_attention_layernorm.weight", f"{layer}.mlp_norm.scale", _id),
           ("norm.weight", "backbone.norm.scale", _id),
           ("embed_tokens.weight", "embed.table", _id)]
  rows += _swiglu("layers.{i}.mlp", "backbone.layers.{i}.mlp")
  return rows


def calm_table(head_dim: int) -> list[tuple[str, str, Callable]]:
  """Reference CALM names (minus `ae_model.*`) → `CALM`."""
  rows = [("transformer." + r, o, f) for r, o, f in backbone_table(head_dim)]
  rows += _linear("embed_proj.0", "compress.up") + _linear("embed_proj.2", "compress.down")
  rows += _layernorm("embed_proj.3", "compress.norm")
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
  # generative_head.* aliases mlp_generator.* (same tensors)
  return rows


def ar_table(head_dim: int) -> list[tuple[str, str, Callable]]:
  """HF `LlamaForCausalLM` names → `ARModel`."""
  rows = [("model." + r, o, f) for r, o, f in backbone_table(head_dim)]
  return rows + [("lm_head.weight", "lm_head.kernel", _t)]


def map_names(weights: dict[str, np.ndarray], table, ignore: str = "^$") -> dict[str, np.ndarray]:
  """Applies a table to a state_dict → {our path: array}. Every row must match a weight and every
  weight (except names matching the `ignore` regex) must be consumed by a row."""
  out: dict[str, np.ndarray] = {}
  used: set[str] = set()
  for ref, ours, fn in table:
    pattern = re.compile("^" + re.escape(ref).replace(r"\{i\}", r"(\d+)") + "$")
    hits = [(pattern.match(k), k) for k in weights]
    hits = [(m, k) for m, k in hits if m]
    if not hits:
      raise KeyError(f"reference weight {ref} not found")
    for m, k in hits:
      path = ours.replace("{i}", m.group(1)) if m.groups() else ours
      out[path] = np.asarray(fn(weights[k]), np.float32)
      used.add(k)
  unused = sorted(k for k in set(weights) - used if not re.match(ignore, k))
  if unused:
    raise KeyError(f"reference weights without a mapping: {unused}")
  return out


def load_reference_state(npz, cfg: config_lib.ModelConfig) -> dict[str, dict[str, np.ndarray]]:
  """Fixture arrays → {"autoencoder"|"calm"|"ar": {our param path: float32 array}}."""
  w = {k[2:]: npz[k] for k in npz.files if k.startswith("w/")}
  ar = {k[3:]: npz[k] for k in npz.files if k.startswith("ar/")}
  np.testing.assert_array_equal(w["ae_model.decoder.lm_head_weight"],
                                w["ae_model.encoder.embed_tokens.weight"])
  for k in w:
    if k.startswith("generative_head."):
      np.testing.assert_array_equal(w[k], w["mlp_generator." + k[len("generative_head."):]])
  ae = {k[len("ae_model."):]: v for k, v in w.items() if k.startswith("ae_model.")}
  hd = cfg.backbone.head_dim
  return {"autoencoder": map_names(ae, autoencoder_table(), ignore=r"decoder\.lm_head_weight$"),
          "calm": map_names(w, calm_table(hd), ignore=r"(ae_model|generative_head)\."),
          "ar": map_names(ar, ar_table(hd))}


def assign(module: nnx.Module, flat: dict[str, np.ndarray]) -> None:
  """Writes {path: array} into a module; every parameter must be covered, shapes must match."""
  params = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  missing = sorted(set(params) - set(flat))
  extra = sorted(set(flat) - set(params))
  assert not missing and not extra, f"missing {missing}, unexpected {extra}"
  for path, value in flat.items():
    var = params[path]
    assert var.shape == value.shape, f"{path}: {var.shape} vs {value.shape}"
    var[...] = jnp.asarray(value)


def fixture_config(meta: dict) -> config_lib.ModelConfig:
  c = meta["calm"]
  return config_lib.ModelConfig(
      vocab_size=meta["vocab"], chunk_size=meta["K"], latent_dim=meta["latent"],
      autoencoder=config_lib.AutoencoderConfig(
          hidden_dim=meta["ae"]["hidden"], ffn_dim=meta["ae"]["ffn"],
          num_encoder_layers=meta["ae"]["enc_layers"], num_decoder_layers=meta["ae"]["dec_layers"],
          norm_eps=meta["ae"]["rms_eps"]),
      backbone=config_lib.BackboneConfig(
          hidden_dim=c["hidden"], num_layers=c["layers"], num_heads=c["heads"],
          num_kv_heads=c["kv_heads"], ffn_dim=c["ffn"], rope_theta=c["rope_theta"],
          norm_eps=c["rms_eps"]),
      head=config_lib.HeadConfig(noise_dim=c["noise"], num_blocks=c["head_blocks"],
                                 norm_eps=c["ln_eps"]))


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def ref():
  if not FIXTURE.is_file():
    pytest.skip(f"{FIXTURE} not present")
  npz = np.load(FIXTURE)
  meta = json.loads(str(npz["meta"]))
  cfg = fixture_config(meta)
  ar_meta = meta["ar"]
  assert (ar_meta["hidden"], ar_meta["layers"], ar_meta["heads"]) == (
      cfg.backbone.hidden_dim, cfg.backbone.num_layers, cfg.backbone.num_heads)
  state = load_reference_state(npz, cfg)
  ae = Autoencoder(cfg, rngs=nnx.Rngs(0))
  calm = CALM(cfg, rngs=nnx.Rngs(0))
  ar = ARModel(cfg, rngs=nnx.Rngs(0))
  assign(ae, state["autoencoder"])
  assign(calm, state["calm"])
  assign(ar, state["ar"])
  data = {k: npz[k] for k in npz.files if k.startswith(("in/", "out/"))}
  return cfg, ae, calm, ar, data


def _close(got, want, rtol=1e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def _chunks(cfg, data):
  ids = jnp.asarray(data["in/input_ids"], jnp.int32)
  return ids.reshape(ids.shape[0], -1, cfg.chunk_size)


def test_autoencoder_encoder(ref):
  cfg, ae, _, _, data = ref
  mu, logstd = ae.encode(_chunks(cfg, data))
  _close(jnp.concatenate([mu, logstd], -1), data["out/ae_encoder"])


def test_autoencoder_decoder(ref):
  cfg, ae, _, _, data = ref
  mu = jnp.asarray(data["out/ae_encoder"][..., :cfg.latent_dim])
  logits = ae.decode(mu)
  _close(logits.reshape(logits.shape[0], -1, logits.shape[-1]), data["out/ae_decoder_logits"])


def test_input_compression(ref):
  cfg, _, calm, _, data = ref
  _close(calm.compress_chunks(_chunks(cfg, data)[:, :-1]), data["out/embed_proj"])


def test_backbone_hidden(ref):
  cfg, _, calm, _, data = ref
  h, _ = calm.hidden(_chunks(cfg, data)[:, :-1])
  _close(h, data["out/backbone_hidden"])


def test_head_samples(ref):
  _, _, calm, _, data = ref
  z = calm.head(jnp.asarray(data["out/backbone_hidden"]), jnp.asarray(data["in/head_noise"]))
  _close(z, data["out/head_samples"])


def test_energy_score(ref):
  cfg, _, _, _, data = ref
  mu_logstd = data["out/ae_encoder"][:, 1:]
  mu, logstd = mu_logstd[..., :cfg.latent_dim], mu_logstd[..., cfg.latent_dim:]
  y = mu[None] + np.exp(logstd)[None] * data["in/energy_eps"]
  score = energy_score(jnp.asarray(data["out/head_samples"]), jnp.asarray(y), 1.0)
  _close(score, data["out/energy_score"])


def test_ar_logits(ref):
  _, _, _, ar, data = ref
  logits, _ = ar(jnp.asarray(data["in/input_ids"], jnp.int32))
  _close(logits, data["out/ar_logits"])
