"""The command lines end to end on tiny runs: train → sample → evaluate, and their errors."""

import json
import pathlib
import subprocess
import sys

import pytest

from calm.errors import ConfigError


ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def runs(tiny_runs):
  """Tiny AE, CALM and AR runs (a few steps each) sharing one tokenizer."""
  return tiny_runs


def run(*args, stdin=None):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        input=stdin, timeout=600)


def assert_one_line_error(r, needle):
  assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
  err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
  assert len(err) == 1 and needle in err[0], r.stderr[-1500:]
  assert "Traceback" not in r.stderr


def test_sample_calm_and_ar(runs):
  r = run("sample.py", "--config", f"{runs}/calm/config.yaml", "--prompt", "The King said",
          "--max-tokens", "8", "--temperature", "0.5", "--sampler", "batch",
          "--num-samples", "2")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.count("--- sample") == 2 and "The King said" in r.stdout
  assert "tokens/s" in r.stderr
  r = run("sample.py", "--config", f"{runs}/ar/config.yaml", "--max-tokens", "8",
          stdin="The Queen said")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "The Queen said" in r.stdout


def test_evaluate_writes_table_and_json(runs, tmp_path):
  out = tmp_path / "b.json"
  r = run("-m", "calm.evaluate", "--config", f"{runs}/calm/config.yaml", "--out", str(out),
          "eval.data=data/gutenberg-slice/heldout", "eval.max_documents=8")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "BrierLM" in r.stdout and "normalised score" in r.stdout
  result = json.loads(out.read_text())
  e = result["energy"]
  assert e["oracle_loss"] > 0 and e["baseline_loss"] > 0
  gap = e["baseline_loss"] - e["oracle_loss"]
  if gap > 2 * e["reference_gap_se"]:
    assert e["norm_score"] == pytest.approx((e["baseline_loss"] - e["loss"]) / gap)
  else:  # a 3-step run: the references do not separate, the score is n/a
    assert "norm_score" not in e and "normalised score n/a" in r.stdout
  text = json.dumps(result)
  for key in ("block_tokens", "chunk_size", "scored_positions", "documents", "seed"):
    assert key in text


def test_evaluate_autoencoder_reconstruction(runs, tmp_path):
  out = tmp_path / "r.json"
  r = run("-m", "calm.evaluate", "--config", f"{runs}/ae/config.yaml", "--out", str(out),
          "eval.data=data/gutenberg-slice/heldout", "eval.max_documents=16")
  assert r.returncode == 0, r.stderr[-2000:]
  result = json.loads(out.read_text())
  for key in ("token_acc", "chunk_exact", "token_acc_noise0.3"):
    assert 0.0 <= result[key] <= 1.0
  assert result["chunk_exact"] <= result["token_acc"]
  assert result["protocol"]["tokens"] == 16 * 64


@pytest.mark.parametrize("extra,needle", [
    (["--temperature", "1.5"], "sampling.temperature"),
    (["--temperature", "nan"], "sampling.temperature"),
    (["--temperature", "0"], "sampling.temperature"),
    (["--prompt", "word " * 400], "prompt too long"),
    (["sampling.bogus=1"], "unknown config key sampling.bogus"),
    (["--num-samples", "0"], "sampling.num_samples: must be >= 1"),
    (["--num-samples", "-1"], "sampling.num_samples: must be >= 1"),
])
def test_sample_errors(runs, extra, needle):
  assert_one_line_error(run("sample.py", "--config", f"{runs}/calm/config.yaml",
                            "--prompt", "x", *extra), needle)


def test_sample_prompt_not_utf8(runs, tmp_path):
  binary = tmp_path / "p.txt"
  binary.write_bytes(bytes(range(256)) * 4)
  assert_one_line_error(run("sample.py", "--config", f"{runs}/ar/config.yaml", "--file",
                            str(binary)), f"prompt file {binary} is not UTF-8 text")
  r = subprocess.run([sys.executable, "sample.py", "--config", f"{runs}/ar/config.yaml"],
                     cwd=ROOT, capture_output=True, input=b"\xff\xfe abc", timeout=600)
  assert r.returncode == 2 and r.stderr.decode().strip().splitlines() == [
      "error: the prompt on stdin is not UTF-8 text (invalid byte at offset 0)"], r.stderr


def test_run_dir_is_a_file(tmp_path):
  f = tmp_path / "notes.txt"
  f.write_text("not a run")
  for run_dir in (f, f / "sub"):
    assert_one_line_error(run("train.py", "--config", str(TINY), f"run_dir={run_dir}"),
                          "exists and is not a directory")
  assert f.read_text() == "not a run"


def test_missing_and_corrupt_checkpoints(runs, tmp_path):
  assert_one_line_error(run("sample.py", "--config", f"{runs}/ar/config.yaml", "--prompt", "x",
                            f"run_dir={tmp_path}/nowhere"), "not found")
  # A CALM stage pointed at an AR run as its autoencoder.
  assert_one_line_error(run("train.py", "--config", str(TINY), "stage=calm",
                            f"run_dir={tmp_path}/c", f"train.autoencoder={runs}/ar"),
                        "expected 'autoencoder'")
  # Damage the array files of a copy of the AR run.
  import shutil
  bad = tmp_path / "bad"
  shutil.copytree(runs / "ar", bad)
  for f in (bad / "checkpoints").rglob("*"):
    if f.is_file() and "params" in f.parts and f.stat().st_size > 100:
      f.write_bytes(b"\0" * 16)
  assert_one_line_error(run("sample.py", "--config", f"{runs}/ar/config.yaml", "--prompt", "x",
                            f"run_dir={bad}"), "corrupt")


def test_train_data_errors(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  assert_one_line_error(run("train.py", "--config", str(TINY), f"run_dir={tmp_path}/r",
                            f"data.train={empty}"), "empty")
  assert_one_line_error(run("train.py", "--config", str(TINY), f"run_dir={tmp_path}/r",
                            f"data.train={tmp_path}/missing.txt"), "missing.txt")


def test_sample_warns_when_chunks_hit_the_cap(runs):
  """A chunk that hits sampling.max_attempts is a fallback draw: one warning line says so."""
  # At T = 1/2 acceptance needs two identical draws: one allowed draw caps every chunk.
  r = run("sample.py", "--config", f"{runs}/calm/config.yaml", "--prompt", "The King said",
          "--max-tokens", "8", "--temperature", "0.5", "--num-samples", "2",
          "sampling.max_attempts=1")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.count("--- sample") == 2 and "4 capped]" in r.stderr
  warn = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
  assert len(warn) == 1, r.stderr[-2000:]
  for needle in ("4 of 4 chunks", "sampling.max_attempts=1", "fallback", "--sampler batch"):
    assert needle in warn[0]
  r = run("sample.py", "--config", f"{runs}/calm/config.yaml", "--prompt", "The King said",
          "--max-tokens", "8", "--temperature", "0.5")
  assert r.returncode == 0 and "0 capped]" in r.stderr, r.stderr[-2000:]
  assert "warning:" not in r.stderr


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_train_attention_kernel_missing_here(tmp_path, impl):
  """cuDNN and splash attention on a CPU: one line naming model.attention and what runs here."""
  r = run("train.py", "--config", str(TINY), f"run_dir={tmp_path}/r", "stage=ar",
          f"model.attention={impl}")
  assert_one_line_error(r, f"model.attention={impl}")
  assert "available here: auto, xla, chunked" in r.stderr
  from calm import config, trainer

  assert not (tmp_path / "r").exists()  # refused before anything was written
  with pytest.raises(ConfigError, match=f"model.attention={impl}"):
    trainer.setup(config.load(TINY, ["stage=ar", f"model.attention={impl}",
                                     f"run_dir={tmp_path}/s"]))
