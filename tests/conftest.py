"""Test set-up: 8 fake CPU devices, float32 matmuls, fixed seeds."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEMO_DATA = ROOT / "data" / "gutenberg-slice"


@pytest.fixture
def shared_data() -> pathlib.Path:
  d = SHARED / "data"
  if not d.is_dir():
    pytest.skip("../shared/data not present")
  return d


@pytest.fixture
def demo_data() -> pathlib.Path:
  return DEMO_DATA
