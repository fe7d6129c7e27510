"""Goodput accounting: phases partition the wall time, compiling is counted as compile wherever it
happens, a starved input pipeline is named once, and a run killed with SIGKILL and resumed
accounts for the wall time of both processes with the redone steps as lost work."""

import json
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from tqdm import tqdm

from calm import config, goodput, metrics, trainer
from conftest import ROOT, subprocess_env


def test_phases_partition_the_wall_time_and_compiling_counts_as_compile(tmp_path):
  ledger = goodput.Ledger(tmp_path, write=False, started=time.time())
  with ledger.phase("data"):
    time.sleep(0.05)
  with ledger.phase("eval"):  # a fresh program compiles inside the evaluation
    n = 97  # a shape no other test compiles
    jax.jit(lambda x: jnp.sin(x @ x.T).sum())(jnp.ones((n, n))).block_until_ready()
  time.sleep(0.02)  # between phases: other
  rec = ledger.record()
  s = rec["seconds"]
  assert s["data"] >= 0.05 and s["compile"] > 0 and s["other"] >= 0.02
  assert sum(s.values()) == pytest.approx(rec["wall"], abs=1e-5)


def test_summary_line():
  t = {"seconds": dict(step=90.0, compile=5.0, data=2.0, checkpoint=1.0, eval=1.0, lost=0.5,
                       startup=0.4, other=0.1), "wall": 100.0, "lost_steps": 3, "launches": 2}
  assert goodput.summary(t) == (
      "goodput 90.0%: compile 5.0%, data 2.0%, checkpoint 1.0%, eval 1.0%, lost 0.5% "
      "(3 steps redone), startup 0.4%, other 0.1% of 100.0 s over 2 launches")


def test_the_furthest_step_is_the_later_of_ledger_and_metrics(tmp_path):
  (tmp_path / "goodput").mkdir()
  (tmp_path / "goodput" / "1.json").write_text(json.dumps(
      {"step": 12, "wall": 3.0, "seconds": {"step": 3.0}}) + " " * 100)
  rows = [{"step": 13, "train/loss": 1.0}, {"step": 14, "goodput/step": 0.5}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"st')
  ledgers = goodput.read_ledgers(tmp_path)
  assert goodput.furthest_step(tmp_path, ledgers) == 13  # goodput rows and a cut line ignored
  assert goodput.Ledger(tmp_path, write=False).is_redo(13)


def test_a_starved_input_pipeline_is_named_once(tmp_path, capsys):
  cfg = config.load(ROOT / "configs" / "tiny.yaml", ["train.peak_flops=1e9"])
  ledger = goodput.Ledger(tmp_path, write=False)
  hook = trainer.LogHook(cfg, metrics.MetricsLogger(tmp_path), tqdm(disable=True), ledger=ledger)
  hook.goodput(10)  # the first window is warm-up
  for step in (20, 30):
    with ledger.phase("data"):
      time.sleep(0.1)
    with ledger.phase("step"):
      time.sleep(0.01)
    hook.goodput(step)
  out = capsys.readouterr().out
  assert out.count("warning: training waited for data") == 1
  assert "data.workers" in out and "calm-prepare" in out


def test_process_start_time_is_when_the_process_started():
  """Within the 10 ms of /proc's clocks (it was once off by up to a second: /proc/stat's boot
  time is rounded to whole seconds)."""
  t0 = time.time()
  r = subprocess.run([sys.executable, "-c",
                      "from calm import goodput; print(repr(goodput.process_start_time()))"],
                     env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  t1 = time.time()
  assert r.returncode == 0, r.stderr[-2000:]
  started = float(r.stdout.split()[-1])
  assert t0 - 0.03 <= started <= t1 and started < t0 + 0.5 * (t1 - t0), (t0, started, t1)


def _train_rows(run_dir) -> list[int]:
  """Steps of the training rows written so far (a line still being written is skipped: this is
  polled while the trainer appends)."""
  path = run_dir / "metrics.jsonl"
  rows = []
  for line in (path.read_text().splitlines() if path.exists() else []):
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue
  return [r["step"] for r in rows if "train/loss" in r]


def test_kill_and_resume_accounts_for_both_processes(tmp_path, tiny_runs):
  run_dir = tmp_path / "run"
  cmd = [sys.executable, "train.py", "--config", "configs/tiny.yaml", "stage=ar",
         f"run_dir={run_dir}", f"data.tokenizer={tiny_runs}/ae/tokenizer.json", "data.eval=",
         "train.steps=90", "train.log_every=1", "checkpoint.every=40",
         "checkpoint.async_save=false"]
  env = subprocess_env()
  t0 = time.time()
  first = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    while max(_train_rows(run_dir), default=0) < 45:  # past the checkpoint at 40
      assert first.poll() is None, first.stdout.read()[-3000:]
      assert time.time() - t0 < 600
      time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
  finally:
    if first.poll() is None:
      first.kill()
  wall_first = time.time() - t0
  reached = max(_train_rows(run_dir))
  assert reached < 90, "the first process finished before it was killed"

  t1 = time.time()
  second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  wall_second = time.time() - t1
  assert second.returncode == 0, second.stderr[-3000:]
  resumed = int(second.stdout.split("from step ")[1].split()[0])
  assert resumed == 40
  assert "earlier launches: goodput" in second.stdout

  steps = _train_rows(run_dir)
  redone = len(steps) - len(set(steps))  # every step logs a row; a redone step logs two
  assert redone == reached - resumed > 0
  ledgers = goodput.read_ledgers(run_dir)
  t = goodput.totals(ledgers)
  assert t["launches"] == 2 and t["lost_steps"] == redone
  # The ledger is written just after a step's metrics row: a kill between the two leaves it
  # one step behind (the resumed launch takes the row's step as the furthest reached).
  assert ledgers[0]["step"] in (reached - 1, reached) and ledgers[1]["step"] == 90
  wall = wall_first + wall_second
  assert 0.95 * wall <= t["wall"] <= wall  # everything accounted for, nothing twice
  assert t["seconds"]["lost"] > 0 and t["seconds"]["step"] > 0 and t["seconds"]["compile"] > 0
  assert goodput.summary(t) in second.stdout  # printed at exit
  assert f"({redone} steps redone)" in second.stdout
