"""Training at scale: gradient accumulation, rematerialisation, attention kernels, bf16 steps."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from calm import config, losses, stages, trainer
from calm.models import attention

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STAGES = ["autoencoder", "calm", "ar"]


def tiny(stage, *overrides):
  return config.load(TINY, [f"stage={stage}", *overrides])


def build(cfg, seed=0):
  """(graphdef, params, ae_graphdef, ae_params) of `cfg.stage` (and its frozen AE for calm)."""
  graphdef, params = nnx.split(stages.get_stage(cfg).build(cfg.model, nnx.Rngs(seed)))
  ae_graphdef = ae_params = None
  if cfg.stage == "calm":
    ae_cfg = config.replace(cfg, stage="autoencoder")
    ae_graphdef, ae_params = nnx.split(stages.get_stage(ae_cfg).build(cfg.model, nnx.Rngs(7)))
  return graphdef, params, ae_graphdef, ae_params


def one_step(cfg, tx, ids, grad_accum=1, seed=0):
  graphdef, params, ae_graphdef, ae_params = build(cfg, seed)
  step, _ = trainer.build_step_fns(stages.get_stage(cfg), graphdef, tx, ae_graphdef, grad_accum)
  new_params, _, m = jax.jit(step)(params, tx.init(params), ids, jax.random.PRNGKey(5), ae_params)
  return params, new_params, m


def ids_for(cfg, rows=8, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (rows, cfg.data.block_tokens), 0,
                            cfg.model.vocab_size, jnp.int32)


def assert_trees_close(a, b, rtol, atol, what=""):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


# ----------------------------------------------------------------------------- accumulation


def test_micro_batches_are_strided_rows():
  x = jnp.arange(8)
  np.testing.assert_array_equal(trainer.micro_batches(x, 4), [[0, 4], [1, 5], [2, 6], [3, 7]])


def test_row_keys_do_not_depend_on_the_batch_split():
  key = jax.random.PRNGKey(3)
  whole = losses.row_keys(key, 8)
  assert losses.row_keys(whole, 8) is whole
  # the noise of a row comes from its own key only: drawing a sub-batch gives the same rows
  draw = lambda k, s: jax.random.normal(k, s)
  full = losses.draw_rows(whole, draw, (8, 3, 5))
  part = losses.draw_rows(trainer.micro_batches(whole, 4)[1], draw, (2, 3, 5))
  np.testing.assert_array_equal(part, full[1::4])
  assert len({float(r[0, 0]) for r in full}) == 8  # rows differ


@pytest.mark.parametrize("stage,head", [(s, "energy") for s in STAGES] +
                         [("calm", "flow"), ("calm", "diffusion")])
def test_grad_accumulation_equals_the_full_batch(stage, head):
  """4 micro-batches of 2 = one batch of 8: loss, metrics, gradients (SGD with lr 1 makes the
  update the gradient) and parameters after an AdamW step, to float32 noise. The stochastic parts
  stay on (AE token/latent dropout and posterior noise, CALM head noise and target draws): each
  row's noise depends on its global index only, so both steps draw the same numbers (the flow and
  diffusion heads' times and noise included)."""
  cfg = tiny(stage, f"model.head.kind={head}")
  ids = ids_for(cfg)
  grads = {}
  for tx, what in ((optax.sgd(1.0), "grads"), (trainer.make_optimizer(cfg.train), "adamw")):
    p0, full, m_full = one_step(cfg, tx, ids)
    _, acc, m_acc = one_step(cfg, tx, ids, grad_accum=4)
    for k in m_full:
      np.testing.assert_allclose(m_acc[k], m_full[k], rtol=2e-5, err_msg=k)
    delta = lambda p: jax.tree.map(jnp.subtract, p, p0)
    assert_trees_close(delta(acc), delta(full), rtol=1e-4, atol=1e-7, what=what)
    grads.setdefault(what, delta(full))
  # another batch gives another step (the comparison can fail)
  p0, other, _ = one_step(cfg, optax.sgd(1.0), ids_for(cfg, seed=1))
  diff = jax.tree.map(lambda a, b, p: float(jnp.max(jnp.abs(a - p - b))), other, grads["grads"], p0)
  assert max(jax.tree.leaves(diff)) > 1e-4


def test_grad_accum_must_divide_the_batch():
  with pytest.raises(config.ConfigError, match="train.grad_accum"):
    tiny("ar", "train.batch_size=8", "train.grad_accum=3")


# ----------------------------------------------------------------------------- layer scan


@pytest.mark.parametrize("stage", ["calm", "ar"])
def test_scanned_layers_keep_parameters_loss_and_gradients(stage):
  """model.scan_layers changes how the step is compiled, not the model: the same parameter tree
  (checkpoints and convert are layout-free), the same loss and gradients, under remat too."""
  cfg = tiny(stage, "model.backbone.num_layers=3")
  ids = ids_for(cfg, rows=4)
  out = {}
  for scan, policy in [(False, "none"), (True, "none"), (True, "minimal")]:
    c = config.replace(cfg, **{"model.scan_layers": scan, "model.remat": policy})
    graphdef, params, ae_graphdef, ae_params = build(c)
    st = stages.get_stage(c)
    ae = None if ae_graphdef is None else nnx.merge(ae_graphdef, ae_params)
    loss = lambda p: st.loss(nnx.merge(graphdef, p), ae, ids, jax.random.PRNGKey(1))[0]
    out[scan, policy] = jax.jit(jax.value_and_grad(loss))(params)
  ref = out[False, "none"]
  for key in [(True, "none"), (True, "minimal")]:
    assert jax.tree.structure(out[key][1]) == jax.tree.structure(ref[1])
    np.testing.assert_allclose(out[key][0], ref[0], rtol=1e-6, err_msg=str(key))
    assert_trees_close(out[key][1], ref[1], rtol=1e-5, atol=1e-7, what=str(key))


def test_scanned_layers_keep_the_kv_cache_paths():
  """Prefill + decode through a KV cache and a BranchCache give the same outputs and caches."""
  from calm.models.transformer import BranchCache
  cfg = tiny("ar", "model.backbone.num_layers=3")
  model = stages.build_model(cfg)
  scanned = stages.build_model(config.replace(cfg, **{"model.scan_layers": True}))
  nnx.update(scanned, nnx.state(model))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, cfg.model.backbone.hidden_dim))
  outs = []
  for m in (model.backbone, scanned.backbone):
    full, _ = m(x)
    y1, c1 = m(x[:, :8], cache=m.init_cache(2, 16))
    y2, c2 = m(x[:, 8:], cache=c1)
    branch = BranchCache.create(c1, jnp.array([[3, 8], [8, 5]]), 4)
    y3, c3 = m(jnp.repeat(x[:, 8:], 2, axis=0), cache=branch)
    outs.append((full, y1, y2, c2.k, c2.v, y3, c3.k))
  np.testing.assert_allclose(outs[0][2], outs[0][0][:, 8:], atol=1e-5)  # the cache is right
  for a, b in zip(*outs):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_scanned_layers_compile_one_layer():
  """The lowered training step has as many matmuls whatever the depth (unrolled: per layer)."""
  def size(layers, scan):
    c = tiny("calm", f"model.backbone.num_layers={layers}", f"model.scan_layers={scan}")
    graphdef, params, ae_graphdef, ae_params = build(c)
    st = stages.get_stage(c)
    ae = nnx.merge(ae_graphdef, ae_params)
    loss = lambda p: st.loss(nnx.merge(graphdef, p), ae, ids_for(c, rows=2),
                             jax.random.PRNGKey(1))[0]
    return jax.jit(jax.grad(loss)).lower(params).as_text().count("dot_general")

  assert size(8, True) == size(2, True)
  assert size(8, False) > size(2, False) + 6 * 10  # ≥ 10 matmuls per layer forward + backward


# ----------------------------------------------------------------------------- remat


@pytest.mark.parametrize("stage,head", [(s, "energy") for s in STAGES] +
                         [("calm", "flow"), ("calm", "diffusion")])
def test_remat_keeps_loss_and_gradients(stage, head):
  """Every policy computes the same function: loss and gradients identical to no remat."""
  cfg = tiny(stage, f"model.head.kind={head}")
  ids = ids_for(cfg, rows=4)
  ref = None
  for policy in ("none", "minimal", "full"):
    c = config.replace(cfg, **{"model.remat": policy})
    graphdef, params, ae_graphdef, ae_params = build(c)
    st = stages.get_stage(c)
    ae = None if ae_graphdef is None else nnx.merge(ae_graphdef, ae_params)

    @jax.jit
    def grads(p):
      return jax.value_and_grad(lambda p: st.loss(nnx.merge(graphdef, p), ae, ids,
                                                  jax.random.PRNGKey(1))[0])(p)

    out = grads(params)
    if ref is None:
      ref = out
    else:
      np.testing.assert_allclose(out[0], ref[0], rtol=1e-6, err_msg=policy)
      assert_trees_close(out[1], ref[1], rtol=1e-5, atol=1e-7, what=policy)


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_remat_covers_the_flow_and_diffusion_networks(kind):
  """Every adaLN block of the head's network runs under jax.checkpoint when model.remat is set."""
  counts = {}
  for policy in ("none", "minimal"):
    cfg = tiny("calm", f"model.head.kind={kind}", "model.head.num_blocks=3",
               f"model.remat={policy}")
    graphdef, params = nnx.split(getattr(stages.build_model(cfg), f"{kind}_head"))
    h = jnp.ones((2, 8, cfg.model.backbone.hidden_dim))
    y = jnp.ones((4, 2, 8, cfg.model.latent_dim))
    keys = jax.random.split(jax.random.key(0), 2)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p).loss(h, y, keys)[0])
    counts[policy] = str(jax.make_jaxpr(jax.grad(loss))(params)).count("remat")
  assert counts == {"none": 0, "minimal": 3}, counts


def test_remat_recomputes_the_head_samples():
  """The policies really change what the backward keeps: the compiled CALM step's temporary
  memory falls from none to minimal to full, the N-sample head included."""
  cfg = tiny("calm", "model.head.num_samples=16", "model.backbone.num_layers=1",
             "data.block_tokens=256")
  ids = ids_for(cfg, rows=2)
  temps = {}
  for policy in ("none", "minimal", "full"):
    c = config.replace(cfg, **{"model.remat": policy})
    graphdef, params, ae_graphdef, ae_params = build(c)
    st = stages.get_stage(c)

    def f(p, ae_p):
      return st.loss(nnx.merge(graphdef, p), nnx.merge(ae_graphdef, ae_p), ids,
                     jax.random.PRNGKey(1))[0]

    compiled = jax.jit(jax.grad(f)).lower(params, ae_params).compile()
    temps[policy] = compiled.memory_analysis().temp_size_in_bytes
  assert temps["none"] > temps["minimal"] > temps["full"], temps


# ----------------------------------------------------------------------------- attention


def test_attention_choice_follows_the_backend():
  assert attention.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert attention.resolve("auto", jnp.float32, "gpu") == "xla"
  assert attention.resolve("auto", jnp.bfloat16, "tpu") == "splash"
  assert attention.resolve("auto", jnp.bfloat16, "cpu") == "xla"
  assert attention.resolve("chunked", jnp.float32, "tpu") == "chunked"


def test_chunked_attention_matches_xla():
  """Query-chunked attention (grouped KV heads, 4 blocks) equals the one-shot XLA path, forward
  and backward."""
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(kq, (2, 60, 4, 8))  # 60: the last block is padded
  k = jax.random.normal(kk, (2, 60, 2, 8))
  v = jax.random.normal(kv, (2, 60, 2, 8))
  ref = attention.causal_attention(q, k, v, "xla")
  out = attention.chunked_attention(q, k, v, chunk=16)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  f = lambda impl: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(impl(q, k, v))), argnums=(0, 1, 2))
  g_ref = f(lambda *a: attention.causal_attention(*a, "xla"))(q, k, v)
  g_out = f(lambda *a: attention.chunked_attention(*a, chunk=16))(q, k, v)
  assert_trees_close(g_out, g_ref, rtol=1e-4, atol=1e-6)
  # causality: the first block's outputs ignore every later key
  k2 = k.at[:, 16:].set(0.0)
  np.testing.assert_allclose(attention.chunked_attention(q, k2, v, chunk=16)[:, :16],
                             out[:, :16], rtol=1e-6)


def test_chunked_attention_in_the_model_matches_xla():
  cfg = tiny("ar", "data.block_tokens=1024")
  ids = ids_for(cfg, rows=2)
  outs = []
  for impl in ("xla", "chunked"):
    c = config.replace(cfg, **{"model.attention": impl})
    model = stages.get_stage(c).build(c.model, nnx.Rngs(0))
    outs.append(np.asarray(jax.jit(lambda ids: model(ids)[0])(ids)))
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_step_is_close_to_float32(stage):
  """A bf16 training step: finite, parameters and optimizer state stay float32, and the loss
  is within 2% of the float32 step's (bf16 keeps 8 mantissa bits: ~0.4% per rounding, with
  float32 norms, softmax and losses)."""
  cfg = tiny(stage)
  ids = ids_for(cfg)
  tx = trainer.make_optimizer(cfg.train)
  out = {}
  for dtype in ("float32", "bfloat16"):
    c = config.replace(cfg, **{"model.dtype": dtype, "model.remat": "minimal"})
    graphdef, params, ae_graphdef, ae_params = build(c)
    step, _ = trainer.build_step_fns(stages.get_stage(c), graphdef, tx, ae_graphdef)
    new_params, new_opt, m = jax.jit(step)(params, tx.init(params), ids, jax.random.PRNGKey(5),
                                           ae_params)
    assert bool(m["finite"]), dtype
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_params)), dtype
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_opt)
               if jnp.issubdtype(x.dtype, jnp.floating)), dtype
    out[dtype] = m
  f32, bf16 = out["float32"], out["bfloat16"]
  np.testing.assert_allclose(bf16["loss"], f32["loss"], rtol=2e-2)
  np.testing.assert_allclose(bf16["grad_norm"], f32["grad_norm"], rtol=0.1)


# ----------------------------------------------------------------------------- paper configs

# config: (official parameters, micro-batch per device, tokens per sequence, tokens per step)
PAPER = {"autoencoder": (75e6, 8, 2048, 2**19), "calm_m": (371e6, 4, 8192, 2**21),
         "calm_l": (735e6, 4, 8192, 2**21), "calm_xl": (1.82e9, 4, 8192, 2**21),
         "transformer_s": (281e6, 4, 2048, 2**21), "transformer_m": (465e6, 4, 2048, 2**21),
         "transformer_l": (849e6, 4, 2048, 2**21)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_match_the_official_sizes_and_batches(name):
  params, micro, seq, step_tokens = PAPER[name]
  cfg = config.load(ROOT / "configs" / "paper" / f"{name}.yaml")
  model = nnx.eval_shape(lambda: stages.get_stage(cfg).build(cfg.model, nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  assert abs(n / params - 1) < 0.015, n  # official sizes are rounded ("about 75M")
  assert cfg.model.vocab_size == 128256 and cfg.data.block_tokens == seq
  assert cfg.train.batch_size // cfg.train.grad_accum // 8 == micro  # on 8 devices
  assert cfg.train.batch_size * seq == step_tokens
