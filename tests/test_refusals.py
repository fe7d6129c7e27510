"""Refused commands leave every file as it was; the tokenizer and autoencoder a model was trained
with are checked wherever it is used; evaluation does not depend on how its rows are batched."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import calm
from calm import config, evaluate, metrics, trainer
from calm.errors import CalmError, CheckpointError, ConfigError, DataError
from calm.tokenizer import train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
COMMON = ["checkpoint.async_save=false", "data.eval=", "data.tokenizer_train_bytes=200000"]


def snapshot(root: pathlib.Path) -> dict[str, bytes]:
  return {p.relative_to(root).as_posix(): p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


def train_py(*args, cwd=ROOT):
  return subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(TINY), *args],
                        cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture
def copies(tiny_runs, tmp_path):
  """Private copies of the tiny runs (their config.yaml paths are relative: they still work)."""
  for s in ("ae", "calm", "ar"):
    shutil.copytree(tiny_runs / s, tmp_path / s)
  return tmp_path


def test_refused_resume_leaves_the_run_byte_identical(copies):
  """A calm run started in an autoencoder's directory, a resume that changes the head or the
  depth, and one with train.steps below the checkpoint's step are refused in one line, before
  anything is written."""
  ae, cm = copies / "ae", copies / "calm"
  tok = f"data.tokenizer={ae}/tokenizer.json"
  cases = [
      (ae, ["stage=calm", f"run_dir={ae}", f"train.autoencoder={ae}", tok], "autoencoder"),
      (cm, ["stage=calm", f"run_dir={cm}", f"train.autoencoder={ae}", tok,
            "model.head.kind=flow"], "model.head.kind"),
      (cm, ["stage=calm", f"run_dir={cm}", f"train.autoencoder={ae}", tok,
            "model.backbone.num_layers=3"], "num_layers"),
      (cm, ["stage=calm", f"run_dir={cm}", f"train.autoencoder={ae}", tok, "train.steps=2"],
       "train.steps"),
  ]
  for run_dir, args, needle in cases:
    before = snapshot(run_dir)
    r = train_py(*args, *COMMON)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert "process 0/1" not in r.stdout  # no noise before the error
    assert snapshot(run_dir) == before, needle


def test_a_failed_new_run_leaves_no_directory(tmp_path):
  run_dir = tmp_path / "new"
  with pytest.raises(CalmError):
    trainer.train(config.load(TINY, [f"run_dir={run_dir}", "stage=ar", "train.steps=1",
                                     f"data.train={tmp_path}/missing.txt", *COMMON]),
                  progress=False)
  assert not run_dir.exists()


def _other_tokenizer(tmp_path) -> pathlib.Path:
  text = (ROOT / "data" / "gutenberg-slice" / "heldout").glob("*.txt")
  tok = train_tokenizer([next(text).read_text()[:100_000]], 300)
  path = tmp_path / "other-tokenizer.json"
  tok.save(path)
  return path


def test_another_tokenizer_is_refused_everywhere(copies, tmp_path):
  other = _other_tokenizer(tmp_path)
  for s in ("calm", "ar"):
    with pytest.raises(ConfigError, match="another tokenizer"):
      calm.open(copies / s, overrides=[f"data.tokenizer={other}"])
  before = snapshot(copies / "calm")
  with pytest.raises(ConfigError, match="another tokenizer"):  # resuming with it
    trainer.train(config.load(TINY, [f"run_dir={copies}/calm", "stage=calm",
                                     f"train.autoencoder={copies}/ae", f"data.tokenizer={other}",
                                     "train.steps=4", *COMMON]), progress=False)
  assert snapshot(copies / "calm") == before
  with pytest.raises(ConfigError, match="another tokenizer"):  # a new CALM on that AE
    trainer.train(config.load(TINY, [f"run_dir={tmp_path}/calm2", "stage=calm",
                                     f"train.autoencoder={copies}/ae", f"data.tokenizer={other}",
                                     "train.steps=1", *COMMON]), progress=False)
  assert not (tmp_path / "calm2").exists()


def test_inference_checks_the_autoencoder_fingerprint(copies):
  """A CALM run opened with another autoencoder of the same shape is refused, as training
  refuses it."""
  ae2 = copies / "ae2"
  trainer.train(config.load(TINY, [f"run_dir={ae2}", "stage=autoencoder", "seed=7",
                                   "train.steps=1", f"data.tokenizer={copies}/ae/tokenizer.json",
                                   *COMMON]), progress=False)
  with pytest.raises(CheckpointError, match="not the autoencoder this model was trained on"):
    calm.open(copies / "calm", overrides=[f"train.autoencoder={ae2}"])
  assert calm.open(copies / "calm").autoencoder is not None


def test_token_ids_outside_the_vocabulary_are_a_data_error(copies, tmp_path):
  from calm import prepare

  run = calm.open(copies / "ar")
  src = tmp_path / "docs.txt"
  src.write_text("The old man and the sea.\n\nIt was the best of times.\n\n" * 20)
  out = tmp_path / "prep"
  cfg = config.load(TINY, [f"data.tokenizer={copies}/ae/tokenizer.json"])
  prepare.prepare(cfg, out, source=str(src), workers=1)
  shard = sorted(out.glob("shard-*.bin"))[0]
  dtype = np.dtype(json.loads((out / "manifest.json").read_text())["dtype"])
  ids = np.fromfile(shard, dtype)
  ids[5] = run.config.model.vocab_size  # one past the embedding table
  ids.tofile(shard)
  with pytest.raises(DataError, match="outside the model's vocabulary"):
    run.score(f"prepared:{out}")
  with pytest.raises(DataError, match="prepared directory .* not found"):
    run.score(f"prepared:{tmp_path}/nowhere")


def test_normalised_score_is_left_out_when_the_references_do_not_separate():
  refs = {"baseline_loss": 1.0, "oracle_loss": 1.2, "reference_gap_se": 0.0}
  ev = metrics.with_references({"loss": 0.9}, refs)
  assert "norm_score" not in ev
  assert "normalised score n/a" in evaluate.format_energy(ev)
  noisy = metrics.with_references({"loss": 0.9}, {**refs, "oracle_loss": 0.95,
                                                   "reference_gap_se": 0.04})
  assert "norm_score" not in noisy  # a gap of 0.05 within 2 standard errors
  good = metrics.with_references({"loss": 0.9}, {**refs, "oracle_loss": 0.5})
  assert good["norm_score"] == pytest.approx(0.2)
  assert "normalised score 0.200" in evaluate.format_energy(good)


def test_config_values_that_read_as_mappings_and_negative_document_caps():
  assert config.parse_override("eval.data=prepared:") == ("eval.data", "prepared:")
  assert config.parse_override("eval.noise_sigmas=[0.1, 0.2]")[1] == [0.1, 0.2]
  with pytest.raises(ConfigError, match="eval.max_documents"):
    config.load(TINY, ["eval.max_documents=-1"])


def test_eval_metrics_do_not_depend_on_gradient_accumulation(tiny_runs, tmp_path):
  """Held-out metrics (and the CALM reference lines) draw their noise row by row."""
  def ev(stage, accum, *extra):
    cfg = config.load(TINY, [f"run_dir={tmp_path}/{stage}{accum}", f"stage={stage}",
                             "train.steps=1", "train.eval_every=1", "train.batch_size=16",
                             f"train.grad_accum={accum}",
                             f"data.tokenizer={tiny_runs}/ae/tokenizer.json",
                             "data.eval=data/gutenberg-slice/heldout", "train.eval_batches=2",
                             "checkpoint.async_save=false", *extra])
    return trainer.train(cfg, progress=False).eval_history[-1]

  for stage, extra in (("autoencoder", ()), ("calm", (f"train.autoencoder={tiny_runs}/ae",))):
    a, b = ev(stage, 1, *extra), ev(stage, 2, *extra)
    assert set(a) == set(b)
    for k in set(a) - {"reference_gap_se"}:  # a spread over batches depends on the batches
      assert a[k] == pytest.approx(b[k], rel=2e-5, abs=1e-6), (stage, k)
    if stage == "calm":
      assert "baseline_loss" in a


def test_sample_refuses_prompt_and_file_together(tiny_runs, tmp_path):
  f = tmp_path / "p.txt"
  f.write_text("hello")
  r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--config",
                      str(tiny_runs / "ar" / "config.yaml"), "--prompt", "x", "--file", str(f)],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and r.stderr.strip() == (
      "error: give the prompt with --prompt or --file, not both")


def test_training_logs_are_plain_lines_off_a_terminal(tiny_runs, tmp_path):
  r = train_py("stage=ar", f"run_dir={tmp_path}/ar", "train.steps=2", "train.log_every=1",
               f"data.tokenizer={tiny_runs}/ae/tokenizer.json", *COMMON)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "\r" not in r.stdout + r.stderr
  assert "step 1: loss" in r.stdout and "step 2: loss" in r.stdout
  assert "(process 0/1: " in r.stdout.splitlines()[0]  # the layout is part of the summary
