"""Reference checkpoint conversion: fixture parity after conversion, round trips, errors."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from calm import checkpoint, config as config_lib, convert, paths, run
from calm.cli import conversion
from calm.errors import CalmError, cli
from calm.models.autoencoder import Autoencoder
from calm.stages import get_stage

from conftest import ROOT, SHARED

FIXTURE = SHARED / "fixtures" / "reference_tiny.npz"


def _close(got, want, rtol=1e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.max(np.abs(want)))


def _write_hf(d: pathlib.Path, cfg: dict, weights: dict, fmt: str = "safetensors") -> pathlib.Path:
  d.mkdir(parents=True, exist_ok=True)
  (d / "config.json").write_text(json.dumps(cfg))
  weights = {k: np.ascontiguousarray(v) for k, v in weights.items()}
  if fmt == "safetensors":
    save_file(weights, str(d / "model.safetensors"))
  else:
    np.savez(d / "model.npz", **weights)
  return d


# ----------------------------------------------------------------------------- fixture parity


def _fixture_sources(tmp: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path, dict]:
  """The fixture written as three Hugging Face-style directories (safetensors + config.json)."""
  if not FIXTURE.is_file():
    pytest.skip(f"{FIXTURE} not present")
  z = np.load(FIXTURE)
  meta = json.loads(str(z["meta"]))
  w = {k[2:]: z[k] for k in z.files if k.startswith("w/")}
  a, c, r = meta["ae"], meta["calm"], meta["ar"]
  ae_cfg = {"architectures": ["Autoencoder"], "torch_dtype": "float32", "vocab_size": meta["vocab"],
            "hidden_size": a["hidden"], "intermediate_size": a["ffn"],
            "num_encoder_layers": a["enc_layers"], "num_decoder_layers": a["dec_layers"],
            "latent_size": meta["latent"], "patch_size": meta["K"], "rms_norm_eps": a["rms_eps"],
            "ae_dropout": 0.15, "kl_weight": 1e-3, "kl_clamp": 0.5}
  # the CALM config spelled with the fixture's own short names (aliases)
  calm_cfg = {"vocab": meta["vocab"], "K": meta["K"], "latent": meta["latent"],
              "hidden": c["hidden"], "ffn": c["ffn"], "layers": c["layers"], "heads": c["heads"],
              "kv_heads": c["kv_heads"], "head_blocks": c["head_blocks"], "noise": c["noise"],
              "rope_theta": c["rope_theta"], "rms_eps": c["rms_eps"], "ln_eps": c["ln_eps"],
              "transformers_version": meta["transformers"]}
  llama_cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
               "vocab_size": meta["vocab"], "hidden_size": r["hidden"],
               "intermediate_size": r["ffn"], "num_hidden_layers": r["layers"],
               "num_attention_heads": r["heads"], "num_key_value_heads": r["heads"],
               "rope_theta": r["rope_theta"], "rms_norm_eps": r["rms_eps"], "hidden_act": "silu",
               "tie_word_embeddings": False, "max_position_embeddings": 128,
               "attention_bias": False, "rope_scaling": None}
  # AE with bare names; CALM with everything (ae_model.*, generative_head.* aliases included)
  ae = {k[len("ae_model."):]: v for k, v in w.items() if k.startswith("ae_model.")}
  ar = {k[3:]: z[k] for k in z.files if k.startswith("ar/")}
  data = {k: z[k] for k in z.files if k.startswith(("in/", "out/"))}
  return (_write_hf(tmp / "ref_ae", ae_cfg, ae), _write_hf(tmp / "ref_calm", calm_cfg, w),
          _write_hf(tmp / "ref_llama", llama_cfg, ar), data)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("fixture")
  ae_src, calm_src, llama_src, data = _fixture_sources(tmp)
  (ae_src / "tokenizer.json").write_text("{}")
  runs = convert.convert(tmp / "run", ae=ae_src, calm=calm_src, llama=llama_src)
  loaded = {s: run.load_model(d, expect_stage=s) for s, d in runs.items()}
  return runs, loaded, data


@functools.partial(jax.jit, static_argnums=0)
def _fixture_outputs(graphdefs, states, ids_BT, mu_logstd, hidden, noise):
  ae, calm, ar = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
  ids_BSK = ids_BT.reshape(ids_BT.shape[0], -1, calm.chunk_size)
  mu, logstd = ae.encode(ids_BSK)
  logits = ae.decode(mu_logstd[..., :mu.shape[-1]])
  h, _ = calm.hidden(ids_BSK[:, :-1])
  return {"out/ae_encoder": jnp.concatenate([mu, logstd], -1),
          "out/ae_decoder_logits": logits.reshape(logits.shape[0], -1, logits.shape[-1]),
          "out/embed_proj": calm.compress_chunks(ids_BSK[:, :-1]),
          "out/backbone_hidden": h,
          "out/head_samples": calm.generator(hidden, noise),
          "out/ar_logits": ar(ids_BT)[0]}


def test_fixture_converted_outputs_match_reference(converted):
  _, loaded, data = converted
  graphdefs, states = zip(*(nnx.split(loaded[s].model) for s in ("autoencoder", "calm", "ar")))
  got = _fixture_outputs(graphdefs, jax.device_get(states), data["in/input_ids"].astype(np.int32),
                         data["out/ae_encoder"], data["out/backbone_hidden"],
                         data["in/head_noise"])
  for k, v in got.items():
    _close(v, data[k])


def test_fixture_converted_runs_are_usable(converted):
  runs, loaded, _ = converted
  calm_cfg = loaded["calm"].config
  assert calm_cfg.train.autoencoder == str(runs["autoencoder"])
  assert loaded["calm"].metadata["autoencoder_fingerprint"] == checkpoint.fingerprint(
      runs["autoencoder"])[1]
  # the CALM run's architecture agrees with its autoencoder's (what the trainer checks)
  checkpoint.check_compatible(loaded["autoencoder"].metadata, calm_cfg, checkpoint.arch_keys(
      "autoencoder"))
  assert (runs["calm"] / "tokenizer.json").is_file()
  assert calm_cfg.data.tokenizer == str(runs["calm"] / "tokenizer.json")
  assert not loaded["ar"].config.model.tie_ar_embeddings
  yaml_cfg = paths.load_config(runs["calm"] / "config.yaml")
  assert paths.portable(yaml_cfg) == paths.portable(calm_cfg)
  assert yaml_cfg.run_dir == str(runs["calm"])


def _load_by_reference_rules(path: pathlib.Path, expected: dict[str, tuple[int, ...]]
                             ) -> dict[str, np.ndarray]:
  """A safetensors file read the way the reference's `from_pretrained` fills a model: each
  parameter by its exact name and shape, no tying or aliasing (a missing one would stay
  uninitialised there, so it fails here)."""
  from safetensors import safe_open

  with safe_open(str(path), "numpy") as f:
    stored = {k: f.get_tensor(k) for k in f.keys()}
  missing = sorted(set(expected) - set(stored))
  assert not missing, f"parameters the reference would leave uninitialised: {missing}"
  assert set(stored) == set(expected), sorted(set(stored) - set(expected))
  for k, shape in expected.items():
    assert stored[k].shape == shape, (k, stored[k].shape, shape)
  return stored


def test_exported_autoencoder_loads_by_the_reference_rules(tmp_path):
  """Fixture AE → our run → export → read back by exact reference names (the fixture's own
  state_dict names) → the reference decoder (logits against `decoder.lm_head_weight`) gives the
  logits of the run before export, and the fixture's."""
  from test_parity import assign

  ae_src, _, _, data = _fixture_sources(tmp_path)
  z = np.load(FIXTURE)
  expected = {k[len("w/ae_model."):]: z[k].shape for k in z.files if k.startswith("w/ae_model.")}
  assert "decoder.lm_head_weight" in expected and "encoder.embed_tokens.weight" in expected
  ae_run = convert.convert(tmp_path / "run", ae=ae_src)["autoencoder"]
  loaded = run.load_model(ae_run, expect_stage="autoencoder")
  mu = jnp.asarray(data["out/ae_encoder"][..., :loaded.config.model.latent_dim])
  before = np.asarray(loaded.model.decode(mu))

  ref = convert.export_reference(ae_run, tmp_path / "export", "safetensors")
  state = _load_by_reference_rules(ref / "model.safetensors", expected)
  body = {k: v for k, v in state.items() if k != "decoder.lm_head_weight"}
  ae = Autoencoder(loaded.config.model, rngs=nnx.Rngs(0))
  assign(ae, convert.to_params(body, "autoencoder", loaded.config.model))
  after = np.einsum("bskd,vd->bskv", np.asarray(ae.decode_hidden(mu), np.float64),
                    state["decoder.lm_head_weight"].astype(np.float64))
  _close(after, before)
  _close(after.reshape(after.shape[0], -1, after.shape[-1]), data["out/ae_decoder_logits"])


# ----------------------------------------------------------------------------- round trips

VARIANTS = {
    # K=2, latent 8, 1 kv head for 2 heads, 1 backbone layer, AE 1+3, 1 head block, tied AR
    "k2": {"model.chunk_size": 2, "model.latent_dim": 8, "model.vocab_size": 40,
           "model.autoencoder.hidden_dim": 12, "model.autoencoder.ffn_dim": 20,
           "model.autoencoder.num_encoder_layers": 1, "model.autoencoder.num_decoder_layers": 3,
           "model.backbone.hidden_dim": 16, "model.backbone.num_heads": 2,
           "model.backbone.num_kv_heads": 1, "model.backbone.num_layers": 1,
           "model.backbone.ffn_dim": 24, "model.backbone.rope_theta": 500.0,
           "model.head.noise_dim": 4, "model.head.num_blocks": 1, "model.tie_ar_embeddings": True},
    # K=8, latent 24, 4 heads on 2 kv heads, 3 backbone layers, AE 3+1, 3 head blocks, untied AR
    "k8": {"model.chunk_size": 8, "model.latent_dim": 24, "model.vocab_size": 48,
           "model.autoencoder.hidden_dim": 16, "model.autoencoder.ffn_dim": 24,
           "model.autoencoder.num_encoder_layers": 3, "model.autoencoder.num_decoder_layers": 1,
           "model.autoencoder.norm_eps": 1e-5, "model.backbone.hidden_dim": 32,
           "model.backbone.num_heads": 4, "model.backbone.num_kv_heads": 2,
           "model.backbone.num_layers": 3, "model.backbone.ffn_dim": 40,
           "model.head.noise_dim": 6, "model.head.num_blocks": 3, "model.head.norm_eps": 1e-5,
           "model.tie_ar_embeddings": False},
}


def _random_run(run_dir: pathlib.Path, cfg: config_lib.Config, seed: int) -> nnx.Module:
  """A model with every parameter random (none zero or one), saved as a trainer would."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: get_stage(cfg).build(cfg.model,
                                                                              nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.5, x.shape), jnp.float32), abstract)
  model = nnx.merge(graphdef, state)
  meta = {"stage": cfg.stage, "config": config_lib.to_dict(cfg),
          "autoencoder": cfg.train.autoencoder}
  with checkpoint.Checkpointer(run_dir, cfg.checkpoint, metadata=meta) as ckpt:
    ckpt.save_now(3, params=nnx.state(model))
  return model


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(stage: str, graphdef, state, ids_BT: jax.Array) -> tuple[jax.Array, ...]:
  """Every output of a stage's model on a batch of tokens."""
  model = nnx.merge(graphdef, state)
  if stage == "ar":
    return model(ids_BT)[0],
  ids_BSK = ids_BT.reshape(ids_BT.shape[0], -1, model.chunk_size)
  if stage == "autoencoder":
    mu, logstd = model.encode(ids_BSK)
    return mu, logstd, model.decode(mu + jnp.exp(logstd))
  h, _ = model.hidden(ids_BSK)
  return h, model.sample(h, jax.random.key(1), 3)


def _outputs(stage: str, model: nnx.Module, ids_BT: jax.Array) -> list[np.ndarray]:
  graphdef, state = nnx.split(model)
  return [np.asarray(x) for x in _forward(stage, graphdef, jax.device_get(state), ids_BT)]


def _described(m: config_lib.ModelConfig, stage: str) -> dict:
  """The ModelConfig fields a stage's reference config.json describes."""
  d = config_lib.to_dict(m)
  d.pop("dtype")
  if stage != "ar":
    d.pop("tie_ar_embeddings")
  if stage == "autoencoder":
    d.pop("backbone"), d.pop("head")
  if stage == "ar":
    d = {"vocab_size": d["vocab_size"], "backbone": d["backbone"], "tie": d["tie_ar_embeddings"]}
  return d


def _flat(module) -> dict[str, np.ndarray]:
  return {".".join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.mark.parametrize("variant,fmt", [("k2", "npz"), ("k8", "safetensors")])
def test_round_trip(tmp_path, variant, fmt):
  base = config_lib.replace(config_lib.load(ROOT / "configs" / "tiny.yaml"),
                            **{"checkpoint.async_save": False, **VARIANTS[variant]})
  ae_cfg = config_lib.replace(base, stage="autoencoder", run_dir=str(tmp_path / "ae"))
  calm_cfg = config_lib.replace(base, stage="calm", run_dir=str(tmp_path / "calm"),
                                **{"train.autoencoder": str(tmp_path / "ae")})
  ar_cfg = config_lib.replace(base, stage="ar", run_dir=str(tmp_path / "ar"))
  models = {"autoencoder": _random_run(tmp_path / "ae", ae_cfg, 1),
            "calm": _random_run(tmp_path / "calm", calm_cfg, 2),
            "ar": _random_run(tmp_path / "ar", ar_cfg, 3)}
  refs = {s: convert.export_reference(tmp_path / d, tmp_path / f"ref_{d}", fmt)
          for s, d in (("autoencoder", "ae"), ("calm", "calm"), ("ar", "ar"))}
  assert (refs["ar"] / f"model.{fmt}").is_file()
  # the reference's training / evaluation script accepts only energy, diffusion and flow
  assert json.loads((refs["calm"] / "config.json").read_text())["model_type"] == "energy"
  if base.model.tie_ar_embeddings:  # HF drops the tied lm_head
    assert "lm_head.weight" not in convert.read_weights(refs["ar"])
  runs = convert.convert(tmp_path / "out", ae=refs["autoencoder"], calm=refs["calm"],
                         llama=refs["ar"])
  K, V = base.model.chunk_size, base.model.vocab_size
  ids = jax.random.randint(jax.random.key(0), (2, 4 * K), 0, V)
  for stage, model in models.items():
    loaded = run.load_model(runs[stage], expect_stage=stage)
    assert _described(loaded.config.model, stage) == _described(base.model, stage)
    want, got = _flat(model), _flat(loaded.model)
    assert want.keys() == got.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{stage} {k}")
    # identical outputs
    got, want = _outputs(stage, loaded.model, ids), _outputs(stage, model, ids)
    assert all(np.std(w) > 0 for w in want)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w, err_msg=stage)


def test_reference_names_layouts():
  """q/k/v/o are split per head the torch way: row r of q_proj is head r // head_dim."""
  cfg = config_lib.replace(config_lib.ModelConfig(), **{
      "backbone.hidden_dim": 8, "backbone.num_heads": 2, "backbone.num_kv_heads": 1,
      "backbone.num_layers": 1, "vocab_size": 16})
  params = convert.expected_params("ar", cfg)
  flat = {k: np.arange(np.prod(s), dtype=np.float32).reshape(s) for k, s in params.items()}
  ref = convert.from_params(flat, "ar", cfg)
  q = ref["model.layers.0.self_attn.q_proj.weight"]  # (heads·head_dim, D)
  assert q.shape == (8, 8) and ref["model.layers.0.self_attn.k_proj.weight"].shape == (4, 8)
  ours_q = flat["backbone.layers.0.attn.q"]  # [D, heads, head_dim]
  np.testing.assert_array_equal(q[4 + 1], ours_q[:, 1, 1])
  o = ref["model.layers.0.self_attn.o_proj.weight"]  # (D, heads·head_dim)
  np.testing.assert_array_equal(o[:, 4 + 2], flat["backbone.layers.0.attn.o"][1, 2])
  np.testing.assert_array_equal(ref["lm_head.weight"], flat["lm_head.kernel"].T)
  back = convert.to_params(ref, "ar", cfg)
  assert all(np.array_equal(back[k], flat[k]) for k in flat)


def _bf16_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
  """Writes float32 arrays (exactly representable in bfloat16) as a BF16 safetensors file."""
  header, blobs, offset = {}, [], 0
  for k, v in tensors.items():
    u32 = np.ascontiguousarray(v, np.float32).view(np.uint32)
    assert not np.any(u32 & 0xFFFF)
    blob = (u32 >> 16).astype("<u2").tobytes()
    header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [offset,
                                                                          offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_read_weights_bf16_and_shards(tmp_path):
  a = np.array([[1.0, -2.5, 0.15625], [24576.0, -0.0, 7.0]], np.float32)
  b = np.arange(6, dtype=np.float32).reshape(3, 2) / 8
  _bf16_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"x.a": a})
  save_file({"x.b": b, "x.c": b.T.copy()}, str(tmp_path / "model-00002-of-00002.safetensors"))
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
      "x.a": "model-00001-of-00002.safetensors", "x.b": "model-00002-of-00002.safetensors",
      "x.c": "model-00002-of-00002.safetensors"}}))
  w = convert.read_weights(tmp_path)
  assert sorted(w) == ["x.a", "x.b", "x.c"]
  np.testing.assert_array_equal(w["x.a"], a)
  np.testing.assert_array_equal(w["x.c"], b.T)
  assert w["x.a"].dtype == np.float32


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small_ref(tmp_path_factory):
  """A tiny exported autoencoder + Llama reference directory pair."""
  tmp = tmp_path_factory.mktemp("small")
  base = config_lib.replace(config_lib.load(ROOT / "configs" / "tiny.yaml"), **{
      "checkpoint.async_save": False, **VARIANTS["k2"]})
  out = {}
  for stage in ("autoencoder", "ar"):
    cfg = config_lib.replace(base, stage=stage, run_dir=str(tmp / stage))
    _random_run(tmp / stage, cfg, 0)
    out[stage] = convert.export_reference(tmp / stage, tmp / f"ref_{stage}", "npz")
  return out


def _variant(src: pathlib.Path, dst: pathlib.Path, *, weights=None, config=None) -> pathlib.Path:
  w = convert.read_weights(src)
  c = json.loads((src / "config.json").read_text())
  return _write_hf(dst, config(c) if config else c, weights(w) if weights else w, "npz")


def _error(fn) -> str:
  with pytest.raises(CalmError) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg
  return msg


def test_error_missing_tensor(small_ref, tmp_path):
  name = "encoder.encoder_layers.0.mlp.up_proj.weight"
  src = _variant(small_ref["autoencoder"], tmp_path / "src",
                 weights=lambda w: {k: v for k, v in w.items() if k != name})
  msg = _error(lambda: convert.convert(tmp_path / "out", ae=src))
  assert "missing 1 tensor(s)" in msg and name in msg
  assert not (tmp_path / "out").exists()  # nothing written


def test_error_extra_tensor(small_ref, tmp_path):
  src = _variant(small_ref["ar"], tmp_path / "src",
                 weights=lambda w: {**w, "model.layers.0.self_attn.q_proj.bias": np.zeros(16)})
  msg = _error(lambda: convert.convert(tmp_path / "out", llama=src))
  assert "1 unexpected tensor(s): model.layers.0.self_attn.q_proj.bias" in msg


def test_error_wrong_shape(small_ref, tmp_path):
  name = "model.layers.0.self_attn.k_proj.weight"
  src = _variant(small_ref["ar"], tmp_path / "src",
                 weights=lambda w: {**w, name: np.zeros((16, 16), np.float32)})
  msg = _error(lambda: convert.convert(tmp_path / "out", llama=src))
  assert f"wrong shape: {name} (16, 16) (expected (8, 16))" in msg


def test_error_untied_alias(small_ref, tmp_path):
  src = _variant(small_ref["autoencoder"], tmp_path / "src",
                 weights=lambda w: {**w, "decoder.lm_head_weight":
                                    w["encoder.embed_tokens.weight"] + 1})
  assert "should be tied" in _error(lambda: convert.convert(tmp_path / "out", ae=src))


def test_error_config(small_ref, tmp_path):
  src = _variant(small_ref["ar"], tmp_path / "a",
                 config=lambda c: {**c, "sliding_window": 64, "num_experts": 4})
  msg = _error(lambda: convert.convert(tmp_path / "out", llama=src))
  assert "unknown config field(s) num_experts, sliding_window" in msg
  runs = convert.convert(tmp_path / "out", llama=src,
                         ignore_fields=["sliding_window", "num_experts"])
  assert runs["ar"].is_dir()
  src = _variant(small_ref["ar"], tmp_path / "b", config=lambda c: {**c, "attention_bias": True})
  assert "attention_bias" in _error(lambda: convert.convert(tmp_path / "out2", llama=src))
  src = _variant(small_ref["ar"], tmp_path / "c",
                 config=lambda c: {k: v for k, v in c.items() if k != "hidden_size"})
  assert "missing required field(s) hidden_size" in _error(
      lambda: convert.convert(tmp_path / "out3", llama=src))
  (src / "config.json").unlink()
  msg = _error(lambda: convert.convert(tmp_path / "o4", llama=src))
  assert msg == f"{src / 'config.json'} not found: a checkpoint directory needs its config.json"


def test_error_torch_bin_without_torch(small_ref, tmp_path, monkeypatch):
  src = tmp_path / "src"
  src.mkdir()
  (src / "config.json").write_text((small_ref["ar"] / "config.json").read_text())
  (src / "pytorch_model.bin").write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch → ImportError
  msg = _error(lambda: convert.convert(tmp_path / "out", llama=src))
  assert "needs PyTorch" in msg and "pip install" in msg


def test_error_mismatched_calm_and_ae(small_ref, tmp_path):
  ae = small_ref["autoencoder"]
  calm = _write_hf(tmp_path / "calm", {"vocab_size": 41, "patch_size": 2, "latent_size": 8,
                                       "hidden_size": 16, "intermediate_size": 24,
                                       "num_hidden_layers": 1, "num_attention_heads": 2,
                                       "noise_size": 4, "num_mlp_layers": 1}, {"x": np.zeros(1)})
  msg = _error(lambda: convert.convert(tmp_path / "out", ae=ae, calm=calm))
  assert msg.startswith("vocab_size: 40 in ") and "41" in msg


def test_config_fields(tmp_path):
  llama = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 4, "dtype": "bfloat16", "_name_or_path": "x",
           "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "head_dim": 8}
  f = convert.config_fields(llama, "ar")
  assert f["model.backbone.rope_theta"] == 5e5 and f["model.backbone.num_kv_heads"] == 4
  assert f["model.tie_ar_embeddings"] is False and "model.backbone.norm_eps" not in f
  assert convert.config_fields({**llama, "heads": 4}, "ar")["model.backbone.num_heads"] == 4
  with pytest.raises(CalmError, match="heads=2 contradicts num_attention_heads=4"):
    convert.config_fields({**llama, "heads": 2}, "ar")
  with pytest.raises(CalmError, match="head_dim=16"):
    convert.config_fields({**llama, "head_dim": 16}, "ar")
  with pytest.raises(CalmError, match="rope_scaling"):
    convert.config_fields({**llama, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "ar")
  ae = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "latent_size": 8,
        "patch_size": 4, "ae_num_layers": 3, "ae_dropout": 0.1}
  f = convert.config_fields(ae, "autoencoder")
  assert (f["model.autoencoder.num_encoder_layers"], f["model.autoencoder.num_decoder_layers"],
          f["model.autoencoder.token_dropout"], f["model.autoencoder.latent_dropout"]) == (
              3, 3, 0.1, 0.1)
  with pytest.raises(CalmError, match="invalid model: model.backbone.num_heads"):
    convert.runs._prepare("ar", tmp_path, tmp_path / "x", convert.config_fields(
        {**llama, "num_attention_heads": 5, "head_dim": None}, "ar"), {})


def test_cli_exit_code(small_ref, tmp_path, capsys):
  src = _variant(small_ref["ar"], tmp_path / "src", config=lambda c: {**c, "foo": 1})
  assert cli(conversion.main)(["--llama", str(src), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "foo" in err
  assert cli(conversion.main)(["--calm", str(src), "--out", str(tmp_path / "o")]) == 2
  assert "--calm needs --ae" in capsys.readouterr().err
  run = cli(conversion.main)(["--llama", str(small_ref["ar"]), "--out", str(tmp_path / "ok")])
  assert run == 0 and (tmp_path / "ok" / "ar" / "checkpoints" / "0").is_dir()
  assert cli(conversion.main)(["--export", str(tmp_path / "ok" / "ar"), "--format", "npz",
                            "--out", str(tmp_path / "back")]) == 0
  back, ref = convert.read_weights(tmp_path / "back"), convert.read_weights(small_ref["ar"])
  assert back.keys() == ref.keys()
  assert all(np.array_equal(back[k], ref[k]) for k in ref)


def test_cli_subprocess(small_ref, tmp_path):
  """`python -m calm.convert` converts, and exits 2 with one line (no traceback) on errors."""
  out = tmp_path / "run"
  ok = subprocess.run([sys.executable, "-m", "calm.convert", "--llama", str(small_ref["ar"]),
                       "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr
  assert (out / "ar" / "config.yaml").is_file()
  bad = subprocess.run([sys.executable, "-m", "calm.convert", "--llama", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().startswith("error: ") and bad.stderr.count("\n") == 1


def _snapshot(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_checks_its_out_then_writes(small_ref, tmp_path, capsys):
  """An export refuses a non-empty --out without --force (leaving it byte-identical); with
  --force the other format's stale weights go; files get the mode a new file gets."""
  runs = {s: convert.convert(tmp_path / s, **{"ae" if s == "autoencoder" else "llama":
                                              small_ref[s]})[s] for s in ("ar", "autoencoder")}
  out = tmp_path / "export"
  export = lambda *a: cli(conversion.main)(["--out", str(out), *a])
  assert export("--export", str(runs["ar"])) == 0
  capsys.readouterr()
  umask = os.umask(0)
  os.umask(umask)
  modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
  assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
  before = _snapshot(out)
  assert export("--export", str(runs["autoencoder"]), "--format", "npz") == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "--force" in err and "\n" not in err
  assert _snapshot(out) == before
  assert export("--export", str(runs["autoencoder"]), "--format", "npz", "--force") == 0
  assert "model.safetensors" not in {p.name for p in out.iterdir()}
  back, ref = convert.read_weights(out), convert.read_weights(small_ref["autoencoder"])
  assert back.keys() == ref.keys() and all(np.array_equal(back[k], ref[k]) for k in ref)
  assert json.loads((out / "config.json").read_text()) == json.loads(
      (small_ref["autoencoder"] / "config.json").read_text())
  assert not [p for p in out.iterdir() if p.name.startswith(".")]
  a_file = tmp_path / "a-file"
  a_file.write_text("keep me")
  for bad in ("", str(a_file), str(a_file / "sub")):
    code = cli(conversion.main)(["--export", str(runs["ar"]), "--out", bad])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --out") and "\n" not in err, (bad, err)
  assert a_file.read_text() == "keep me"
