"""Inference precision (calm.quantize): int8 / bf16 weights and a bf16 KV cache."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.layout import Format, Layout

import calm
from calm import config as config_lib
from calm import engine, losses, quantize, sampling, stages
from calm.errors import CalmError
from calm.models.ar import ARModel
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM

from conftest import ROOT
from test_heads import CHI2_DF5_999, P, TABLE, stub_calm

HEADS = ["energy", "flow", "diffusion"]


def tiny(kind="energy", stage="calm"):
  return config_lib.load(ROOT / "configs" / "tiny.yaml",
                         [f"model.head.kind={kind}", "model.head.flow_steps=3",
                          "model.head.sampling_steps=5", f"stage={stage}"])


def test_int8_is_per_channel_absmax():
  """Each output channel's error is at most half its step; a zero channel stays exactly zero."""
  w = jax.random.normal(jax.random.key(0), (64, 8)) * jnp.arange(8.0)  # column 0 is zero
  q = quantize.quantize_int8(w, quantize.channel_axes("kernel", 2))
  assert q.qvalue.dtype == jnp.int8 and q.scale.shape == (1, 8)
  np.testing.assert_allclose(q.scale[0, 1:], jnp.max(jnp.abs(w[:, 1:]), 0) / 127.5, rtol=1e-6)
  err = jnp.abs(q[...] - w)
  assert bool(jnp.all(err <= 0.5 * q.scale * (1 + 1e-5)))
  assert float(jnp.abs(q[:, 0]).max()) == 0.0
  # the attention output [heads, head_dim, embed] is scaled per embed channel, a table per row
  assert quantize.channel_axes("o", 3) == (2,) and quantize.channel_axes("table", 2) == (0,)
  assert quantize.channel_axes("q", 3) == (1, 2)


@pytest.mark.parametrize("kind", HEADS)
def test_quantized_models_are_finite_and_close(kind):
  """Every head kind: int8 and bf16 weights give finite samples and losses, and the head's
  samples move little from float32's (same noise)."""
  cfg = tiny(kind).model
  ids = jax.random.randint(jax.random.key(0), (2, 16), 4, cfg.vocab_size)
  ref_m = CALM(cfg, rngs=nnx.Rngs(1))
  h = jax.random.normal(jax.random.key(1), (2, cfg.backbone.hidden_dim))
  draw = jax.jit(lambda gd, st: nnx.merge(gd, st).draw(h, jax.random.key(2), 3),
                 static_argnums=0)
  ref = draw(*nnx.split(ref_m))
  for weights in ("bf16", "int8"):
    m = quantize.apply(CALM(cfg, rngs=nnx.Rngs(1)), weights, "bf16")
    assert quantize.weight_bytes(m) < 0.55 * quantize.weight_bytes(ref_m)
    z = draw(*nnx.split(m))
    assert bool(jnp.all(jnp.isfinite(z)))
    assert float(jnp.abs(z - ref).max()) < 0.05 * float(jnp.abs(ref).max()) + 1e-3
  ae = quantize.apply(Autoencoder(cfg, rngs=nnx.Rngs(2)), "int8")
  loss = jax.jit(lambda m, ae: losses.calm_loss(m, ae, ids, jax.random.key(3), cfg)[0])
  assert np.isfinite(float(loss(m, ae)))


def test_int8_weights_are_under_30_percent():
  """Tiny models and, built abstractly, the paper-size CALM-M and Transformer-S."""
  for stage in ("autoencoder", "calm", "ar"):
    cfg = tiny(stage=stage)
    f32 = quantize.weight_bytes(stages.get_stage(cfg).build(cfg.model, nnx.Rngs(0)))
    q = quantize.weight_bytes(quantize.apply(stages.get_stage(cfg).build(cfg.model,
                                                                          nnx.Rngs(0)), "int8"))
    assert q <= 0.30 * f32, (stage, q / f32)
  for name in ("calm_m", "transformer_s"):
    cfg = config_lib.load(ROOT / "configs" / f"{name}.yaml")
    build = lambda w: quantize.apply(stages.get_stage(cfg).build(cfg.model, nnx.Rngs(0)), w)
    size = lambda w: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        jax.eval_shape(lambda: nnx.state(build(w), nnx.Param))))
    assert size("int8") <= 0.26 * size("float32")
    assert size("bf16") == pytest.approx(0.5 * size("float32"), rel=0.01)


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_exact_sampler_on_quantized_stub_heads(kind, weights="int8"):
  """The exact sampler still draws chunks ∝ P^{1/T} when the head runs on quantized weights
  (quantisation changes the model, not the sampler's rule)."""
  calm_m, ae = stub_calm(kind)
  quantize.apply(calm_m, weights)
  kernel = calm_m.generator.net.blocks[0].ada.kernel.get_value()
  assert isinstance(kernel, quantize.Int8Weight) if weights == "int8" else (
      kernel.dtype == jnp.bfloat16)
  T, B = 1 / 2, 8000
  sampler = sampling.ChunkSampler(T, "exact", max_attempts=2000)
  h_BD = jnp.zeros((B, 8))
  chunks, draws = jax.jit(lambda k: sampling.next_chunk(calm_m, ae, h_BD, k, sampler))(
      jax.random.key(1))
  assert int(jnp.min(draws)) > 0
  idx = np.asarray(jnp.argmax(jnp.all(chunks[:, None] == TABLE[None], -1), -1))
  q = P ** (1 / T) / np.sum(P ** (1 / T))
  counts = np.bincount(idx, minlength=6)
  assert float(((counts - B * q) ** 2 / (B * q)).sum()) < CHI2_DF5_999


def test_int8_matrices_are_stored_in_the_tiling_a_tpu_step_reads(monkeypatch):
  """On a TPU (its default layouts stood in for here) an int8 matrix keeps the default dimension
  order and gets (8, 128) tiles instead of (32, 128); other leaves, small int8 matrices and
  every leaf on another platform keep the platform's default (the sharding itself)."""
  rep = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  sd = jax.ShapeDtypeStruct
  int8_3d, int8_2d = sd((768, 12, 64), jnp.int8), sd((32000, 768), jnp.int8)
  others = [sd((768, 3072), jnp.bfloat16), sd((768, 3072), jnp.float32), sd((768,), jnp.int8),
            sd((4, 768), jnp.int8)]
  # on this platform: no change, and `place` hands back the very same arrays
  assert all(quantize.weight_format(x, rep) is rep for x in (int8_3d, int8_2d, *others))
  m = quantize.apply(ARModel(tiny("energy", "ar").model, rngs=nnx.Rngs(0)), "int8")
  st = nnx.state(m, nnx.Param)
  assert all(a is b for a, b in zip(jax.tree.leaves(quantize.place(st)), jax.tree.leaves(st)))

  tpu_defaults = {(768, 12, 64): (1, 2, 0)}  # the v5e defaults of the int8 arrays above

  def default(shape, dtype, sharding):
    m2m = tpu_defaults.get(tuple(shape), tuple(range(len(shape))))
    if len(shape) == 1:
      return Layout(m2m, ((1024,),))
    rows = 4 if shape[m2m[-2]] < 32 else 32  # the second-minor dimension's length
    return Layout(m2m, ((rows, 128), (4, 1)) if dtype == jnp.int8 else ((8, 128), (2, 1)))

  monkeypatch.setattr(quantize, "_default_layout", default)
  for x, m2m in ((int8_3d, (1, 2, 0)), (int8_2d, (0, 1))):
    f = quantize.weight_format(x, rep)
    assert isinstance(f, Format) and f.sharding is rep
    assert f.layout.major_to_minor == m2m and f.layout.tiling == ((8, 128), (4, 1))
  assert all(quantize.weight_format(x, rep) is rep for x in others)


@pytest.mark.parametrize("stage", ["calm", "ar"])
def test_open_generates_with_lower_precision(tiny_runs, stage):
  base = calm.open(tiny_runs / stage)
  for weights, cache in (("int8", None), ("bf16", "bf16"), ("int8", "bf16")):
    r = calm.open(tiny_runs / stage, weights=weights, cache=cache)
    assert r.precision == {"weights": weights, "cache": cache}
    assert quantize.weight_bytes(r.model) < 0.55 * quantize.weight_bytes(base.model)
    if r.autoencoder is not None:  # the decoder and its vocabulary projection too
      table = r.autoencoder.model.embed.table.get_value()
      assert isinstance(table, quantize.Int8Weight) or table.dtype == jnp.bfloat16
    texts = r.generate(["The King said", "It"], max_new_tokens=8, seed=1)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    state = r.engine.prefill([[5, 6, 7, 8]], engine.row_keys([0]), max_new_tokens=8)
    assert state.cache.k.dtype == (jnp.bfloat16 if cache == "bf16" else jnp.float32)
    assert bool(jnp.all(jnp.isfinite(state.carry_BX)))


def test_bad_precision_is_one_line_error(tiny_runs, monkeypatch):
  with pytest.raises(CalmError, match="weights must be one of float32, bf16, int8, got 'int4'"):
    calm.open(tiny_runs / "calm", weights="int4")
  with pytest.raises(CalmError, match="cache must be one of float32, bf16, got 'int8'"):
    calm.open(tiny_runs / "ar", cache="int8")
  monkeypatch.setitem(sys.modules, "qwix", None)  # the quant extra not installed
  with pytest.raises(CalmError, match=r"int8 weights need qwix: pip install 'calm-jax\[quant\]'"):
    calm.open(tiny_runs / "ar", weights="int8")
  calm.open(tiny_runs / "ar", weights="bf16")  # bf16 needs nothing extra


def test_cli_precision_flags(tiny_runs, tmp_path):
  run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, capture_output=True,
                                  text=True, timeout=600)
  out = tmp_path / "rec.json"
  r = run("-m", "calm.evaluate", "--config", f"{tiny_runs}/ae/config.yaml", "--weights", "int8",
          "--out", str(out), "eval.data=data/gutenberg-slice/heldout", "eval.max_documents=8")
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads(out.read_text())
  assert summary["protocol"]["precision"] == {"weights": "int8", "cache": None}
  assert 0.0 <= summary["token_acc"] <= 1.0
  r = run("sample.py", "--config", f"{tiny_runs}/calm/config.yaml", "--weights", "int4",
          "--prompt", "x")
  assert r.returncode == 2 and "invalid choice: 'int4'" in r.stderr
  assert "Traceback" not in r.stderr
