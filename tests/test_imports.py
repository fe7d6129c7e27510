"""The package's import graph: acyclic (function-level imports included) and layered."""

import ast
import pathlib
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

PKG = ROOT / "calm"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """{module: calm modules it imports anywhere in its source (top level or inside functions)}."""
  modules = {_module_name(p): p for p in PKG.rglob("*.py")}
  graph: dict[str, set[str]] = {m: set() for m in modules}
  for mod, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      for n in names:
        if n in modules and n != mod and n != "calm":
          graph[mod].add(n)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1 = on the stack, 2 = done
  stack: list[str] = []

  def visit(m: str) -> list[str] | None:
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        return stack[stack.index(n):] + [n]
      if n not in state and (c := visit(n)):
        return c
    state[m] = 2
    stack.pop()
    return None

  for m in sorted(graph):
    if m not in state and (c := visit(m)):
      return c
  return None


def test_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_calm_import_graph_is_acyclic():
  graph = import_graph()
  assert "calm.run" in graph and "calm.checkpoint" in graph["calm.run"]
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("module,absent", [
    ("calm.tokenizer", ("calm.data",)),  # tokenizers never pull in the data pipeline
    ("calm.checkpoint", ("calm.stages", "calm.models")),  # storage does not know the models
    ("calm.paths", ("jax",)),  # resolving a run's config stays light
])
def test_module_imports_alone_without_its_upper_layers(module, absent):
  code = (f"import importlib, sys; importlib.import_module({module!r}); "
          f"print(' '.join(m for m in {absent!r} if m in sys.modules))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     env=subprocess_env())
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == "", f"{module} imported {r.stdout.strip()}"


def test_console_scripts_point_at_callables():
  import importlib
  import tomllib

  scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
  assert {"calm-train", "calm-sample", "calm-eval", "calm-convert"} <= set(scripts)
  for name, target in scripts.items():
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func)), name


def test_console_script_reports_a_user_mistake_in_one_line(tmp_path):
  code = ("import sys; from calm.cli import train; "
          "sys.argv = ['calm-train', '--config', 'nope.yaml']; sys.exit(train())")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     env=subprocess_env(), cwd=tmp_path)
  assert r.returncode == 2 and r.stderr.strip() == "error: config file not found: nope.yaml"


def test_entry_points_survive_their_commands_being_imported():
  import importlib

  import calm.cli

  for name in ("training", "generation"):
    importlib.import_module(f"calm.cli.{name}")
  assert all(callable(getattr(calm.cli, n)) for n in ("train", "sample"))


def test_calm_train_refuses_a_missing_autoencoder_before_importing_jax(tmp_path):
  code = ("import sys; from calm.cli import train; "
          "sys.argv = ['calm-train', 'stage=calm', 'run_dir=r', 'train.autoencoder=no_ae']; "
          "rc = train(); print('jax' in sys.modules); sys.exit(rc)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     env=subprocess_env(), cwd=tmp_path)
  assert r.returncode == 2 and r.stderr.strip() == (
      "error: train.autoencoder: autoencoder run no_ae not found; give its directory with "
      "train.autoencoder=DIR")
  assert r.stdout.strip() == "False"  # refused before the heavy imports
  assert not (tmp_path / "r").exists()
