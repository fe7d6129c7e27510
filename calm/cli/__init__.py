"""Console entry points (`[project.scripts]` in pyproject.toml): each reports a user mistake as
one `error: ...` line with exit code 2 (`calm.errors.cli`) and imports its command lazily, so
`--help` and config errors answer before jax loads."""

from __future__ import annotations

import importlib

from calm.errors import cli


def _run(module: str) -> int:
  return cli(importlib.import_module(module).main)()


def train() -> int:
  return _run("calm.cli.train")


def sample() -> int:
  return _run("calm.cli.sample")


def evaluate() -> int:
  return _run("calm.evaluate")


def convert() -> int:
  return _run("calm.convert")


def prepare() -> int:
  return _run("calm.prepare")


def plan() -> int:
  return _run("calm.plan")
