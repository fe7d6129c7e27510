"""The three training stages: model constructor, training loss and evaluation metrics."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

from calm import losses, rng
from calm.config import Config, ModelConfig
from calm.models.ar import ARModel
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Stage:
  """What the trainer needs to know about one stage."""

  name: str
  build: Callable[[ModelConfig, nnx.Rngs], nnx.Module]
  # (model, frozen_ae | None, ids_BT, key) -> (loss, metrics)
  loss: Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, Metrics]]
  # (model, frozen_ae | None, ids_BT, key) -> metrics
  evaluate: Callable[[Any, Any, jax.Array, jax.Array], Metrics]


def ae_reconstruction(ae: Autoencoder, ids_BT: jax.Array, key: jax.Array, chunk_size: int,
                      sigmas: tuple[float, ...]) -> Metrics:
  """Held-out reconstruction from μ: token accuracy, chunk exact match, CE, and accuracy under
  Gaussian noise of each σ added to the latent."""
  ids_BSK = ids_BT.reshape(ids_BT.shape[0], -1, chunk_size)
  mu_BSL, _ = ae.encode(ids_BSK)

  ce_BSK, hit_BSK = losses.cross_entropy(ae.decode(mu_BSL), ids_BSK)
  out = {"ce": ce_BSK.mean(), "token_acc": hit_BSK.mean(), "chunk_exact": hit_BSK.all(-1).mean()}
  for i, s in enumerate(sigmas):
    eps = jax.random.normal(jax.random.fold_in(key, i), mu_BSL.shape, mu_BSL.dtype)
    _, hit = losses.cross_entropy(ae.decode(mu_BSL + s * eps), ids_BSK)
    out[f"token_acc_noise{s:g}"] = hit.mean()
  return out


def _ae_stage(cfg: Config) -> Stage:
  m = cfg.model
  return Stage(
      name="autoencoder",
      build=lambda mc, rngs: Autoencoder(mc, rngs=rngs),
      loss=lambda model, _, ids, key: losses.autoencoder_loss(model, ids, key, m),
      evaluate=lambda model, _, ids, key: ae_reconstruction(
          model, ids, key, m.chunk_size, cfg.eval.noise_sigmas),
  )


def _calm_stage(cfg: Config) -> Stage:
  m = cfg.model
  return Stage(
      name="calm",
      build=lambda mc, rngs: CALM(mc, rngs=rngs),
      loss=lambda model, ae, ids, key: losses.calm_loss(model, ae, ids, key, m),
      evaluate=lambda model, ae, ids, key: losses.calm_loss(model, ae, ids, key, m)[1],
  )


def _ar_stage(cfg: Config) -> Stage:
  return Stage(
      name="ar",
      build=lambda mc, rngs: ARModel(mc, rngs=rngs),
      loss=lambda model, _, ids, key: losses.ar_loss(model, ids),
      evaluate=lambda model, _, ids, key: losses.ar_loss(model, ids)[1],
  )


def get_stage(cfg: Config) -> Stage:
  return {"autoencoder": _ae_stage, "calm": _calm_stage, "ar": _ar_stage}[cfg.stage](cfg)


def build_model(cfg: Config) -> nnx.Module:
  """The stage's model with freshly initialised parameters (seed `cfg.seed`)."""
  return get_stage(cfg).build(cfg.model, rng.init_rngs(cfg.seed))
