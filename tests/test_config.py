"""Config loading, overrides and one-line errors."""

import dataclasses
import pathlib
import subprocess
import sys

import pytest

from calm import config
from calm.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
  cfg = config.load(path)
  assert cfg.data.block_tokens % cfg.model.chunk_size == 0


def test_paper_sizes():
  cfg = config.load(ROOT / "configs/calm_m.yaml")
  assert (cfg.model.chunk_size, cfg.model.latent_dim) == (4, 128)
  assert (cfg.model.backbone.hidden_dim, cfg.model.backbone.num_layers) == (1024, 16)
  assert cfg.model.autoencoder.kl_clamp == 0.5 and cfg.model.autoencoder.kl_weight == 1e-3
  assert config.load(ROOT / "configs/transformer_s.yaml").stage == "ar"


def test_overrides_typed_and_nested():
  cfg = config.load(ROOT / "configs/tiny.yaml",
                    ["model.backbone.num_layers=5", "train.lr=2e-3", "stage=calm",
                     "data.shuffle=false", "eval.noise_sigmas=[0.1,0.4]", "run_dir=x/y"])
  assert cfg.model.backbone.num_layers == 5
  assert cfg.train.lr == 2e-3 and isinstance(cfg.train.lr, float)
  assert cfg.stage == "calm" and cfg.data.shuffle is False
  assert cfg.eval.noise_sigmas == (0.1, 0.4)
  assert cfg.run_dir == "x/y"
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.train.lr = 1.0  # type: ignore[misc]


def test_defaults_without_file():
  assert config.load(None).model.chunk_size == 4


@pytest.mark.parametrize("override,needle", [
    ("model.num_layerz=4", "unknown config key model.num_layerz"),
    ("bogus=1", "unknown config key bogus"),
    ("model.chunk_size=four", "model.chunk_size: expected int"),
    ("train.lr=fast", "train.lr: expected float"),
    ("data.shuffle=3", "data.shuffle: expected bool"),
    ("stage=diffusion", "stage: must be one of"),
    ("model=3", "model: expected a mapping"),
    ("model.chunk_size=0", "model.chunk_size: K must be >= 1"),
    ("data.block_tokens=66", "data.block_tokens: 66 is not a positive multiple"),
    ("model.backbone.num_heads=3", "model.backbone.num_heads"),
    ("model.backbone.num_kv_heads=3", "model.backbone.num_kv_heads"),
    ("model.head.beta=2.0", "model.head.beta"),
    ("sampling.temperature=0", "sampling.temperature"),
    ("sampling.temperature=1.5", "sampling.temperature"),
    ("sampling.temperature=.nan", "sampling.temperature"),
    ("sampling.num_samples=0", "sampling.num_samples: must be >= 1, got 0"),
    ("sampling.num_samples=-1", "sampling.num_samples: must be >= 1, got -1"),
    ("mesh.data=0", "mesh.data"),
    ("noequals", "must look like key.sub=value"),
])
def test_errors_name_the_key(override, needle):
  with pytest.raises(ConfigError) as e:
    config.load(ROOT / "configs/tiny.yaml", [override])
  msg = str(e.value)
  assert needle in msg and "\n" not in msg


def test_missing_and_invalid_files(tmp_path):
  with pytest.raises(ConfigError, match="config file not found"):
    config.load(tmp_path / "nope.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: [1, 2\n")
  with pytest.raises(ConfigError, match="invalid YAML"):
    config.load(bad)
  scalar = tmp_path / "scalar.yaml"
  scalar.write_text("3\n")
  with pytest.raises(ConfigError, match="top level must be a mapping"):
    config.load(scalar)


def test_dump_round_trip(tmp_path):
  cfg = config.load(ROOT / "configs/demo.yaml", ["model.latent_dim=24"])
  config.dump(cfg, tmp_path / "c.yaml")
  assert config.load(tmp_path / "c.yaml") == cfg


def test_replace_validates():
  cfg = config.load(ROOT / "configs/tiny.yaml")
  assert config.replace(cfg, **{"model.latent_dim": 8}).model.latent_dim == 8
  with pytest.raises(ConfigError):
    config.replace(cfg, **{"model.chunk_size": 3})  # block_tokens 64 not a multiple of 3


def test_cli_one_line_error_no_traceback():
  r = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml",
                      "model.chunk_size=0"], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 2
  assert r.stderr.strip().startswith("error: model.chunk_size")
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
