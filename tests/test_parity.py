"""Numerical parity with the official PyTorch CALM on a tiny model (fixture from ../shared)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calm import config as config_lib, convert
from calm.losses import energy_score
from calm.models.ar import ARModel
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM

from conftest import SHARED, load_fixture

FIXTURE = SHARED / "fixtures" / "reference_tiny.npz"

# ----------------------------------------------------------------------------- name mapping
# The reference state_dict names are mapped by calm.convert (the checkpoint converter), so these
# tests also check the converter's tables, transposes and per-head splits.


def load_reference_state(npz, cfgs: dict[str, config_lib.ModelConfig]
                         ) -> dict[str, dict[str, np.ndarray]]:
  """Fixture arrays → {"autoencoder"|"calm"|"ar": {our param path: float32 array}}."""
  w = {k[2:]: npz[k] for k in npz.files if k.startswith("w/")}
  ar = {k[3:]: npz[k] for k in npz.files if k.startswith("ar/")}
  np.testing.assert_array_equal(w["ae_model.decoder.lm_head_weight"],
                                w["ae_model.encoder.embed_tokens.weight"])
  out = {}
  for stage, weights in (("autoencoder", w), ("calm", w), ("ar", ar)):
    # normalize: ae_model.* prefix and tied lm_head for the AE, generative_head.* aliases for CALM
    named = convert.normalize(weights, stage, cfgs[stage], where=f"fixture {stage}")
    out[stage] = convert.to_params(named, stage, cfgs[stage], where=f"fixture {stage}")
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


def _backbone(section: dict) -> config_lib.BackboneConfig:
  return config_lib.BackboneConfig(
      hidden_dim=section["hidden"], num_layers=section["layers"], num_heads=section["heads"],
      num_kv_heads=section.get("kv_heads", section["heads"]), ffn_dim=section["ffn"],
      rope_theta=section["rope_theta"], norm_eps=section["rms_eps"])


def fixture_configs(meta: dict) -> dict[str, config_lib.ModelConfig]:
  """One model config per stage, each backbone from its own section of the fixture's meta (the
  AR baseline need not have the CALM backbone's sizes)."""
  c = meta["calm"]
  calm = config_lib.ModelConfig(
      vocab_size=meta["vocab"], chunk_size=meta["K"], latent_dim=meta["latent"],
      autoencoder=config_lib.AutoencoderConfig(
          hidden_dim=meta["ae"]["hidden"], ffn_dim=meta["ae"]["ffn"],
          num_encoder_layers=meta["ae"]["enc_layers"], num_decoder_layers=meta["ae"]["dec_layers"],
          norm_eps=meta["ae"]["rms_eps"]),
      backbone=_backbone(c),
      head=config_lib.HeadConfig(noise_dim=c["noise"], num_blocks=c["head_blocks"],
                                 norm_eps=c["ln_eps"]))
  ar = dataclasses.replace(calm, backbone=_backbone(meta["ar"]))
  return {"autoencoder": calm, "calm": calm, "ar": ar}


def test_fixture_configs_take_each_model_from_its_own_section():
  meta = {"vocab": 64, "K": 2, "latent": 4,
          "ae": {"hidden": 8, "ffn": 16, "enc_layers": 2, "dec_layers": 2, "rms_eps": 1e-6},
          "calm": {"hidden": 16, "ffn": 32, "layers": 2, "heads": 2, "kv_heads": 1,
                   "head_blocks": 1, "noise": 4, "rope_theta": 1e4, "rms_eps": 1e-6,
                   "ln_eps": 1e-6},
          "ar": {"hidden": 24, "ffn": 48, "layers": 3, "heads": 3, "rope_theta": 5e5,
                 "rms_eps": 1e-5}}
  cfgs = fixture_configs(meta)
  b, a = cfgs["calm"].backbone, cfgs["ar"].backbone
  assert (b.hidden_dim, b.num_layers, b.num_heads, b.num_kv_heads) == (16, 2, 2, 1)
  assert (a.hidden_dim, a.ffn_dim, a.num_layers, a.num_heads, a.num_kv_heads) == (24, 48, 3, 3, 3)
  assert (a.rope_theta, a.norm_eps) == (5e5, 1e-5)
  assert cfgs["autoencoder"].autoencoder.hidden_dim == 8
  ar = nnx.eval_shape(lambda: ARModel(cfgs["ar"], rngs=nnx.Rngs(0)))
  assert len(ar.backbone.layers) == 3


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def ref():
  npz, meta = load_fixture(FIXTURE)
  cfgs = fixture_configs(meta)
  cfg = cfgs["calm"]
  state = load_reference_state(npz, cfgs)
  ae = Autoencoder(cfgs["autoencoder"], rngs=nnx.Rngs(0))
  calm = CALM(cfg, rngs=nnx.Rngs(0))
  ar = ARModel(cfgs["ar"], rngs=nnx.Rngs(0))
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
  z = calm.generator(jnp.asarray(data["out/backbone_hidden"]), jnp.asarray(data["in/head_noise"]))
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
