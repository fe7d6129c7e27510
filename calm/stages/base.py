"""What every stage owns (see `calm.stages`)."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import jax
import numpy as np
from flax import nnx

from calm.config import Config, ModelConfig, SamplingConfig
from calm.errors import ConfigError

Metrics = dict[str, jax.Array]


class Stage:
  """What one stage owns. Bound to a config (`get_stage(cfg)`) for `loss` / `evaluate`;
  everything else reads only what it is given."""

  name: ClassVar[str]
  needs_autoencoder: ClassVar[bool] = False  # trains on and decodes with a frozen autoencoder
  generates: ClassVar[bool] = False  # writes text: sampling, BrierLM, serving
  arch_keys: ClassVar[tuple[str, ...]]  # config keys that fix the parameter shapes
  # top-level parameter groups a Llama-style model shares with another stage's: the token
  # embedding table and the decoder (layers + final norm); what a warm start copies
  backbone_parts: ClassVar[tuple[str, ...]] = ()
  warm_starts: ClassVar[bool] = False  # takes `train.init_backbone` (another run's backbone)

  def __init__(self, cfg: Config | None = None):
    self.cfg = cfg

  # --------------------------------------------------------------------------- model

  def validate(self, model_cfg: ModelConfig) -> None:
    """Checks that need more than the config schema (a ConfigError naming the key)."""

  def build(self, model_cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    raise NotImplementedError

  def loss(self, model, ae, ids_BT: jax.Array, key: jax.Array) -> tuple[jax.Array, Metrics]:
    """Training loss and metrics of one batch (`ae`: the frozen autoencoder or None)."""
    raise NotImplementedError

  def evaluate(self, model, ae, ids_BT: jax.Array, key: jax.Array) -> Metrics:
    """Held-out metrics of one batch."""
    return self.loss(model, ae, ids_BT, key)[1]

  def energy_references(self, model_cfg: ModelConfig) -> bool:
    """Whether held-out evaluation adds the energy reference lines and normalised score."""
    return False

  @staticmethod
  def flops_per_token(m: ModelConfig, seq_tokens: int) -> float:
    """Training FLOPs per token (see `metrics.model_flops_per_token`)."""
    raise NotImplementedError

  # --------------------------------------------------------------------------- generation

  def engine(self, run) -> Any:
    """The generation engine (`calm.engine`) of a loaded run (`calm.run.Run`)."""
    raise ConfigError(f"stage: generation needs a calm or ar run, this is {self.name}")

  def sampler(self, s: SamplingConfig) -> Any:
    """The engine's sampler from a `sampling` config section."""
    raise ConfigError(f"stage: generation needs a calm or ar run, this is {self.name}")

  # --------------------------------------------------------------------------- BrierLM

  def brier_scores(self, models: Sequence[nnx.Module], ids_BT: jax.Array, key: jax.Array,
                   chunk_size: int, group: int) -> jax.Array:
    """Brier-1..4 estimates [B, P, 4] at the scored positions of token blocks (traced)."""
    raise ConfigError(f"stage: BrierLM scores calm or ar runs, not {self.name}")

  def brier_first_tokens(self, block_tokens: int, chunk_size: int) -> np.ndarray:
    """Per scored position, the first token past its targets: the position counts when that
    many tokens of the block are real."""
    raise NotImplementedError

  def brier_bytes_per_position(self, batch: int, vocab: int, chunk_size: int) -> int:
    """Vocabulary-sized temporaries of one scored position (sizes position groups)."""
    raise NotImplementedError

  def brier_positions(self, chunk_size: int) -> str:
    """The scored positions, in words (for the protocol)."""
    raise NotImplementedError

  # --------------------------------------------------------------------------- conversion

  def name_table(self, m: ModelConfig) -> list:
    """Rows (reference name, our parameter path, kind) of `calm.convert.names`."""
    raise NotImplementedError

  def normalize_reference(self, w: dict, m: ModelConfig | None, where: str) -> dict:
    """Maps the reference's name variants onto `name_table`'s names."""
    return w

  def with_reference_aliases(self, out: dict) -> dict:
    """Exported tensors plus the second names the reference's own state_dict carries."""
    return out

  def check_reference(self, raw: dict) -> list[str]:
    """Unsupported values of a reference config.json, as messages."""
    return []

  def fields_from_reference(self, raw: dict, canon: dict) -> dict:
    """Dotted config fields implied by a reference config.json beyond the mapped ones."""
    return {}

  def missing_reference_fields(self, canon: dict) -> list[str]:
    """Required reference fields that are absent beyond `REQUIRED`."""
    return []

  def reference_config(self, cfg: Config) -> dict:
    """Our config → the reference config.json of this stage."""
    raise NotImplementedError
