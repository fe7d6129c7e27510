"""Device mesh, the logical-axis rules table, and sharded parameter creation.

Parameters carry *logical* axis names (`nnx.with_partitioning(init, ("embed", "mlp"))`); the one
table `LOGICAL_RULES` maps them to the mesh axes ("data", "fsdp", "tensor"). A mesh axis whose
size does not divide the dimension it would shard is dropped for that array (it is replicated
along that axis instead), so tiny models shard on any mesh, and a mesh axis is used at most once
per array. Flax's eager per-variable sharding is turned off: it would treat logical names as mesh
axes. Arrays are placed here, by `sharded_init` / `state_shardings`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax
import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from calm import pytree
from calm.config import MeshConfig
from calm.errors import ConfigError

flax.config.update("flax_always_shard_variable", False)

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations / input batches
    "embed": "fsdp",  # model width: FSDP shards parameters along it
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "head_dim": None,
    "latent": None,  # small (l = 128); replicated
    "noise": None,
    "norm": None,  # scale / bias vectors
    "chunk": None,  # K·d concatenation: the "embed" dim of the other operand already shards it
}


# ----------------------------------------------------------------------------- mesh


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 entries of a MeshConfig against a device count."""
  sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]  # each >= 1 or one -1 (MeshConfig)
  fill = [i for i, s in enumerate(sizes) if s == -1]
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(
          f"mesh: {num_devices} devices are not divisible by the fixed axes "
          f"{' x '.join(f'{n}={s}' for n, s in zip(MESH_AXES, sizes) if s != -1)} = {known}")
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ConfigError(
        f"mesh: data x fsdp x tensor = {sizes[0]} x {sizes[1]} x {sizes[2]} = {known} "
        f"but there are {num_devices} devices")
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto axis types over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# ----------------------------------------------------------------------------- rules


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
  """Maps logical axis names to a PartitionSpec through LOGICAL_RULES.

  With `shape` and `mesh`, a mesh axis is kept only if it divides the dimension (together with
  the axes already kept for it) and is not already used by an earlier dimension.
  """
  if not names:
    return P()
  if shape is not None and len(shape) != len(names):
    raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    if name is None:
      out.append(None)
      continue
    if name not in LOGICAL_RULES:
      raise ValueError(f"unknown logical axis name {name!r}; known: {', '.join(LOGICAL_RULES)}")
    rule = LOGICAL_RULES[name]
    axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
    kept: list[str] = []
    for ax in axes:
      if ax in used:
        continue
      if mesh is not None and shape is not None:
        size = math.prod(mesh.shape[a] for a in kept) * mesh.shape[ax]
        if shape[i] % size:
          continue
      kept.append(ax)
    used.update(kept)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names under the current mesh; no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Input batches: rows split over data x fsdp."""
  return NamedSharding(mesh, P(("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- state shardings


def _var_spec(v: nnx.Variable, mesh: Mesh) -> P | None:
  value = v.get_value()
  if not hasattr(value, "shape"):
    return None
  names = v.get_metadata().get("out_sharding")
  if isinstance(names, P):
    names = tuple(names)
  return logical_to_spec(names, value.shape, mesh) if names else P()


def _param_specs(tree: Any, mesh: Mesh) -> dict[tuple[str, ...], tuple[tuple[int, ...], P]]:
  """path -> (shape, spec) of every annotated Variable (or sharded array) in `tree`."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=pytree.is_variable)[0]:
    key = tuple(pytree.key_str(k) for k in path)
    if pytree.is_variable(leaf):
      spec = _var_spec(leaf, mesh)
      if spec is not None and leaf.get_metadata().get("out_sharding"):
        out[key] = (tuple(leaf.get_value().shape), spec)
    elif isinstance(getattr(leaf, "sharding", None), NamedSharding):
      out[key] = (tuple(leaf.shape), leaf.sharding.spec)
  return out


def state_shardings(abstract_state: Any, mesh: Mesh, like: Any = None) -> Any:
  """NamedShardings for every array in `abstract_state` (same tree structure).

  Variables use their logical `out_sharding` metadata through LOGICAL_RULES; this covers
  `nnx.Optimizer` state, which copies the metadata of the parameters it mirrors. Plain-array
  leaves (e.g. an optax state held alongside, or pure dicts) take the sharding of the annotated
  parameter in `abstract_state` or `like` whose path is the longest suffix of theirs and whose
  shape is equal; everything else is replicated. Non-array leaves map to None.
  """
  params = _param_specs(like, mesh) if like is not None else {}
  params.update(_param_specs(abstract_state, mesh))

  def one(path, leaf):
    value = pytree.value(leaf)
    if not hasattr(value, "shape"):
      return leaf.replace(None) if pytree.is_variable(leaf) else None
    spec = _var_spec(leaf, mesh) if pytree.is_variable(leaf) else None
    if not spec:  # unannotated: borrow from the parameter it mirrors
      key = tuple(pytree.key_str(k) for k in path)
      for i in range(len(key)):
        hit = params.get(key[i:])
        if hit is not None and hit[0] == tuple(value.shape):
          spec = hit[1]
          break
    sharding = NamedSharding(mesh, spec or P())
    return leaf.replace(sharding) if pytree.is_variable(leaf) else sharding

  return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=pytree.is_variable)


def with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """Attaches shardings to an abstract state: leaves become ShapeDtypeStructs with `sharding`."""

  def one(a, s):
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) if s is not None else a

  return jax.tree.map(one, abstract_state, shardings)


def abstract_state(make_model: Callable[[], nnx.Module], mesh: Mesh) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, state of ShapeDtypeStructs carrying the mesh shardings) without allocating."""
  graphdef, abs_state = nnx.split(nnx.eval_shape(make_model))
  return graphdef, with_shardings(abs_state, state_shardings(abs_state, mesh))


def sharded_init(make_model: Callable[[], nnx.Module], mesh: Mesh) -> tuple[nnx.GraphDef, Any]:
  """Creates a model directly in its sharded layout; returns (graphdef, state).

  Shapes come from `nnx.eval_shape`; the initialisers run under `jax.jit` with `out_shardings`,
  so no device ever holds a full unsharded copy.
  """
  graphdef, abs_state = nnx.split(nnx.eval_shape(make_model))
  shardings = state_shardings(abs_state, mesh)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.state(make_model())

  with jax.set_mesh(mesh):
    state = init()
  return graphdef, state


def init_opt_state(tx: Any, params: Any, mesh: Mesh) -> tuple[Any, Any]:
  """(optax state of `params`, its shardings): moments placed like the parameters they mirror.

  A bare `jax.jit(tx.init)` leaves the placement to XLA, which puts such fresh zeros on a single
  device.
  """
  shardings = state_shardings(jax.eval_shape(tx.init, params), mesh, like=params)
  with jax.set_mesh(mesh):
    return jax.jit(tx.init, out_shardings=shardings)(params), shardings


def describe(state: Any) -> str:
  """One line per array: path, shape, spec (for logs); also takes a tree of shardings."""
  lines = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=pytree.is_variable)[0]:
    value = pytree.value(leaf)
    sharding = value if isinstance(value, NamedSharding) else getattr(value, "sharding", None)
    spec = sharding.spec if isinstance(sharding, NamedSharding) else "-"
    shape = "" if isinstance(value, NamedSharding) else f" {tuple(np.shape(value))}"
    lines.append(f"{'/'.join(pytree.key_str(k) for k in path)}{shape} {spec}")
  return "\n".join(lines)
