"""Flow-matching and diffusion heads: parity with the official modules, solver and chain maths,
temperature sampling from their draws, training and generation through CALM."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, SHARED, load_fixture
from flax import nnx

from calm import config as config_lib
from calm import convert, engine, losses, sampling
from calm.convert import names as convert_names
from calm.models.calm import CALM
from calm.models.diffusion_head import DiffusionHead
from calm.models.diffusion_schedule import make_schedule
from calm.models.flow_head import FlowHead

FIXTURE = SHARED / "fixtures" / "reference_heads.npz"


def head_config(kind: str, latent: int = 16, hidden: int = 32, blocks: int = 2,
                **head) -> config_lib.ModelConfig:
  return config_lib.ModelConfig(
      latent_dim=latent,
      backbone=config_lib.BackboneConfig(hidden_dim=hidden, num_layers=1, num_heads=2,
                                         num_kv_heads=2, ffn_dim=2 * hidden),
      head=config_lib.HeadConfig(kind=kind, num_blocks=blocks, **head))


def load_net(head, weights: dict[str, np.ndarray]) -> None:
  """Official `net.*` tensors (torch layouts) → the head's network, through convert's table."""
  params = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(head, nnx.Param))}
  names = convert_names.expand(convert_names.adaln_table("net", "net"), {k: v.shape for k, v in params.items()})
  assert set(names) == set(weights)
  for ref, (path, kind) in names.items():
    w = weights[ref].T if kind == "linear" else weights[ref]
    assert params[path].shape == w.shape, ref
    params[path][...] = jnp.asarray(w)


# ----------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def ref():
  npz, meta = load_fixture(FIXTURE)
  cfg = {"latent": meta["latent"], "hidden": meta["hidden"], "blocks": meta["num_mlp_layers"]}
  assert meta["flow"] == {"solver": "midpoint", "steps": 20}  # network calls
  flow = FlowHead(head_config("flow", **cfg, solver="midpoint", flow_steps=10), rngs=nnx.Rngs(0))
  diff = DiffusionHead(head_config("diffusion", **cfg), rngs=nnx.Rngs(0))
  for head, prefix in ((flow, "flow/w/"), (diff, "diff/w/")):
    load_net(head, {k[len(prefix):]: npz[k] for k in npz.files if k.startswith(prefix)})
  data = {k: npz[k] for k in npz.files if "/w/" not in k and k != "meta"}
  return flow, diff, {k: jnp.asarray(v) if v.dtype != np.float64 else v for k, v in data.items()}


def close(got, want, rtol=1e-5):
  """Within rtol of the output's scale (its largest magnitude)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.max(np.abs(want)))


def test_schedules_match_exactly(ref):
  *_, d = ref
  train, gen = make_schedule("cosine", 1000), make_schedule("cosine", 1000, 100)
  np.testing.assert_array_equal(train.betas, d["diff/out/train_betas"])
  np.testing.assert_array_equal(gen.betas, d["diff/out/respaced_betas"])
  np.testing.assert_array_equal(gen.timesteps, np.asarray(d["diff/out/respaced_timesteps"]))


def test_flow_net_loss_and_sample(ref):
  flow, _, d = ref
  x, c, t = d["in/x"], d["in/c"], d["flow/in/t"]
  close(flow.velocity(x, t, c), d["flow/out/net"])
  close(flow.loss_terms(c, d["in/target"], t, d["flow/in/x0"]), d["flow/out/loss"])
  close(jax.jit(flow.solve)(c, d["flow/in/sample_init"]), d["flow/out/sample"])
  assert flow.calls_per_sample == 20


def test_diffusion_net_and_training_terms(ref):
  _, diff, d = ref
  t = d["diff/in/t"].astype(jnp.int32)
  assert {0, 999} <= set(np.asarray(t).tolist())  # the decoder-NLL step and the last step
  close(diff.net(d["in/x"], t, d["in/c"]), d["diff/out/net"])
  terms = diff.training_terms(d["in/c"], d["in/target"], t, d["diff/in/noise"])
  for k in ("loss", "mse", "vb"):
    close(terms[k], d[f"diff/out/train_{k}"])


def test_diffusion_reverse_step(ref):
  _, diff, d = ref
  outs = diff.step_outputs(d["in/c"], d["in/x"], d["diff/in/step_t"].astype(jnp.int32))
  for k, v in zip(("mean", "log_variance", "pred_xstart"), outs):
    close(v, d[f"diff/out/step_{k}"])


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_diffusion_full_sample(ref, temperature):
  _, diff, d = ref
  noise = d["diff/in/step_noise"]
  fn = jax.jit(lambda c, x: diff.denoise(c, x, lambda k: noise[k], temperature))
  close(fn(d["in/c"], d["diff/in/sample_init"]), d[f"diff/out/sample_T{temperature}"], rtol=1e-4)


# ----------------------------------------------------------------------------- maths


def randomize_zero_layers(head, key, scale=0.3) -> None:
  """Random adaLN and output kernels (zero at initialisation): the output then depends on x, t
  and c."""
  layers = [b.ada for b in head.net.blocks] + [head.net.final.ada, head.net.final.out]
  for i, layer in enumerate(layers):
    w = layer.kernel
    w[...] = scale * jax.random.normal(jax.random.fold_in(key, i), w.shape)


def _constant_output(head, bias) -> None:
  """Zero output kernel: the network returns `bias` whatever x, t and c."""
  head.net.final.out.kernel[...] = jnp.zeros_like(head.net.final.out.kernel[...])
  head.net.final.out.bias[...] = jnp.asarray(bias, jnp.float32)


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_flow_constant_velocity_is_integrated_exactly(solver):
  head = FlowHead(head_config("flow", latent=3, hidden=8, solver=solver, flow_steps=7),
                  rngs=nnx.Rngs(0))
  _constant_output(head, [0.5, -2.0, 3.0])
  x0 = jax.random.normal(jax.random.key(0), (4, 3))
  c = jax.random.normal(jax.random.key(1), (4, 8))
  np.testing.assert_allclose(head.solve(c, x0), x0 + jnp.array([0.5, -2.0, 3.0]), atol=1e-5)


def test_flow_solvers_converge_to_one_ode():
  """Euler's error falls ~linearly with steps, midpoint's faster, on a smooth random field.

  The network sees time as ⌊1000·t⌋ through sinusoids with periods down to 2π steps, so its
  field is rough in t; the time embedding is zeroed here to make the field smooth."""
  cfg = head_config("flow", latent=4, hidden=16)
  head = FlowHead(cfg, rngs=nnx.Rngs(3))
  randomize_zero_layers(head, jax.random.key(5), 0.1)
  head.net.time.fc2.kernel[...] = jnp.zeros_like(head.net.time.fc2.kernel[...])
  x0 = jax.random.normal(jax.random.key(0), (64, 4))
  c = jax.random.normal(jax.random.key(1), (64, 16))

  def run(solver, steps):
    head.solver, head.steps = solver, steps
    return np.asarray(head.solve(c, x0))

  exact = run("midpoint", 1000)
  err = lambda s, n: float(np.abs(run(s, n) - exact).max())
  e10, e40 = err("euler", 10), err("euler", 40)
  m10, m40 = err("midpoint", 10), err("midpoint", 40)
  assert 3 < e10 / e40 < 5.5  # first order: 4x the steps, ~1/4 the error
  assert 10 < m10 / m40 < 25  # second order: ~1/16
  assert m10 < e10 / 10


def _chain_gaussian(sched, eps, v, temperature):
  """Mean and variance (float64) of the reverse chain from N(0, I) for a network that outputs
  the constants (eps, v): every step is affine-Gaussian."""
  m, var = 0.0, 1.0
  for i in reversed(range(sched.num_steps)):
    frac = (v + 1) / 2
    log_var = frac * sched.log_betas[i] + (1 - frac) * sched.post_log_var[i]
    a = sched.post_coef1[i] * sched.sqrt_recip_ac[i] + sched.post_coef2[i]
    b = -sched.post_coef1[i] * sched.sqrt_recipm1_ac[i] * eps
    m, var = a * m + b, a * a * var + (np.exp(log_var) * temperature ** 2 if i else 0.0)
  return m, var


def test_diffusion_chain_distribution_with_constant_network():
  head = DiffusionHead(head_config("diffusion", latent=1, hidden=8, sampling_steps=20,
                                   noise_temperature=0.8), rngs=nnx.Rngs(0))
  _constant_output(head, [0.3, -0.4])
  m, var = _chain_gaussian(head.sample_schedule, 0.3, -0.4, 0.8)
  z = head.sample(jnp.zeros((1, 8)), jax.random.key(0), 20000)[:, 0, 0]
  z = (np.asarray(z, np.float64) - m) / np.sqrt(var)
  assert abs(z.mean()) < 0.04 and abs(z.var() - 1) < 0.05


def test_diffusion_bound_trains_the_variance_only():
  cfg = head_config("diffusion", latent=4, hidden=8)
  head = DiffusionHead(cfg, rngs=nnx.Rngs(0))
  randomize_zero_layers(head, jax.random.key(2), 0.1)
  c, x0, noise = (jax.random.normal(jax.random.key(i), s) for i, s in
                  enumerate([(6, 8), (6, 4), (6, 4)]))
  t = jnp.array([0, 1, 10, 300, 998, 999])
  graphdef, params = nnx.split(head, nnx.Param)

  def term(p, name):
    return jnp.mean(nnx.merge(graphdef, p).training_terms(c, x0, t, noise)[name])

  grad = jax.jit(jax.grad(term), static_argnums=1)
  g_vb = grad(params, "vb")["net"]["final"]["out"]["kernel"][...]
  g_mse = grad(params, "mse")["net"]["final"]["out"]["kernel"][...]
  assert float(jnp.abs(g_vb[:, :4]).max()) == 0.0 and float(jnp.abs(g_vb[:, 4:]).max()) > 0
  assert float(jnp.abs(g_mse[:, 4:]).max()) == 0.0 and float(jnp.abs(g_mse[:, :4]).max()) > 0


# ----------------------------------------------------------------------------- temperature


P = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
TABLE = jnp.array([[1, 2, 3, 4], [1, 2, 3, 5], [7, 0, 0, 0], [0, 7, 0, 0], [9, 9, 9, 9],
                   [2, 2, 3, 4]], jnp.int32)
CHI2_DF5_999 = 20.515  # χ² critical value, 5 degrees of freedom, significance 1e-3


class BinDecoder:
  """Stands in for the autoencoder: chunk j when the standardised first latent falls in the j-th
  bin of N(0, 1) with mass P[j]."""

  def __init__(self, mean, std):
    edges = jax.scipy.special.ndtri(jnp.asarray(np.cumsum(P)[:-1], jnp.float32))
    self.edges, self.mean, self.std = edges, mean, std

  def decode_ids(self, z):
    u = (z[..., 0] - self.mean) / self.std
    return TABLE[jnp.sum(u[..., None] > self.edges, axis=-1)]


def stub_calm(kind):
  """A CALM whose head ignores its context and samples a known Gaussian latent."""
  cfg = head_config(kind, latent=2, hidden=8, flow_steps=4, sampling_steps=10)
  calm = CALM(cfg, rngs=nnx.Rngs(0))
  _constant_output(calm.generator, [0.7, -1.0] if kind == "flow" else [0.2, 0.1, 0.5, 0.0])
  if kind == "flow":  # z = x0 + v, x0 ~ N(0, I)
    return calm, BinDecoder(0.7, 1.0)
  m, var = _chain_gaussian(calm.generator.sample_schedule, 0.2, 0.5, 1.0)
  return calm, BinDecoder(m, np.sqrt(var))


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
@pytest.mark.parametrize("T", [1 / 2, 0.7])
@pytest.mark.parametrize("sampler_kind", ["exact", "batch"])
def test_temperature_samplers_on_head_draws(kind, T, sampler_kind):
  """Chunks ∝ P^{1/T} from the head's draws alone (the batch sampler's finite-N bias at
  N = 512 is far below what 2000 rows resolve)."""
  calm, ae = stub_calm(kind)
  B = 8000 if sampler_kind == "exact" else 2000
  h_BD = jnp.zeros((B, 8))
  sampler = sampling.ChunkSampler(T, sampler_kind, max_attempts=2000, num_candidates=512)
  fn = jax.jit(lambda k: sampling.next_chunk(calm, ae, h_BD, k, sampler))
  chunks, draws = fn(jax.random.key(1))
  assert int(jnp.min(draws)) > 0  # none hit the cap
  idx = np.asarray(jnp.argmax(jnp.all(chunks[:, None] == TABLE[None], -1), -1))
  q = P ** (1 / T) / np.sum(P ** (1 / T))
  counts = np.bincount(idx, minlength=6)
  assert float(((counts - B * q) ** 2 / (B * q)).sum()) < CHI2_DF5_999


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_exact_sampler_cost_does_not_grow_as_temperature_falls(kind):
  """Each draw of these heads runs a whole ODE / denoising chain: at the default draws per
  iteration the program and its memory at T = 0.01 are those at T = 1/8."""
  calm, ae = stub_calm(kind)
  h_BD = jnp.zeros((4, 8))

  def lowered(T):
    sampler = sampling.ChunkSampler(T)
    return jax.jit(lambda k: sampling.next_chunk(calm, ae, h_BD, k, sampler)).lower(
        jax.random.key(0))

  lo, hi = lowered(1 / 8), lowered(0.01)
  assert len(hi.as_text()) < 1.05 * len(lo.as_text())
  temp = lambda l: l.compile().memory_analysis().temp_size_in_bytes
  assert temp(hi) <= 1.05 * temp(lo)


# ----------------------------------------------------------------------------- through CALM


@pytest.fixture(scope="module", params=["flow", "diffusion"])
def tiny_models(request):
  from calm.models.autoencoder import Autoencoder

  cfg = config_lib.load(ROOT / "configs" / "tiny.yaml",
                        [f"model.head.kind={request.param}", "model.head.flow_steps=3",
                         "model.head.sampling_steps=5", "stage=calm"])
  calm = CALM(cfg.model, rngs=nnx.Rngs(1))
  randomize_zero_layers(calm.generator, jax.random.key(9))  # samples depend on the context
  return cfg, calm, Autoencoder(cfg.model, rngs=nnx.Rngs(2))


def test_training_loss_learns(tiny_models):
  import optax

  cfg, calm, ae = tiny_models
  ids = jax.random.randint(jax.random.key(0), (4, 32), 0, cfg.model.vocab_size)
  graphdef, params = nnx.split(calm)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt, key):
    def f(p):
      return losses.calm_loss(nnx.merge(graphdef, p), ae, ids, key, cfg.model)

    (_, metrics), g = jax.value_and_grad(f, has_aux=True)(params)
    upd, opt = tx.update(g, opt)
    return optax.apply_updates(params, upd), opt, metrics

  opt = tx.init(params)
  hist = []
  for i in range(30):
    params, opt, m = step(params, opt, jax.random.key(i))
    hist.append(float(m["loss"]))
  if cfg.model.head.kind == "diffusion":
    assert {"mse", "vb"} <= set(m)
  assert np.isfinite(hist).all() and np.mean(hist[-5:]) < np.mean(hist[:5])


def test_generation_rows_do_not_depend_on_batch(tiny_models):
  _, calm, ae = tiny_models
  prompts = [[5, 17, 99, 42], [8, 9, 10, 11, 12, 13, 14, 15]]
  kw = {"max_new_tokens": 12, "eos_id": 3, "pad_id": 0}
  key = jax.random.key(4)
  both, _ = engine.generate_calm(calm, ae, prompts, key, **kw)
  one, _ = engine.generate_calm(calm, ae, prompts[:1], key, **kw)
  assert both[0] == one[0] and len(both[1]) >= 4
  other, _ = engine.generate_calm(calm, ae, prompts[:1], jax.random.key(5), **kw)
  assert other[0] != one[0]


def test_brier_scores_any_head(tiny_models):
  from calm import evaluate

  _, calm, ae = tiny_models
  docs = [np.arange(1, 40) % 500, np.arange(3, 30) % 500]
  est, doc_ids = evaluate.score_documents("calm", (calm, ae), docs, block_tokens=16,
                                          chunk_size=4, batch_size=2, seed=0, pad_id=0)
  assert est.shape[1] == 4 and set(np.unique(est)) <= {-1.0, 0.0, 1.0, 2.0}
  assert set(np.unique(doc_ids)) == {0, 1}


@pytest.mark.slow
def test_sharded_loss_matches_single_device(kind="diffusion"):
  """The heads' logical axes shard them; one (the heads share the conditioning network) is
  checked on a 2×2×2 mesh against one device."""
  from test_train import _loss_and_grads, one_device_mesh

  from calm import sharding, stages
  from calm.config import MeshConfig

  cfg = config_lib.load(ROOT / "configs" / "tiny.yaml",
                        ["stage=calm", f"model.head.kind={kind}", "model.backbone.num_heads=4",
                         "model.backbone.num_kv_heads=2"])
  ids = np.asarray(jax.random.randint(jax.random.key(0), (8, 32), 0, 512), np.int32)
  ae_cfg = config_lib.replace(cfg, stage="autoencoder")
  ae_def, ae_params = nnx.split(stages.get_stage(ae_cfg).build(cfg.model, nnx.Rngs(7)))
  ref_loss, ref_grads, _ = _loss_and_grads(cfg, one_device_mesh(), ids, ae_params, ae_def)
  mesh = sharding.make_mesh(MeshConfig(2, 2, 2))
  loss, grads, params = _loss_and_grads(cfg, mesh, ids, ae_params, ae_def)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)
  head = params[f"{kind}_head"]
  assert any(any(ax is not None for ax in x.sharding.spec) for x in jax.tree.leaves(head))


# ----------------------------------------------------------------------------- convert


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_official_round_trip(tmp_path, kind):
  """official → calm-jax → official is bit-identical; the head's tensor names and shapes are the
  official modules' (the fixture's, when present)."""
  from test_convert import _flat, _random_run

  from calm import run

  base = config_lib.replace(config_lib.load(ROOT / "configs" / "tiny.yaml"),
                            **{"checkpoint.async_save": False, "model.head.kind": kind,
                               **({"model.head.flow_steps": 4} if kind == "flow" else
                                  {"model.head.sampling_steps": 50})})
  ae_cfg = config_lib.replace(base, stage="autoencoder", run_dir=str(tmp_path / "ae"))
  calm_cfg = config_lib.replace(base, stage="calm", run_dir=str(tmp_path / "calm"),
                                **{"train.autoencoder": str(tmp_path / "ae")})
  _random_run(tmp_path / "ae", ae_cfg, 1)
  model = _random_run(tmp_path / "calm", calm_cfg, 2)
  ref_ae = convert.export_reference(tmp_path / "ae", tmp_path / "ref_ae", "npz")
  ref = convert.export_reference(tmp_path / "calm", tmp_path / "ref_calm", "safetensors")
  cfg_json = json.loads((ref / "config.json").read_text())
  assert cfg_json["model_type"] == kind
  assert cfg_json["architectures"] == [{"flow": "FlowTransformer",
                                        "diffusion": "DiffusionTransformer"}[kind]]
  weights = convert.read_weights(ref)
  head = {k[len("generative_head."):]: v.shape for k, v in weights.items()
          if k.startswith("generative_head.")}
  assert len(head) == 12 + 8 * base.model.head.num_blocks
  if FIXTURE.is_file():  # same sizes as the fixture: latent 16, width 32, 2 blocks
    npz = np.load(FIXTURE)
    prefix = {"flow": "flow/w/", "diffusion": "diff/w/"}[kind]
    assert head == {k[len(prefix):]: npz[k].shape for k in npz.files if k.startswith(prefix)}

  runs = convert.convert(tmp_path / "out", ae=ref_ae, calm=ref)
  loaded = run.load_model(runs["calm"], expect_stage="calm")
  assert loaded.config.model.head == base.model.head
  want, got = _flat(model), _flat(loaded.model)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  again = convert.export_reference(runs["calm"], tmp_path / "ref_again", "safetensors")
  assert json.loads((again / "config.json").read_text()) == cfg_json
  back = convert.read_weights(again)
  assert back.keys() == weights.keys()
  for k in weights:
    np.testing.assert_array_equal(back[k], weights[k], err_msg=k)
