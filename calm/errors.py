"""User-facing errors: one line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable


class CalmError(Exception):
  """A user mistake (bad config, data, checkpoint, argument) reported as one line."""


class ConfigError(CalmError):
  """An invalid configuration key, type or value."""


class DataError(CalmError):
  """Missing, empty, unreadable or undecodable data."""


class CheckpointError(CalmError):
  """Missing, corrupt or incompatible checkpoint."""


class SettingError(CalmError):
  """A sampler setting the model cannot use; `field` names it (temperature, top_p, sampler)."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
  """Wraps an entry point: CalmError → `error: ...` on stderr and exit code 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs) -> int:
    try:
      return int(main(*args, **kwargs) or 0)
    except CalmError as e:
      if os.environ.get("CALM_TRACEBACK"):
        raise
      print(f"error: {e}", file=sys.stderr)
      return 2
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      return 130

  return wrapped
