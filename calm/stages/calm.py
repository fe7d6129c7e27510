"""The CALM stage: a backbone over chunk vectors with a generative head, on a frozen
autoencoder."""

from __future__ import annotations

import numpy as np

from calm import heads, losses, scoring
from calm.config import Config, ModelConfig
from calm.errors import ConfigError
from calm.models.calm import CALM
from calm.stages.base import Stage
from calm.stages.ar import BACKBONE_KEYS
from calm.stages.autoencoder import ARCH_KEYS as AE_KEYS

# A reference config.json's `model_type` of an older export of ours → the head kind.
LEGACY_MODEL_TYPES = {"calm": "energy"}


def head_kind_of(model_type: str) -> str | None:
  """The head kind a reference CALM config.json's `model_type` names (None: not a CALM head)."""
  by_type = {heads.get(k).model_type: k for k in heads.KINDS}
  return by_type.get(model_type, LEGACY_MODEL_TYPES.get(model_type))


class CalmStage(Stage):
  name = "calm"
  needs_autoencoder = True
  generates = True
  backbone_parts = ("embed", "backbone")
  warm_starts = True
  arch_keys = AE_KEYS + BACKBONE_KEYS + ("model.head.kind", "model.head.noise_dim",
                                         "model.head.num_blocks")

  def validate(self, model_cfg):
    problems = heads.get(model_cfg.head.kind).validate(model_cfg.head)
    if problems:
      raise ConfigError(problems[0])

  def build(self, model_cfg, rngs):
    return CALM(model_cfg, rngs=rngs)

  def loss(self, model, ae, ids_BT, key):
    return losses.calm_loss(model, ae, ids_BT, key, self.cfg.model)

  def energy_references(self, model_cfg):
    return heads.get(model_cfg.head.kind).energy_references

  @staticmethod
  def flops_per_token(m: ModelConfig, seq_tokens: int) -> float:
    """6·MACs of the trained parts, 2·MACs of the frozen AE encoder, per token."""
    from calm.flops import ae_macs_per_chunk, backbone_macs_per_position

    K, d = m.chunk_size, m.backbone.hidden_dim
    compress = K * d * 2 * d + 2 * d * d
    backbone = backbone_macs_per_position(m, seq_tokens / K / 2)
    trained = compress + backbone + heads.get(m.head.kind).train_macs_per_position(m)
    frozen = ae_macs_per_chunk(m)[0]
    return (6.0 * trained + 2.0 * frozen) / K

  # --------------------------------------------------------------------------- generation

  def engine(self, run):
    from calm.engine import CalmEngine

    tok = run.tokenizer
    return CalmEngine(run.model, run.autoencoder.model, eos_id=tok.eos_id, pad_id=tok.pad_id)

  def sampler(self, s):
    from calm.sampling import ChunkSampler

    return ChunkSampler(s.temperature, s.sampler, s.num_candidates, s.max_attempts,
                        s.draws_per_step)

  # --------------------------------------------------------------------------- BrierLM

  def brier_scores(self, models, ids_BT, key, chunk_size, group):
    return scoring.calm_block_scores(models[0], models[1], ids_BT, key, group)[0]

  def brier_first_tokens(self, block_tokens, chunk_size):
    K = chunk_size
    m = -(-scoring.NGRAMS // K)
    # position s is scored when its target tokens [(s+1)K, (s+1+m)K) are real
    return (np.arange(block_tokens // K - m) + 1 + m) * K

  def brier_bytes_per_position(self, batch, vocab, chunk_size):
    return batch * vocab * 4 * 2 * chunk_size * 2  # two decoded chunks' logits per position

  def brier_positions(self, chunk_size):
    return "every chunk boundary"

  # --------------------------------------------------------------------------- conversion

  def name_table(self, m):
    from calm.convert.tables import calm_table

    return calm_table(m.head.kind)

  def normalize_reference(self, w, m, where):
    """`ae_model.*` dropped (see `names.embedded_autoencoder`); the head maps its own
    variants."""
    w = {k: v for k, v in w.items() if not k.startswith("ae_model.")}
    return heads.get((m or ModelConfig()).head.kind).normalize_reference(w, where)

  def check_reference(self, raw):
    from calm.convert.tables import head_dim_problems

    bad = head_dim_problems(raw)
    if head_kind_of(raw.get("model_type", "energy")) is None:
      bad.append(f"model_type={raw['model_type']!r} (a CALM head: {', '.join(heads.KINDS)})")
    return bad

  def fields_from_reference(self, raw, canon):
    from calm.convert.tables import backbone_defaults

    return {"model.head.kind": head_kind_of(raw.get("model_type", "energy")),
            **backbone_defaults(canon)}

  def reference_config(self, cfg: Config) -> dict:
    from calm.convert.tables import llama_fields

    m, a, h = cfg.model, cfg.model.autoencoder, cfg.model.head
    head = heads.get(h.kind)
    out = {"architectures": [head.architecture], "model_type": head.model_type,
           **llama_fields(m), "patch_size": m.chunk_size, "latent_size": m.latent_dim,
           "noise_size": h.noise_dim, "num_mlp_layers": h.num_blocks,
           "num_samples": h.num_samples, "num_target_samples": h.num_target_samples,
           "beta": h.beta, "layer_norm_eps": h.norm_eps,
           "num_encoder_layers": a.num_encoder_layers, "num_decoder_layers": a.num_decoder_layers}
    return {**out, **head.reference_config(h), "torch_dtype": "float32"}
