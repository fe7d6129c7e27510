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
"""
