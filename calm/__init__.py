"""calm-jax: Continuous Autoregressive Language Models in JAX / Flax NNX.

Array names carry their shape as a suffix (`ids_BSK`: batch × chunks × tokens per chunk). Each
letter means one thing everywhere:

  B  batch rows                        T  token positions
  S  chunk positions (T = S·K)         K  tokens per chunk (the chunk size)
  P  scored positions (BrierLM)        4  the n-gram orders of BrierLM (1..4)
  A  groups of scored positions        C  positions in one group (bounded-memory BrierLM)
  D  model width                       F  feed-forward width
  L  latent width (one vector/chunk)   U  generative-head noise width
  V  vocabulary                        E  width of one attention head
  H  query heads                       G  key/value heads (grouped-query attention)
  W  KV-cache slots                    J  chunks (or tokens) generated per row
  N  samples from the generative head (energy loss, sampler candidates)
  M  samples of the target posterior (energy loss)
  R  draws per iteration of the exact temperature sampler
  X  micro-batches of a gradient-accumulated step    Q  blocks (rows) of a data source
  1  a size-one axis kept for broadcasting

A letter used inside one function only (e.g. the sampler's vocabulary blocks) is defined in that
function's docstring.

Python: `run = calm.open("runs/demo/calm")`, then `run.generate(...)`, `run.stream(...)`,
`run.score(...)`, `run.encode(...)` / `run.decode(...)` (see docs/api.md).
"""


def open(path, step=None, *, overrides=(), mesh=None, weights="float32", cache=None):  # noqa: A001
  """Opens a trained run (its directory or `config.yaml`) → `calm.run.Run`, its weights in
  float32, bf16 or int8 and its KV cache in the compute dtype, float32 or bf16; see
  `calm.run.open`."""
  from calm import run

  return run.open(path, step, overrides=overrides, mesh=mesh, weights=weights, cache=cache)


def __getattr__(name):  # `calm.Run`, `calm.Completion`, `calm.BrierReport` without eager imports
  if name in ("Run", "Completion", "BrierReport"):
    from calm import run

    return getattr(run, name)
  raise AttributeError(f"module 'calm' has no attribute {name!r}")


__all__ = ["BrierReport", "Completion", "Run", "open"]
