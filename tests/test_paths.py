"""Portable run directories: a run can be moved, copied and used from any working directory."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

from calm import config, paths, trainer
from conftest import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Tiny AE + CALM trained under `mv/` with paths relative to the working directory."""
  root = tmp_path_factory.mktemp("portable")
  (root / "data").symlink_to(ROOT / "data")
  common = ["checkpoint.async_save=false", "train.steps=2", "data.eval=",
            "data.tokenizer_train_bytes=100000", "data.train=data/gutenberg-slice/train",
            "eval.data=data/gutenberg-slice/heldout"]
  cwd = os.getcwd()
  os.chdir(root)
  try:
    trainer.train(config.load(TINY, ["run_dir=mv/ae", "stage=autoencoder", *common]),
                  progress=False)
    trainer.train(config.load(TINY, ["run_dir=mv/calm", "stage=calm", "train.autoencoder=mv/ae",
                                     *common]), progress=False)
  finally:
    os.chdir(cwd)
  return root


def cli(cwd, *args):
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=600, env=subprocess_env())


def test_saved_config_is_relative_to_the_run_directory(trained):
  raw = yaml.safe_load((trained / "mv" / "calm" / "config.yaml").read_text())
  assert raw["run_dir"] == "."
  assert raw["train"]["autoencoder"] == os.path.join("..", "ae")
  assert raw["data"]["train"] == os.path.join("..", "..", "data", "gutenberg-slice", "train")
  cfg = paths.load_config(trained / "mv" / "calm" / "config.yaml")
  assert pathlib.Path(cfg.run_dir) == trained / "mv" / "calm"
  assert cfg.train.autoencoder == str(trained / "mv" / "ae")


def test_moved_run_samples_and_evaluates_from_another_directory(trained):
  shutil.move(trained / "mv", trained / "mv_moved")
  elsewhere = trained / "elsewhere"
  elsewhere.mkdir()
  cfg = os.path.join("..", "mv_moved", "calm", "config.yaml")
  r = cli(elsewhere, str(ROOT / "sample.py"), "--config", cfg, "--prompt", "hi",
          "--max-tokens", "4")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.startswith("--- sample 0 ---\nhi")
  r = cli(elsewhere, "-m", "calm.evaluate", "--config", cfg, "eval.max_documents=4",
          "eval.block_tokens=64", "eval.batch_size=8")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "BrierLM" in r.stdout and (trained / "mv_moved" / "calm" / "brierlm.json").is_file()

  # A copy of the CALM run whose autoencoder lives elsewhere: an error, then an override.
  shutil.copytree(trained / "mv_moved" / "calm", trained / "copy" / "calm")
  (trained / "other").mkdir()
  shutil.move(trained / "mv_moved" / "ae", trained / "other" / "ae_elsewhere")
  cfg = str(trained / "copy" / "calm" / "config.yaml")
  r = cli(elsewhere, str(ROOT / "sample.py"), "--config", cfg, "--prompt", "hi",
          "--max-tokens", "4")
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].startswith(
      f"error: train.autoencoder: autoencoder run {trained / 'copy' / 'ae'} not found")
  r = cli(elsewhere, str(ROOT / "sample.py"), "--config", cfg, "--prompt", "hi",
          "--max-tokens", "4", f"train.autoencoder={trained / 'other' / 'ae_elsewhere'}")
  assert r.returncode == 0, r.stderr[-2000:]
