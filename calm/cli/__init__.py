"""Console entry points (`[project.scripts]` in pyproject.toml): each reports a user mistake as
one `error: ...` line with exit code 2 (`calm.errors.cli`) and imports its command lazily, so
`--help` and config errors answer before jax loads. The commands' modules have names other than
the entry points', so importing one never replaces an entry point on this package."""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading
from typing import Callable

from calm.errors import cli


def _command(module: str, exit_when_done: bool = False) -> Callable[[], int]:
  """The console entry point of `module.main`, imported when the command runs.
  `exit_when_done`: a successful command ends the process itself (`_exit_now`)."""

  def run() -> int:
    code = cli(importlib.import_module(module).main)()
    if exit_when_done and code == 0:
      _exit_now(code)
    return code

  return run


def _exit_now(code: int) -> None:
  """Ends the process without the interpreter's teardown: ~0.5 s of freeing jax's objects that
  a training launch would spend outside its goodput ledger. Everything the command wrote is
  closed by then; non-daemon threads are joined and exit handlers run as at a normal exit."""
  for t in threading.enumerate():
    if t is not threading.current_thread() and not t.daemon:
      t.join()
  atexit._run_exitfuncs()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


train = _command("calm.cli.training", exit_when_done=True)
sample = _command("calm.cli.generation")
evaluate = _command("calm.cli.evaluation")
convert = _command("calm.cli.conversion")
prepare = _command("calm.cli.preparation")
plan = _command("calm.cli.planning")
serve = _command("calm.cli.serving")
