"""Pytree helpers shared by sharding and checkpointing: nnx Variables as leaves, string paths."""

from __future__ import annotations

from typing import Any, Iterable

import jax
from flax import nnx


def is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def key_str(k: Any) -> str:
  """One path entry (dict key, attribute, sequence index) as a string."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def value(x: Any) -> Any:
  """The array inside a Variable, or `x` itself."""
  return x.get_value() if is_variable(x) else x


def flatten(tree: Any) -> tuple[list[tuple[tuple[str, ...], Any]], Any]:
  """[(path, leaf)] with nnx Variables as leaves, and the treedef to rebuild `tree`."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
  return [(tuple(key_str(k) for k in p), leaf) for p, leaf in leaves], treedef


def nest(items: Iterable[tuple[tuple[str, ...], Any]]) -> dict:
  """{path tuple: value} pairs → nested dict (an empty path is stored under "_")."""
  out: dict = {}
  for path, v in items:
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1] if path else "_"] = v
  return out


def lookup(tree: dict, path: tuple[str, ...]) -> Any:
  for k in path or ("_",):
    tree = tree[k]
  return tree


def flatten_dict(d: dict, prefix: str = "") -> dict[str, Any]:
  """Nested dict → {"a.b.c": leaf}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten_dict(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
