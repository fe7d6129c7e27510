"""Console entry points (`[project.scripts]` in pyproject.toml): each reports a user mistake as
one `error: ...` line with exit code 2 (`calm.errors.cli`) and imports its command lazily, so
`--help` and config errors answer before jax loads. The commands' modules have names other than
the entry points', so importing one never replaces an entry point on this package."""

from __future__ import annotations

import importlib
from typing import Callable

from calm.errors import cli


def _command(module: str) -> Callable[[], int]:
  """The console entry point of `module.main`, imported when the command runs."""
  return lambda: cli(importlib.import_module(module).main)()


train = _command("calm.cli.training")
sample = _command("calm.cli.generation")
evaluate = _command("calm.cli.evaluation")
convert = _command("calm.cli.conversion")
prepare = _command("calm.cli.preparation")
plan = _command("calm.cli.planning")
serve = _command("calm.cli.serving")
