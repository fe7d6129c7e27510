"""Gaussian diffusion schedules (float64, as the reference): betas, respacing, derived tables.

A respaced schedule keeps a subset of the training steps and recomputes its betas so that the
cumulative products ᾱ at the kept steps are unchanged; the network still sees the original step
index (`timesteps`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np


def cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
  """β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta), ᾱ(t) = cos²((t + 0.008)/1.008 · π/2)."""
  abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - abar((i + 1) / steps) / abar(i / steps), max_beta)
                   for i in range(steps)], np.float64)


def linear_betas(steps: int) -> np.ndarray:
  """Ho et al.'s linear schedule, rescaled to `steps`."""
  scale = 1000 / steps
  return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)


def space_timesteps(num_steps: int, count: int) -> list[int]:
  """`count` steps of [0, num_steps) evenly strided, ends included (the reference's rounding)."""
  if count > num_steps:
    raise ValueError(f"cannot divide {num_steps} steps into {count}")
  stride = 1 if count <= 1 else (num_steps - 1) / (count - 1)
  taken, cur = [], 0.0
  for _ in range(count):
    taken.append(round(cur))
    cur += stride
  return sorted(set(taken))


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """Per-step tables of a diffusion process (index = step of this, possibly respaced, chain)."""

  betas: np.ndarray
  timesteps: np.ndarray  # network time index of each step

  def __post_init__(self):
    b = self.betas
    ac = np.cumprod(1.0 - b)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = b * (1.0 - ac_prev) / (1.0 - ac)
    tables = {
        "sqrt_ac": np.sqrt(ac),
        "sqrt_1m_ac": np.sqrt(1.0 - ac),
        "sqrt_recip_ac": np.sqrt(1.0 / ac),
        "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1),
        "post_log_var": np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1
                        else np.zeros(1),
        "post_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
        "post_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
        "log_betas": np.log(b),
    }
    for k, v in tables.items():
      object.__setattr__(self, k, v)

  @property
  def num_steps(self) -> int:
    return len(self.betas)

  def f32(self, name: str) -> np.ndarray:
    """A table as float32 (the reference indexes its float64 tables, then casts)."""
    return getattr(self, name).astype(np.float32)


def _betas(schedule: str, steps: int) -> np.ndarray:
  if schedule == "cosine":
    return cosine_betas(steps)
  if schedule == "linear":
    return linear_betas(steps)
  raise ValueError(f"unknown noise schedule {schedule!r}")


@functools.cache
def make_schedule(schedule: str, steps: int, respaced: int | None = None) -> Schedule:
  """The training schedule (`respaced` None) or its `respaced`-step sampling chain. Both go
  through the respacing (as the reference's), which recomputes even the kept-all betas."""
  betas = _betas(schedule, steps)
  keep = space_timesteps(steps, steps if respaced is None else respaced)
  ac = np.cumprod(1.0 - betas)
  last, new = 1.0, []
  for i in keep:
    new.append(1 - ac[i] / last)
    last = ac[i]
  return Schedule(np.array(new, np.float64), np.array(keep))
