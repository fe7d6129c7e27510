"""scripts/device_check.sh on the CPU: tiny sizes, every measurement present, one JSON file."""

import json
import subprocess
import sys

from conftest import ROOT, subprocess_env


def test_device_check_runs_on_the_cpu_at_tiny_size(tmp_path):
  out = tmp_path / "check.json"
  r = subprocess.run(["bash", "scripts/device_check.sh", "--python", sys.executable, "--out",
                      str(out)], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  assert json.dumps(res, indent=2) in r.stdout  # printed too
  assert res["tiny"] is True and "only show that the check runs" in res["note"]
  assert res["peak_bf16_tflops"] > 0 and res["machine"]["backend"] == "cpu"
  assert [t["model"] for t in res["train"]] == ["CALM-M", "Transformer-S"]
  for t in res["train"]:
    assert t["tokens_per_s"] > 0 and 0 < t["mfu"] < 1 and t["compiled_args_plus_temps_mib"] > 0
    assert t["micro_batch"].startswith("4 x ")
  gen = {(g["model"], g["batch"]): g["tokens_per_s"] for g in res["generate"]}
  assert set(gen) == {(m, b) for m in ("CALM-M", "Transformer-S") for b in (1, 4)}
  assert all(v > 0 for v in gen.values())


def test_device_check_refuses_an_unknown_argument():
  r = subprocess.run(["bash", "scripts/device_check.sh", "--gpus", "2"], cwd=ROOT,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and r.stderr.startswith("error: unknown argument --gpus")
