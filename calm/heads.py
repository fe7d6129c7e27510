"""The registry of generative heads: `model.head.kind` → the module that implements it.

A head is one file under `calm/models/` whose `nnx.Module` owns everything about it: the network,
`loss` (per-position loss against draws of the target posterior), `draw` / `sample`, its config
checks (`validate`), FLOPs (`train_macs_per_position`), the number of target draws
(`target_draws`), whether the energy reference lines apply (`energy_references`) and its
conversion names (`reference_rows`, `normalize_reference`, `reference_config`, `architecture`,
`model_type`). A new head is that file plus one line here. This module imports nothing heavy, so
configs are checked against `KINDS` before jax loads.
"""

from __future__ import annotations

import importlib

from calm.errors import ConfigError

_HEADS = {
    "energy": "calm.models.energy_head:EnergyHead",
    "flow": "calm.models.flow_head:FlowHead",
    "diffusion": "calm.models.diffusion_head:DiffusionHead",
}
KINDS = tuple(_HEADS)


def get(kind: str) -> type:
  """The head class of `kind` (a ConfigError naming the known kinds otherwise)."""
  if kind not in _HEADS:
    raise ConfigError(f"model.head.kind: must be one of {', '.join(KINDS)}; got {kind!r}")
  module, name = _HEADS[kind].split(":")
  return getattr(importlib.import_module(module), name)
