"""Numerical parity with the official PyTorch CALM on a tiny model (fixture from ../shared)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calm import config as config_lib, convert
from calm.losses import energy_score
from calm.models.ar import ARModel
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM

from conftest import SHARED

FIXTURE = SHARED / "fixtures" / "reference_tiny.npz"

# ----------------------------------------------------------------------------- name mapping
# The reference state_dict names are mapped by calm.convert (the checkpoint converter), so these
# tests also check the converter's tables, transposes and per-head splits.


def load_reference_state(npz, cfg: config_lib.ModelConfig) -> dict[str, dict[str, np.ndarray]]:
  """Fixture arrays → {"autoencoder"|"calm"|"ar": {our param path: float32 array}}."""
  w = {k[2:]: npz[k] for k in npz.files if k.startswith("w/")}
  ar = {k[3:]: npz[k] for k in npz.files if k.startswith("ar/")}
  np.testing.assert_array_equal(w["ae_model.decoder.lm_head_weight"],
                                w["ae_model.encoder.embed_tokens.weight"])
  out = {}
  for stage, weights in (("autoencoder", w), ("calm", w), ("ar", ar)):
    # normalize: ae_model.* prefix and tied lm_head for the AE, generative_head.* aliases for CALM
    named = convert.normalize(weights, stage, cfg, where=f"fixture {stage}")
    out[stage] = convert.to_params(named, stage, cfg, where=f"fixture {stage}")
  return out


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
