"""The discrete next-token baseline (a Llama `LlamaForCausalLM`)."""

from __future__ import annotations

from calm import losses, scoring
from calm.config import Config, ModelConfig
from calm.models.ar import ARModel
from calm.stages.base import Stage

BACKBONE_KEYS = ("model.backbone.hidden_dim", "model.backbone.num_layers",
                 "model.backbone.num_heads", "model.backbone.num_kv_heads",
                 "model.backbone.ffn_dim")


class ARStage(Stage):
  name = "ar"
  generates = True
  backbone_parts = ("embed", "backbone")
  arch_keys = ("model.vocab_size", "model.tie_ar_embeddings") + BACKBONE_KEYS

  def build(self, model_cfg, rngs):
    return ARModel(model_cfg, rngs=rngs)

  def loss(self, model, ae, ids_BT, key):
    return losses.ar_loss(model, ids_BT)

  @staticmethod
  def flops_per_token(m: ModelConfig, seq_tokens: int) -> float:
    from calm.flops import backbone_macs_per_position

    macs = backbone_macs_per_position(m, seq_tokens / 2)
    return 6.0 * (macs + m.backbone.hidden_dim * m.vocab_size)

  # --------------------------------------------------------------------------- generation

  def engine(self, run):
    from calm.engine import AREngine

    tok = run.tokenizer
    return AREngine(run.model, eos_id=tok.eos_id, pad_id=tok.pad_id)

  def sampler(self, s):
    from calm.engine import TokenSampler

    return TokenSampler(s.temperature, s.top_k, s.top_p)

  # --------------------------------------------------------------------------- BrierLM

  def brier_scores(self, models, ids_BT, key, chunk_size, group):
    return scoring.ar_block_scores(models[0], ids_BT, key, chunk_size, group)

  def brier_first_tokens(self, block_tokens, chunk_size):
    return scoring.ar_positions(block_tokens, chunk_size) + scoring.NGRAMS

  def brier_bytes_per_position(self, batch, vocab, chunk_size):
    # logits, log-probabilities, Gumbel noise and their sum live at once
    return batch * vocab * 4 * 6

  def brier_positions(self, chunk_size):
    return f"every {chunk_size}th token"

  # --------------------------------------------------------------------------- conversion

  def name_table(self, m):
    from calm.convert.tables import ar_table

    return ar_table(m.tie_ar_embeddings)

  def normalize_reference(self, w, m, where):
    """`rotary_emb.inv_freq` buffers dropped; a tied `lm_head` must equal the embedding."""
    from calm.convert.tables import _merge_alias

    w = {k: v for k, v in w.items() if not k.endswith("rotary_emb.inv_freq")}
    if m is not None and m.tie_ar_embeddings:
      _merge_alias(w, "lm_head.weight", "model.embed_tokens.weight", where)
    return w

  def check_reference(self, raw):
    from calm.convert.tables import head_dim_problems

    bad = head_dim_problems(raw)
    if raw.get("model_type", "llama") != "llama":
      bad.append(f"model_type={raw['model_type']!r} (a Llama model is expected)")
    return bad

  def fields_from_reference(self, raw, canon):
    from calm.convert.tables import backbone_defaults

    return {"model.tie_ar_embeddings": bool(raw.get("tie_word_embeddings", False)),
            **backbone_defaults(canon)}

  def reference_config(self, cfg: Config) -> dict:
    from calm.convert.tables import llama_fields

    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            **llama_fields(cfg.model), "tie_word_embeddings": cfg.model.tie_ar_embeddings,
            "torch_dtype": "float32"}
