"""The registry of training stages: `stage` → the object that owns everything stage-specific.

A stage (`autoencoder`, `calm`, `ar`) is one file here whose `Stage` subclass says how to build
its model, its training loss and evaluation metrics, its FLOPs, the config keys its checkpoint
depends on, how BrierLM scores it, how it generates, and its names in the official checkpoints.
Everything outside this package asks the stage object instead of comparing stage names.
"""

from __future__ import annotations

from flax import nnx

from calm import rng
from calm.config import Config
from calm.errors import ConfigError

from calm.stages.ar import ARStage
from calm.stages.autoencoder import AutoencoderStage
from calm.stages.base import Metrics, Stage
from calm.stages.calm import CalmStage

STAGES: dict[str, type[Stage]] = {"autoencoder": AutoencoderStage, "calm": CalmStage,
                                  "ar": ARStage}


def get(name: str, cfg: Config | None = None) -> Stage:
  """The stage called `name` (bound to `cfg` when given)."""
  if name not in STAGES:
    raise ConfigError(f"stage: must be one of {', '.join(STAGES)}; got {name!r}")
  return STAGES[name](cfg)


def get_stage(cfg: Config) -> Stage:
  """`cfg.stage` bound to `cfg`."""
  return get(cfg.stage, cfg)


def build_model(cfg: Config) -> nnx.Module:
  """The stage's model with freshly initialised parameters (seed `cfg.seed`)."""
  stage = get_stage(cfg)
  stage.validate(cfg.model)
  return stage.build(cfg.model, rng.init_rngs(cfg.seed))


__all__ = ["STAGES", "Metrics", "Stage", "build_model", "get", "get_stage"]
