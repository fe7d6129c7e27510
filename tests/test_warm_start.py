"""train.init_backbone: a CALM run starts from an AR run's (or a converted Llama's) token
embedding and decoder, bit for bit; the rest starts fresh; a resumed run restores its own
checkpoint; mismatches are refused in one line before anything is written."""

import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from calm import checkpoint, config, paths, pytree, run, trainer, warm_start
from calm.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
COMMON = ["checkpoint.async_save=false", "data.eval=", "data.tokenizer_train_bytes=200000"]


def calm_cfg(runs: pathlib.Path, run_dir, *extra: str) -> config.Config:
  return config.load(TINY, [f"run_dir={run_dir}", "stage=calm", f"train.autoencoder={runs}/ae",
                            f"data.tokenizer={runs}/ae/tokenizer.json", *COMMON, *extra])


def flat(params) -> dict[str, np.ndarray]:
  return {".".join(p): np.asarray(jax.device_get(pytree.value(v)))
          for p, v in pytree.flatten(params)[0]}


def parts(params, names=("embed", "backbone")) -> dict[str, np.ndarray]:
  return {k: v for k, v in flat(params).items() if k.split(".")[0] in names}


@pytest.mark.parametrize("head", ["energy", "flow", "diffusion"])
def test_backbone_copied_bit_for_bit_and_the_rest_fresh(tiny_runs, head):
  """Embedding table, decoder layers and final norm equal the AR run's exactly; the input
  compression and the head equal a fresh model's (same seed), for every head."""
  src = parts(run.load_model(tiny_runs / "ar").params)
  cold = trainer.setup(calm_cfg(tiny_runs, "unused", f"model.head.kind={head}"))
  warm = trainer.setup(calm_cfg(tiny_runs, "unused", f"model.head.kind={head}",
                                f"train.init_backbone={tiny_runs}/ar"))
  got, fresh = flat(warm.params), flat(cold.params)
  assert set(parts(warm.params)) == set(src) and len(src) > 10
  for k, v in src.items():
    assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
    assert not np.array_equal(fresh[k], v), k  # the copy changed something
  others = [k for k in got if k not in src]
  assert any(k.startswith("compress.") for k in others)
  assert any(k.startswith(f"{head}_head.") for k in others)
  for k in others:
    assert np.array_equal(got[k], fresh[k]), k
  assert warm.init_backbone["step"] == 3 and cold.init_backbone is None
  # copied into the model's own shardings
  for (p, a), (_, b) in zip(pytree.flatten(warm.params)[0], pytree.flatten(cold.params)[0]):
    assert pytree.value(a).sharding == pytree.value(b).sharding, p


def test_a_converted_llama_is_a_source(tiny_runs, tmp_path):
  """`calm-convert --llama`'s OUT/ar (here: the tiny AR run exported and converted back) starts
  a CALM run the same way."""
  from calm import convert

  ref = convert.export_reference(tiny_runs / "ar", tmp_path / "llama", "npz")
  ar = convert.convert(tmp_path / "out", llama=ref)["ar"]
  s = trainer.setup(calm_cfg(tiny_runs, "unused", f"train.init_backbone={ar}"))
  src = parts(run.load_model(tiny_runs / "ar").params)
  got = parts(s.params)
  assert all(np.array_equal(got[k], v) for k, v in src.items())
  assert s.init_backbone["path"] == str(ar) and s.init_backbone["converted_from"] == str(ref)


def test_source_recorded_and_resume_uses_its_own_checkpoint(tiny_runs, tmp_path, monkeypatch):
  """The checkpoint metadata names the source (path, step, fingerprint). After the source is
  replaced by another AR run, the resumed run still restores its own checkpoint: it ends equal
  to an uninterrupted run from the original source, not to one from the changed source."""
  src = tmp_path / "ar"
  shutil.copytree(tiny_runs / "ar", src)
  _, fp = checkpoint.fingerprint(src)
  args = [f"train.init_backbone={src}", "train.steps=4", "checkpoint.every=2"]
  whole = trainer.train(calm_cfg(tiny_runs, tmp_path / "whole", *args), progress=False)
  trainer.train(calm_cfg(tiny_runs, tmp_path / "cut", *args), max_steps=2, progress=False)
  step, meta = checkpoint.read_metadata(tmp_path / "cut")
  assert step == 2
  assert meta["init_backbone"] == {**meta["init_backbone"], "path": str(src), "step": 3,
                                   "fingerprint": fp, "stage": "ar"}

  # the source changes: the AR run trains two more steps in place
  trainer.train(paths.load_config(src / "config.yaml", ["train.steps=5", "checkpoint.every=1"]),
                progress=False)
  step_src, fp_new = checkpoint.fingerprint(src)
  assert step_src == 5 and fp_new != fp
  changed = parts(run.load_model(src).params)

  def never(*a, **k):
    raise AssertionError("a resumed run read its source again")

  monkeypatch.setattr(warm_start, "apply", never)
  trainer.train(calm_cfg(tiny_runs, tmp_path / "cut", *args), progress=False)
  monkeypatch.undo()
  resumed = parts(run.load_model(tmp_path / "cut").params)
  ref = parts(run.load_model(whole.run_dir).params)
  for k in ref:
    np.testing.assert_array_equal(resumed[k], ref[k], err_msg=k)
  restart = parts(trainer.setup(calm_cfg(tiny_runs, "unused", *args)).params)
  assert all(np.array_equal(restart[k], changed[k]) for k in changed)  # a new run would see it
  assert all(not np.array_equal(resumed[k], changed[k]) for k in changed)
  _, meta = checkpoint.read_metadata(tmp_path / "cut")
  assert meta["init_backbone"]["fingerprint"] == fp  # still the source it started from


def train_py(*args):
  return subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(TINY), *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_mismatched_sizes_refused_in_one_line(tiny_runs, tmp_path):
  """A source with another vocabulary: `calm-train` exits with code 2 and one line naming both
  sizes, and leaves no run directory; another depth or FFN width, a source that is not an AR run
  or a missing one are refused the same way."""
  other = tmp_path / "ar_v1024"
  trainer.train(config.load(TINY, [f"run_dir={other}", "stage=ar", "model.vocab_size=1024",
                                   f"data.tokenizer={tiny_runs}/ae/tokenizer.json", *COMMON,
                                   "train.steps=1"]), progress=False)
  r = train_py("stage=calm", f"run_dir={tmp_path}/cli", f"train.autoencoder={tiny_runs}/ae",
               f"data.tokenizer={tiny_runs}/ae/tokenizer.json", *COMMON,
               f"train.init_backbone={other}")
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith(f"error: train.init_backbone: model.vocab_size is 1024 in {other} "
                             f"but 512 in the autoencoder's"), lines[0]
  assert not (tmp_path / "cli").exists()
  cases = [
      ([f"train.init_backbone={tiny_runs}/ar", "model.backbone.ffn_dim=96"],
       "model.backbone.ffn_dim is 64 in"),
      ([f"train.init_backbone={tiny_runs}/ar", "model.backbone.num_layers=3"],
       "model.backbone.num_layers is 2 in"),
      ([f"train.init_backbone={tiny_runs}/ae"], "holds a 'autoencoder' checkpoint"),
      ([f"train.init_backbone={tmp_path}/nothing"], "is not a run directory"),
  ]
  for i, (args, needle) in enumerate(cases):
    run_dir = tmp_path / f"calm{i}"
    with pytest.raises(ConfigError) as e:
      trainer.train(calm_cfg(tiny_runs, run_dir, *args), progress=False)
    msg = str(e.value)
    assert msg.startswith("train.init_backbone: ") and needle in msg and "\n" not in msg, msg
    assert not run_dir.exists()


def test_tokenizer_of_the_source_checked(tiny_runs, tmp_path):
  """An AR run trained with another tokenizer (same vocabulary size) is refused: its embedding
  rows are other tokens."""
  other = tmp_path / "ar_tok"
  trainer.train(config.load(TINY, [f"run_dir={other}", "stage=ar", *COMMON, "train.steps=1",
                                   "data.tokenizer_train_bytes=100000"]), progress=False)
  with pytest.raises(ConfigError, match="another tokenizer"):
    trainer.train(calm_cfg(tiny_runs, tmp_path / "calm", f"train.init_backbone={other}"),
                  progress=False)
  assert not (tmp_path / "calm").exists()


def test_only_the_calm_stage_takes_a_backbone(tiny_runs, tmp_path):
  with pytest.raises(ConfigError, match="only the calm stage"):
    trainer.train(config.load(TINY, ["stage=ar", f"run_dir={tmp_path}/ar", *COMMON,
                                     f"train.init_backbone={tiny_runs}/ar"]), progress=False)
  assert not (tmp_path / "ar").exists()
