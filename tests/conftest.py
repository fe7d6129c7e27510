"""Test set-up: 8 fake CPU devices, float32 matmuls, fixed seeds."""

import os
import pathlib
import tempfile

# One compilation cache for the whole run, shared with the tests' subprocesses (they compile
# many of the same tiny programs), never the user's ~/.cache (`calm.compile_cache`).
os.environ.setdefault("CALM_COMPILE_CACHE",
                      os.path.join(tempfile.gettempdir(), "calm-jax-test-compile-cache"))
# Only programs that take a while to compile are written: each write to a size-limited cache
# scans the whole directory, and the suite compiles thousands of tiny programs (O(N²) in all).
# Measured on the 2-core CI machine, clean clone: pytest 1,768 s with this, 2,245 s without.
os.environ.setdefault("CALM_COMPILE_CACHE_MIN_SECS", "0.1")
# The suite is written for 8 fake CPU devices; on a GPU/TPU machine it still runs on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
from calm import compile_cache  # noqa: E402

compile_cache.enable()

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEMO_DATA = ROOT / "data" / "gutenberg-slice"


def subprocess_env(**extra: str) -> dict[str, str]:
  """This process's environment with the repo first on PYTHONPATH, plus `extra`."""
  path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
  return {**os.environ, "PYTHONPATH": path, **extra}


def load_fixture(path: pathlib.Path):
  """(npz, meta dict) of an official-code fixture; skips the test when it is not present."""
  import json

  import numpy as np

  if not path.is_file():
    pytest.skip(f"{path} not present")
  npz = np.load(path)
  return npz, json.loads(str(npz["meta"]))


@pytest.fixture
def shared_data() -> pathlib.Path:
  d = SHARED / "data"
  if not d.is_dir():
    pytest.skip("../shared/data not present")
  return d


@pytest.fixture
def demo_data() -> pathlib.Path:
  return DEMO_DATA


TFDS_DOCS = [
    "The Time Traveller (for so it will be convenient to speak of him) was expounding.",
    "“You must follow me carefully.”",
    "Filby became pensive.\nLine two of the same document.",
    "Clearly, the Time Traveller proceeded, any real body must have extension in four directions.",
    "There are really four dimensions, three which we call the three planes of Space.",
] * 3


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  """A tiny ArrayRecord TFDS dataset (train: TFDS_DOCS, test: TFDS_DOCS[:2]) built without
  TensorFlow."""
  import tensorflow_datasets as tfds

  class CalmTinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "n": np.int32}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(TFDS_DOCS),
              "test": self._generate_examples(TFDS_DOCS[:2])}

    def _generate_examples(self, docs):
      for i, d in enumerate(docs):
        yield i, {"text": d, "n": i}

  root = tmp_path_factory.mktemp("tfds")
  CalmTinyText(data_dir=str(root), file_format="array_record").download_and_prepare()
  return root


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> pathlib.Path:
  """Tiny AE, CALM and AR runs (a few steps each) sharing one tokenizer: ROOT/{ae,calm,ar}."""
  from calm import config, trainer

  root = tmp_path_factory.mktemp("runs")
  tiny = ROOT / "configs" / "tiny.yaml"
  common = ["checkpoint.async_save=false", "train.steps=3", "data.eval=",
            "data.tokenizer_train_bytes=200000"]
  trainer.train(config.load(tiny, [f"run_dir={root}/ae", "stage=autoencoder", *common]),
                progress=False)
  tok = f"data.tokenizer={root}/ae/tokenizer.json"
  trainer.train(config.load(tiny, [f"run_dir={root}/calm", "stage=calm", tok,
                                   f"train.autoencoder={root}/ae", *common]), progress=False)
  trainer.train(config.load(tiny, [f"run_dir={root}/ar", "stage=ar", tok, *common]),
                progress=False)
  return root


def randomize(module, seed: int) -> None:
  """Re-draws every matrix ~ N(0, 1/fan_in) in place: a 3-step run's zero-initialised head
  output gives every prompt and seed the same chunk, which would make equalities vacuous."""
  from flax import nnx

  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [x if x.ndim < 2 else jax.random.normal(k, x.shape) * float(np.prod(x.shape[:-1])) ** -0.5
         for x, k in zip(leaves, keys)]
  nnx.update(module, jax.tree.unflatten(treedef, new))


@pytest.fixture(scope="session")
def lively(tiny_runs):
  """CALM and AR runs whose outputs depend on the prompt and the seed."""
  import calm

  out = {s: calm.open(tiny_runs / s) for s in ("calm", "ar")}
  randomize(out["calm"].model, 1)
  randomize(out["calm"].autoencoder.model, 2)
  randomize(out["ar"].model, 3)
  return out
