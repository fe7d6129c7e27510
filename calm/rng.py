"""Independent PRNG streams by purpose, all derived from one seed.

`stream(seed, INIT)` initialises parameters, `stream(seed, TRAIN)` folded with the step number
drives training noise, `stream(seed, EVAL)` folded with the batch index drives in-training
evaluation. Keys are typed (`jax.random.key`). The data order has its own seed (`data.seed`) and
sampling/evaluation commands take theirs from their config sections.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INIT, TRAIN, EVAL = 1, 2, 3


def stream(seed: int, purpose: int) -> jax.Array:
  """The root key of one purpose's stream."""
  return jax.random.fold_in(jax.random.key(seed), purpose)


def eval_row_keys(seed: int, start: int, rows: int) -> jax.Array:
  """Keys of held-out rows start .. start+rows−1: fold_in(stream(seed, EVAL), row), so a row's
  evaluation noise does not depend on how the rows are cut into (micro-)batches."""
  root = stream(seed, EVAL)
  return jax.vmap(lambda r: jax.random.fold_in(root, r))(
      jnp.arange(start, start + rows, dtype=jnp.uint32))


def init_rngs(seed: int) -> nnx.Rngs:
  """The `nnx.Rngs` that parameter initialisation draws from."""
  return nnx.Rngs(stream(seed, INIT))


def is_key_batch(key: jax.Array) -> bool:
  """Whether `key` is a batch of keys [B] (one per row) rather than one key."""
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  return key.ndim == (1 if typed else 2)
