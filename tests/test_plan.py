"""calm.plan: compile-only memory and FLOPs of a training step, verdict and exit code."""

import pathlib

import jax
import pytest

from calm import config, plan
from calm.cli import planning
from calm.errors import CalmError, cli

from conftest import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_plan_measures_a_step_without_materialising_it():
  """One device: the step's arguments are the float32 parameters and AdamW's two moments (plus
  the batch and key), the FLOPs are positive, full remat costs more FLOPs than none."""
  cfg = config.load(TINY, ["stage=ar", "model.remat=full", "mesh.data=1"])
  p = plan.plan(cfg, jax.devices()[:1])
  state_bytes = 3 * 4 * p.params
  batch_bytes = 4 * cfg.train.batch_size * cfg.data.block_tokens
  assert state_bytes + batch_bytes <= p.argument_bytes < 1.2 * state_bytes + 2**20
  assert p.temp_bytes > 0 and p.flops > 0 and p.model_flops > 0
  assert p.flops > p.flops_no_remat > 0
  assert p.attention == "xla" and p.fits and "no memory limit" in plan.verdict(p)
  text = plan.report(cfg, p)
  assert "remat cost" in text and "x the FLOPs of the step without remat" in text


def test_plan_shards_over_devices():
  """fsdp over 4 devices: each holds about a quarter of the state."""
  cfg = config.load(TINY, ["stage=ar", "model.vocab_size=4096", "mesh.data=1", "mesh.fsdp=-1"])
  one = plan.plan(cfg, jax.devices()[:1], baseline=False)
  four = plan.plan(cfg, jax.devices()[:4], baseline=False)
  assert four.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
  assert four.argument_bytes < 0.4 * one.argument_bytes


def test_plan_cli_reports_and_fails_when_it_does_not_fit(capsys):
  args = ["--config", str(TINY), "--devices", "8", "stage=ar", "train.grad_accum=1"]
  assert cli(planning.main)(args + ["--no-baseline"]) == 0
  out = capsys.readouterr().out
  assert "verdict" in out and "8 x cpu" in out
  assert cli(planning.main)(args + ["--no-baseline", "--hbm-gib", "0.0001"]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip()
  assert err.startswith("error: does not fit") and "MiB" in err and "\n" not in err
  assert cli(planning.main)(args + ["train.grad_accum=3"]) == 2
  assert "train.grad_accum" in capsys.readouterr().err


def test_plan_topology_needs_libtpu_or_reports_the_slice(capsys):
  code = cli(planning.main)(["--config", str(TINY), "--topology", "v5e:nonsense", "--no-baseline"])
  assert code == 2
  assert "--topology v5e:nonsense" in capsys.readouterr().err


def test_bad_arguments_are_one_line_errors_before_compiling(capsys):
  """Device counts and memory sizes are checked before any device is made or step compiled."""
  import time

  for args, want in [(["--devices", "0"], "--devices"), (["--devices", "-2"], "--devices"),
                     (["--devices", "9999"], "--devices 9999"), (["--devices", "3"], "--devices 3"),
                     (["--hbm-gib", "0"], "--hbm-gib"), (["--hbm-gib", "-1"], "--hbm-gib"),
                     (["--hbm-gib", "nan"], "--hbm-gib")]:
    t = time.perf_counter()
    code = cli(planning.main)(["--config", str(TINY), *args, "stage=ar"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and want in err and "\n" not in err, (args, err)
    assert time.perf_counter() - t < 5, args


def test_plan_prints_small_sizes_and_its_verdict_once(capsys):
  args = ["--config", str(TINY), "--devices", "8", "stage=ar", "--no-baseline"]
  assert cli(planning.main)(args + ["--hbm-gib", "0.0001"]) == 2
  captured = capsys.readouterr()
  assert "verdict" not in captured.out and "0.00 GiB" not in captured.out + captured.err
  assert captured.err.count("does not fit") == 1 and " MiB per chip needed, 0.10 MiB available" \
      in captured.err


def test_topology_errors_say_what_happened(monkeypatch):
  """libtpu missing → how to install it; installed but failing (e.g. held by another process) →
  libtpu's own message, not an install hint."""
  from jax.experimental import topologies

  def busy(**kw):
    raise RuntimeError("TPU initialization failed: open(/dev/vfio/0): Device or resource busy; "
                       "the TPU is already in use by process with pid 1234\nmore detail")

  monkeypatch.setattr(topologies, "get_topology_desc", busy)
  monkeypatch.setattr(plan, "_libtpu_installed", lambda: True)
  with pytest.raises(CalmError) as e:
    plan.devices_for("v5e:2x2", None)
  msg = str(e.value)
  assert "already in use by process with pid 1234" in msg and "pip install" not in msg
  assert "\n" not in msg
  monkeypatch.setattr(plan, "_libtpu_installed", lambda: False)
  with pytest.raises(CalmError, match="libtpu, which is not installed: pip install"):
    plan.devices_for("v5e:2x2", None)


def test_too_many_devices_fail_before_making_them():
  """A fresh process asked for 9999 CPU devices fails on the mesh in seconds (it once made them
  all and built the step first)."""
  import subprocess
  import sys
  import time

  t = time.perf_counter()
  r = subprocess.run([sys.executable, "-m", "calm.plan", "--config", str(TINY), "--devices",
                      "9999", "stage=ar"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2 and r.stderr.strip().startswith("error: --devices 9999"), r.stderr
  assert time.perf_counter() - t < 30
