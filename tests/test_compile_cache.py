"""The persistent compilation cache: where it lives, turning it off, several processes at once, and
a second training launch loading its step instead of compiling it."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from calm import compile_cache, config
from calm.config import CompileCacheConfig
from calm.errors import CalmError, ConfigError
from conftest import ROOT, subprocess_env

# Compiles a few programs of its own (sizes from argv) and prints the cache's hit/write counts.
_COMPILE = """
import json, sys
from calm import compile_cache, config
import jax, jax.numpy as jnp
compile_cache.enable(config.CompileCacheConfig(min_compile_secs=0.0))
for n in map(int, sys.argv[1:]):
  x = jnp.ones((n, n))
  jax.jit(lambda x: jnp.tanh(x @ x.T).cumsum(0) @ x)(x).block_until_ready()
print(json.dumps(compile_cache.counts))
"""


def test_min_compile_secs_from_the_environment_or_the_config():
  cc = config.CompileCacheConfig(min_compile_secs=2.0)
  assert compile_cache.min_compile_secs(cc, {}) == 2.0
  assert compile_cache.min_compile_secs(cc, {"CALM_COMPILE_CACHE_MIN_SECS": "0.25"}) == 0.25
  for bad in ("-1", "soon", "inf", "nan"):
    with pytest.raises(ConfigError, match=r"\$CALM_COMPILE_CACHE_MIN_SECS: must be a number"):
      compile_cache.min_compile_secs(cc, {"CALM_COMPILE_CACHE_MIN_SECS": bad})


def test_where_the_cache_lives(tmp_path):
  cc = CompileCacheConfig()
  assert compile_cache.resolve(cc, {"HOME": "/h"}) == ("/h/.cache/calm-jax/jax", "default")
  assert compile_cache.resolve(cc, {"XDG_CACHE_HOME": "/x"}) == ("/x/calm-jax/jax", "default")
  assert compile_cache.resolve(cc, {"JAX_COMPILATION_CACHE_DIR": "/j", "XDG_CACHE_HOME": "/x"}) \
      == ("/j", "$JAX_COMPILATION_CACHE_DIR")
  mine = CompileCacheConfig(dir=str(tmp_path / "c"))
  assert compile_cache.resolve(mine, {"JAX_COMPILATION_CACHE_DIR": "/j"}) == (
      str(tmp_path / "c"), "compile_cache.dir")
  # the environment wins over the config, and turns the cache off
  assert compile_cache.resolve(mine, {"CALM_COMPILE_CACHE": "/e"}) == ("/e", "$CALM_COMPILE_CACHE")
  assert compile_cache.resolve(mine, {"CALM_COMPILE_CACHE": "off"})[0] is None
  assert compile_cache.resolve(CompileCacheConfig(enabled=False), {})[0] is None
  assert compile_cache.resolve(CompileCacheConfig(dir="gs://b/c"), {})[0] == "gs://b/c"


def test_config_section_is_validated():
  cfg = config.load(None, ["compile_cache.enabled=false", "compile_cache.dir=/tmp/x"])
  assert cfg.compile_cache == CompileCacheConfig(enabled=False, dir="/tmp/x")
  with pytest.raises(ConfigError, match="compile_cache.max_gib"):
    config.load(None, ["compile_cache.max_gib=0"])
  with pytest.raises(ConfigError, match="compile_cache.min_compile_secs"):
    config.load(None, ["compile_cache.min_compile_secs=-1"])
  with pytest.raises(ConfigError, match="unknown config key compile_cache.size"):
    config.load(None, ["compile_cache.size=3"])


def test_an_unusable_directory_is_refused_in_one_line(tmp_path, monkeypatch):
  monkeypatch.delenv("CALM_COMPILE_CACHE", raising=False)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ConfigError, match="compile_cache.dir: cannot use"):
    compile_cache.enable(CompileCacheConfig(dir=str(tmp_path / "file" / "cache")))
  monkeypatch.setenv("CALM_COMPILE_CACHE", str(tmp_path / "file" / "cache"))
  with pytest.raises(ConfigError, match=r"\$CALM_COMPILE_CACHE: cannot use"):
    compile_cache.enable(CompileCacheConfig())


def test_a_cache_written_without_a_size_limit_is_adopted(tmp_path):
  """Programs jax wrote with no size limit (no last-use stamps) get stamps, so writes with the
  limit do not fail on them."""
  (tmp_path / "jit_f-abc-cache").write_bytes(b"program")
  (tmp_path / "jit_g-def-cache").write_bytes(b"program")
  (tmp_path / "jit_g-def-atime").write_bytes((7).to_bytes(8, "little"))
  compile_cache._stamp_unstamped(str(tmp_path))
  assert (tmp_path / "jit_f-abc-atime").stat().st_size == 8
  assert int.from_bytes((tmp_path / "jit_g-def-atime").read_bytes(), "little") == 7


def _compile_in(cache: pathlib.Path, *sizes: int) -> subprocess.Popen:
  env = subprocess_env(CALM_COMPILE_CACHE=str(cache))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.pop(compile_cache.MIN_SECS_ENV, None)  # its config writes even the tiny programs
  return subprocess.Popen([sys.executable, "-c", _COMPILE, *map(str, sizes)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _counts(p: subprocess.Popen) -> dict:
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-2000:]
  assert "persistent compilation cache" not in err.lower(), err[-2000:]  # no read/write errors
  return json.loads(out.strip().splitlines()[-1])


def test_two_processes_share_one_cache_at_once(tmp_path):
  cache = tmp_path / "cache"
  sizes = (24, 40, 56, 72)
  a, b = _compile_in(cache, *sizes), _compile_in(cache, *reversed(sizes))  # both at once
  ca, cb = _counts(a), _counts(b)
  # every program was compiled by one of them at least (and loaded by the other when it came
  # second); none was read half written
  assert ca["hits"] + ca["writes"] >= len(sizes) and cb["hits"] + cb["writes"] >= len(sizes)
  entries = list(cache.glob("*-cache"))
  assert entries and all(e.stat().st_size > 0 for e in entries)
  third = _counts(_compile_in(cache, *sizes))  # a later launch compiles nothing
  assert third["writes"] == 0 and third["hits"] >= len(sizes)


def test_calm_plan_fills_the_cache_the_trainer_loads_from(tmp_path, tiny_runs):
  """The documented way to compile ahead of time: `calm-plan` on the machine that will train
  (here without --topology), then `calm-train` loads the step instead of compiling it."""
  env = subprocess_env(CALM_COMPILE_CACHE=str(tmp_path / "cache"))
  common = ["--config", "configs/tiny.yaml", "stage=calm", f"train.autoencoder={tiny_runs}/ae"]
  run = lambda *args: subprocess.run([sys.executable, *args], env=env, cwd=ROOT,
                                     capture_output=True, text=True, timeout=300)
  plan_out = run("-m", "calm.plan", *common, "--no-baseline")
  assert plan_out.returncode == 0, plan_out.stderr[-2000:]
  assert any((tmp_path / "cache").glob("jit_train_step-*-cache"))
  train_out = run("train.py", *common, f"run_dir={tmp_path}/run", "train.steps=1", "data.eval=",
                  f"data.tokenizer={tiny_runs}/ae/tokenizer.json", "checkpoint.async_save=false")
  assert train_out.returncode == 0, train_out.stderr[-2000:]
  line = next(l for l in train_out.stdout.splitlines() if "compiled in" in l)
  assert "from the compilation cache" in line


@pytest.fixture
def cache_in(tmp_path, monkeypatch):
  """This process's compilation cache in tmp_path/cache for one test, then the suite's again."""
  monkeypatch.setenv("CALM_COMPILE_CACHE", str(tmp_path / "cache"))
  compile_cache.enable()
  yield tmp_path / "cache"
  monkeypatch.undo()
  compile_cache.enable()


def test_a_topology_plan_is_reused_by_the_next_launch(cache_in, monkeypatch):
  """For a TPU topology described here (jax can write its executable but not load it back), the
  plan's analysis is kept beside the cache and a second plan of the same program reuses it."""
  import jax

  from calm import plan

  monkeypatch.setattr(plan, "_compile_only", lambda devices: True)  # CPU devices stand in
  cfg = config.load(ROOT / "configs" / "tiny.yaml", ["stage=ar", "model.remat=full",
                                                     "mesh.data=1"])
  first = plan.plan(cfg, jax.devices()[:1], baseline=False)
  assert first.reused_from is None and len(list(cache_in.glob("calm-plan-*.json"))) == 1
  second = plan.plan(cfg, jax.devices()[:1], baseline=False)
  assert second.reused_from == pytest.approx(first.compile_seconds)
  assert (second.total_bytes, second.flops) == (first.total_bytes, first.flops)
  assert "analysis from an earlier launch" in plan.report(cfg, second)
  other = plan.plan(config.replace(cfg, **{"model.remat": "none"}), jax.devices()[:1],
                    baseline=False)  # another program: compiled
  assert other.reused_from is None and len(list(cache_in.glob("calm-plan-*.json"))) == 2
  record = next(cache_in.glob("calm-plan-*.json"))  # a refusal is remembered as a refusal
  record.write_text(json.dumps({"refused": "does not fit: 9 GiB over", "seconds": 1.0}))
  with pytest.raises(CalmError, match="does not fit: 9 GiB over"):
    for c in (cfg, config.replace(cfg, **{"model.remat": "none"})):
      plan.plan(c, jax.devices()[:1], baseline=False)
