"""calm.plan: compile-only memory and FLOPs of a training step, verdict and exit code."""

import pathlib

import jax

from calm import config, plan
from calm.cli import planning
from calm.errors import cli

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
  assert err.startswith("error: does not fit") and "GiB" in err and "\n" not in err
  assert cli(planning.main)(args + ["train.grad_accum=3"]) == 2
  assert "train.grad_accum" in capsys.readouterr().err


def test_plan_topology_needs_libtpu_or_reports_the_slice(capsys):
  code = cli(planning.main)(["--config", str(TINY), "--topology", "v5e:nonsense", "--no-baseline"])
  assert code == 2
  assert "--topology v5e:nonsense" in capsys.readouterr().err
