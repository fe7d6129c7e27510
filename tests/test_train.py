"""End-to-end training: stages learn, the AE stays frozen, exact resume, mesh parity."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calm import checkpoint, config, metrics, sharding, stages, trainer
from calm import data, paths, run as run_lib
from calm.config import MeshConfig
from calm.errors import CalmError, CheckpointError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny(run_dir, *overrides):
  return config.load(TINY, [f"run_dir={run_dir}", "checkpoint.async_save=false", *overrides])


def one_device_mesh():
  return sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
  """A tiny autoencoder trained for 20 steps on the shipped slice (shared by this module)."""
  run = tmp_path_factory.mktemp("ae")
  cfg = tiny(run, "stage=autoencoder")
  result = trainer.train(cfg, progress=False)
  return cfg, result


def test_autoencoder_stage_learns_and_writes_run_dir(ae_run):
  cfg, result = ae_run
  losses_ = [h["loss"] for h in result.history]
  assert len(losses_) == cfg.train.steps
  assert np.mean(losses_[-5:]) < np.mean(losses_[:5]) - 0.3
  run = pathlib.Path(cfg.run_dir)
  saved = paths.load_config(run / "config.yaml")  # paths resolved against the run directory
  assert paths.portable(saved) == paths.portable(cfg)
  assert paths.absolute_paths(saved) == paths.absolute_paths(cfg)
  assert (run / "tokenizer.json").exists()
  rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  assert any("train/tokens_per_s" in r for r in rows) and any("eval/token_acc" in r for r in rows)
  assert {"token_acc_noise0.3", "chunk_exact"} <= set(result.eval_history[-1])
  assert checkpoint.Checkpointer(run, cfg.checkpoint).latest_step() == cfg.train.steps


def test_calm_stage_keeps_autoencoder_frozen(ae_run, tmp_path):
  ae_cfg, _ = ae_run
  before_step, before = checkpoint.fingerprint(ae_cfg.run_dir)
  ae = run_lib.load_model(ae_cfg.run_dir, expect_stage="autoencoder")
  ae_leaves = [np.array(x) for x in jax.tree.leaves(ae.params)]
  cfg = tiny(tmp_path / "calm", "stage=calm", f"train.autoencoder={ae_cfg.run_dir}",
             "train.steps=4", "data.eval=")
  result = trainer.train(cfg, progress=False)
  assert all(np.isfinite(h["loss"]) for h in result.history)
  # The AE checkpoint and parameters are untouched, and the CALM checkpoint holds no AE copy.
  assert checkpoint.fingerprint(ae_cfg.run_dir) == (before_step, before)
  again = run_lib.load_model(ae_cfg.run_dir, expect_stage="autoencoder")
  for a, b in zip(ae_leaves, jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(a, np.array(b))
  calm = run_lib.load_model(cfg.run_dir, expect_stage="calm")
  n_calm = sum(x.size for x in jax.tree.leaves(calm.params))
  n_fresh = sum(x.size for x in jax.tree.leaves(nnx.state(stages.get_stage(cfg).build(
      cfg.model, nnx.Rngs(0)))))
  assert n_calm == n_fresh
  assert calm.metadata["autoencoder_fingerprint"] == before


def test_calm_stage_rejects_mismatched_autoencoder(ae_run, tmp_path):
  ae_cfg, _ = ae_run
  for override, key in (("model.chunk_size=2", "model.chunk_size"),
                        ("model.latent_dim=8", "model.latent_dim"),
                        ("model.vocab_size=600", "model.vocab_size")):
    cfg = tiny(tmp_path / key, "stage=calm", f"train.autoencoder={ae_cfg.run_dir}", override)
    with pytest.raises(CheckpointError, match=key):
      trainer.train(cfg, progress=False)
  with pytest.raises(CalmError, match="train.autoencoder"):
    trainer.train(tiny(tmp_path / "none", "stage=calm"), progress=False)


def test_calm_eval_logs_reference_lines_and_evaluate_recomputes_them(ae_run, tmp_path):
  """Every CALM eval carries baseline, oracle and the normalised score (metrics.jsonl, history);
  `calm.evaluate` recomputes the same numbers from the checkpoint."""
  from calm import evaluate
  ae_cfg, _ = ae_run
  cfg = tiny(tmp_path / "calm", "stage=calm", f"train.autoencoder={ae_cfg.run_dir}",
             "train.steps=4", "train.eval_every=2")
  result = trainer.train(cfg, progress=False)
  assert [e["step"] for e in result.eval_history] == [2, 4]
  first, last = result.eval_history
  # computed once; this 20-step AE barely encodes its input, so baseline ≈ oracle here
  assert first["baseline_loss"] == last["baseline_loss"] > 0 and last["oracle_loss"] > 0
  for ev in result.eval_history:
    gap = ev["baseline_loss"] - ev["oracle_loss"]
    if gap > 2 * ev["reference_gap_se"]:
      np.testing.assert_allclose(ev["norm_score"], (ev["baseline_loss"] - ev["loss"]) / gap,
                                 rtol=1e-6)
    else:  # the references do not separate: the score would divide by noise
      assert "norm_score" not in ev
  rows = [json.loads(x) for x in (pathlib.Path(cfg.run_dir) / "metrics.jsonl").read_text()
          .splitlines()]
  logged = [r for r in rows if "eval/oracle_loss" in r]
  assert [r["step"] for r in logged] == [2, 4]
  assert [("eval/norm_score" in r) for r in logged] == [("norm_score" in e) for e in (first, last)]
  assert list((pathlib.Path(cfg.run_dir) / "tb").iterdir())
  line = metrics.learning_summary(cfg.run_dir)
  score = lambda e: f"{e['norm_score']:+.3f}" if "norm_score" in e else "n/a"
  assert f"{score(first)} at step 2 -> {score(last)} at step 4" in line

  # other heads' losses are not energy losses: no reference lines
  flow = tiny(tmp_path / "flow", "stage=calm", f"train.autoencoder={ae_cfg.run_dir}",
              "train.steps=2", "model.head.kind=flow")
  assert "norm_score" not in trainer.train(flow, progress=False).eval_history[-1]

  r = run_lib.load(cfg, stages_allowed=("calm",))
  tokens = data.token_stream(cfg.data.eval, cfg.data, r.tokenizer)
  energy = evaluate.energy_report(cfg, r.loaded, r.autoencoder.model, tokens, cfg.data.eval)
  assert ("norm_score" in energy) == ("norm_score" in last)
  for k in ("loss", "baseline_loss", "oracle_loss", "norm_score"):
    if k in last:
      np.testing.assert_allclose(energy[k], last[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_ar_stage_resumes_exactly_after_sigkill(tmp_path, monkeypatch):
  """Straight 2N steps == N steps, SIGKILL, resume to 2N: same losses, data order and params;
  the resumed launch restores into abstract state (initialises nothing first)."""
  n = 3
  common = ("stage=ar", f"train.steps={2 * n}", f"checkpoint.every={n}", "data.eval=",
            "train.log_every=1")
  straight = trainer.train(tiny(tmp_path / "straight", *common), progress=False)

  killed = tmp_path / "killed"
  script = (
      "import os, signal, jax\n"
      "jax.config.update('jax_num_cpu_devices', 8)\n"  # as conftest does for this process
      "jax.config.update('jax_default_matmul_precision', 'highest')\n"
      "from calm import config, trainer\n"
      f"cfg = config.load({str(TINY)!r}, {[f'run_dir={killed}', 'checkpoint.async_save=false', *common]!r})\n"
      f"trainer.train(cfg, max_steps={n}, progress=False)\n"
      "os.kill(os.getpid(), signal.SIGKILL)\n")
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == -9, r.stderr[-2000:]

  def no_init(*args, **kwargs):
    raise AssertionError("the resumed launch initialised state it then restores")

  monkeypatch.setattr(sharding, "sharded_init", no_init)
  monkeypatch.setattr(sharding, "init_opt_state", no_init)
  resumed = trainer.train(tiny(killed, *common), progress=False)
  assert [h["step"] for h in resumed.history] == list(range(n + 1, 2 * n + 1))
  np.testing.assert_array_equal([h["loss"] for h in resumed.history],
                                [h["loss"] for h in straight.history[n:]])
  a = run_lib.load_model(tmp_path / "straight", expect_stage="ar")
  b = run_lib.load_model(killed, expect_stage="ar")
  assert a.step == b.step == 2 * n
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.array(x), np.array(y))
  # Losses of the killed run's first N steps were logged before the kill.
  logged = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
  first = [r["train/loss"] for r in logged if "train/loss" in r][:n]
  np.testing.assert_allclose(first, [h["loss"] for h in straight.history[:n]], rtol=1e-6)


def test_checkpoint_from_8_devices_continues_on_1(tmp_path):
  run = tmp_path / "run"
  common = ("stage=ar", "train.steps=4", "checkpoint.every=2", "data.eval=")
  trainer.train(tiny(run, *common, "mesh.data=8", "train.steps=2"), progress=False)
  script = (
      "import jax\n"
      "jax.config.update('jax_num_cpu_devices', 1)\n"
      "from calm import config, trainer\n"
      f"cfg = config.load({str(TINY)!r}, {[f'run_dir={run}', 'checkpoint.async_save=false', 'mesh.data=-1', *common]!r})\n"
      "r = trainer.train(cfg, progress=False)\n"
      "assert jax.device_count() == 1\n"
      "print('steps', [h['step'] for h in r.history])\n")
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "steps [3, 4]" in r.stdout


# ----------------------------------------------------------------------------- mesh parity


def _loss_and_grads(cfg, mesh, ids_np, ae_params=None, ae_graphdef=None):
  stage = stages.get_stage(cfg)
  graphdef, params = sharding.sharded_init(lambda: stage.build(cfg.model, nnx.Rngs(0)), mesh)
  ids = jax.device_put(ids_np, sharding.batch_sharding(mesh))
  key = jax.random.PRNGKey(3)

  def f(p, ids, ae_p):
    ae = None if ae_p is None else nnx.merge(ae_graphdef, ae_p)
    return stage.loss(nnx.merge(graphdef, p), ae, ids, key)[0]

  with jax.set_mesh(mesh):
    loss, grads = jax.jit(jax.value_and_grad(f))(params, ids, ae_params)
  return float(loss), grads, params


@pytest.mark.parametrize("stage_name", ["autoencoder", "calm"])
def test_sharded_step_matches_single_device(stage_name):
  cfg = config.load(TINY, [f"stage={stage_name}", "model.backbone.num_heads=4",
                           "model.backbone.num_kv_heads=2", "model.backbone.hidden_dim=32"])
  ids = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (8, 64), 0, 512), np.int32)
  ae_graphdef = ae_params = None
  ref_mesh = one_device_mesh()
  if stage_name == "calm":
    ae_cfg = config.replace(cfg, stage="autoencoder")
    ae_graphdef, ae_params = nnx.split(stages.get_stage(ae_cfg).build(cfg.model, nnx.Rngs(7)))
  ref_loss, ref_grads, _ = _loss_and_grads(cfg, ref_mesh, ids, ae_params, ae_graphdef)
  for shape in ((8, 1, 1), (2, 4, 1), (2, 2, 2)):
    mesh = sharding.make_mesh(MeshConfig(*shape))
    loss, grads, params = _loss_and_grads(cfg, mesh, ids, ae_params, ae_graphdef)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=str(shape))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6,
                                 err_msg=str(shape))
    if shape != (8, 1, 1):  # something really is split over fsdp/tensor
      specs = [x.sharding.spec for x in jax.tree.leaves(params)]
      assert any(any(ax is not None for ax in s) for s in specs), shape


# ----------------------------------------------------------------------------- learning


def _fit(cfg, stage_name, ids_NT, steps, lr):
  stage = stages.get_stage(config.replace(cfg, stage=stage_name))
  model = stage.build(cfg.model, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tcfg = config.replace(cfg, **{"train.lr": lr, "train.warmup_steps": 10}).train
  tx = trainer.make_optimizer(tcfg)
  step, _ = trainer.build_step_fns(stage, graphdef, tx)
  step = jax.jit(step)
  opt = tx.init(params)
  hist = []
  for i in range(steps):
    params, opt, m = step(params, opt, ids_NT, jax.random.PRNGKey(i), None)
    hist.append(float(m["loss"]))
  return nnx.merge(graphdef, params), hist


@pytest.fixture(scope="module")
def heldout_blocks(tmp_path_factory):
  """Tokenised held-out demo text as [n, 64] blocks (a small BPE trained on the train slice)."""
  from calm import data
  cfg = config.load(TINY, ["data.tokenizer_train_bytes=200000"])
  tok = run_lib.get_tokenizer(cfg, tmp_path_factory.mktemp("tok"))
  return cfg, data.eval_blocks(cfg, tok, None, cfg.data.eval)


def test_tiny_autoencoder_overfits_real_text_to_full_reconstruction(heldout_blocks):
  cfg, blocks = heldout_blocks
  blocks = blocks[:8]
  ae, hist = _fit(cfg, "autoencoder", jnp.asarray(blocks), 600, 3e-3)
  ids_BSK = jnp.asarray(blocks).reshape(8, -1, cfg.model.chunk_size)
  mu, _ = ae.encode(ids_BSK)
  acc = float((ae.decode(mu).argmax(-1) == ids_BSK).mean())
  assert hist[-1] < hist[0] / 4
  assert acc == 1.0, acc


def test_ar_baseline_beats_unigram_entropy(heldout_blocks):
  cfg, blocks = heldout_blocks
  blocks = blocks[:16]
  counts = np.bincount(blocks.ravel(), minlength=cfg.model.vocab_size).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  unigram_entropy = float(-(p * np.log(p)).sum())
  _, hist = _fit(cfg, "ar", jnp.asarray(blocks), 60, 3e-3)  # 2.7 nats below it at 60 steps
  assert np.mean(hist[-10:]) < unigram_entropy - 1.0, (hist[-10:], unigram_entropy)


def test_evaluation_runs_one_micro_batch_at_a_time(tmp_path):
  """With train.grad_accum = n the held-out batches are micro-batches: the same mean metrics."""
  from calm import metrics

  blocks = np.random.default_rng(0).integers(3, 500, (32, 64)).astype(np.int32)
  out, shapes = {}, {}
  for accum in (1, 2):
    cfg = tiny(tmp_path / str(accum), "stage=ar", "train.batch_size=16",
               f"train.grad_accum={accum}")
    s = trainer.setup(cfg)
    step, shapes[accum] = s.eval_step, []
    s.eval_step = lambda p, ids, k, a, step=step, seen=shapes[accum]: (
        seen.append(ids.shape), step(p, ids, k, a))[1]
    hook = trainer.EvalHook(s, blocks, metrics.MetricsLogger(tmp_path, enabled=False))
    hook(1, s.params)
    out[accum] = hook.history[-1]
  assert shapes[1] == [(16, 64)] * 2 and shapes[2] == [(8, 64)] * 4
  assert out[2]["loss"] == pytest.approx(out[1]["loss"], rel=1e-6)
