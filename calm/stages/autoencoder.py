"""The autoencoder stage: K tokens ↔ one latent vector."""

from __future__ import annotations

import jax

from calm import losses
from calm.config import Config, ModelConfig
from calm.models.autoencoder import Autoencoder
from calm.stages.base import Metrics, Stage

ARCH_KEYS = ("model.vocab_size", "model.chunk_size", "model.latent_dim",
             "model.autoencoder.hidden_dim", "model.autoencoder.ffn_dim",
             "model.autoencoder.num_encoder_layers", "model.autoencoder.num_decoder_layers")


def reconstruction(ae: Autoencoder, ids_BT: jax.Array, key: jax.Array, chunk_size: int,
                   sigmas: tuple[float, ...]) -> Metrics:
  """Held-out reconstruction from μ: token accuracy, chunk exact match, CE, and accuracy under
  Gaussian noise of each σ added to the latent (row b's noise from its row key, see
  `losses.row_keys`)."""
  ids_BSK = ids_BT.reshape(ids_BT.shape[0], -1, chunk_size)
  mu_BSL, _ = ae.encode(ids_BSK)
  keys_B = losses.row_keys(key, ids_BT.shape[0])

  ce_BSK, hit_BSK = losses.cross_entropy(ae.decode(mu_BSL), ids_BSK)
  out = {"ce": ce_BSK.mean(), "token_acc": hit_BSK.mean(), "chunk_exact": hit_BSK.all(-1).mean()}
  for i, s in enumerate(sigmas):
    keys_i = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys_B)
    eps = losses.draw_rows(keys_i, lambda k, s: jax.random.normal(k, s, mu_BSL.dtype),
                           mu_BSL.shape)
    _, hit = losses.cross_entropy(ae.decode(mu_BSL + s * eps), ids_BSK)
    out[f"token_acc_noise{s:g}"] = hit.mean()
  return out


class AutoencoderStage(Stage):
  name = "autoencoder"
  arch_keys = ARCH_KEYS

  def build(self, model_cfg, rngs):
    return Autoencoder(model_cfg, rngs=rngs)

  def loss(self, model, ae, ids_BT, key):
    return losses.autoencoder_loss(model, ids_BT, key, self.cfg.model)

  def evaluate(self, model, ae, ids_BT, key):
    return reconstruction(model, ids_BT, key, self.cfg.model.chunk_size,
                          self.cfg.eval.noise_sigmas)

  @staticmethod
  def flops_per_token(m: ModelConfig, seq_tokens: int) -> float:
    from calm.flops import ae_macs_per_chunk

    enc, dec = ae_macs_per_chunk(m)
    return 6.0 * (enc + dec) / m.chunk_size

  # --------------------------------------------------------------------------- conversion

  def name_table(self, m):
    from calm.convert.tables import autoencoder_table

    return autoencoder_table()

  def normalize_reference(self, w, m, where):
    """`ae_model.` prefix optional (when present, other tensors are ignored: a CALM directory
    that embeds its autoencoder); the tied `decoder.lm_head_weight` must equal the embedding."""
    from calm.convert.tables import _merge_alias

    if any(k.startswith("ae_model.") for k in w):
      w = {k[len("ae_model."):]: v for k, v in w.items() if k.startswith("ae_model.")}
    for alias in ("decoder.lm_head_weight", "decoder.lm_head.weight"):
      _merge_alias(w, alias, "encoder.embed_tokens.weight", where)
    return w

  def with_reference_aliases(self, out):
    """The tied embedding under both of its reference names, as the reference's state_dict
    holds it (its loader fills each parameter by name only)."""
    out["decoder.lm_head_weight"] = out["encoder.embed_tokens.weight"].copy()
    return out

  def missing_reference_fields(self, canon):
    if "ae_num_layers" in canon:
      return []
    return [k for k in ("num_encoder_layers", "num_decoder_layers") if k not in canon]

  def reference_config(self, cfg: Config) -> dict:
    m, a = cfg.model, cfg.model.autoencoder
    out = {"architectures": ["Autoencoder"], "model_type": "autoencoder",
           "vocab_size": m.vocab_size, "hidden_size": a.hidden_dim,
           "intermediate_size": a.ffn_dim, "num_encoder_layers": a.num_encoder_layers,
           "num_decoder_layers": a.num_decoder_layers, "latent_size": m.latent_dim,
           "patch_size": m.chunk_size, "rms_norm_eps": a.norm_eps, "hidden_act": "silu",
           "kl_weight": a.kl_weight, "kl_clamp": a.kl_clamp, "tie_word_embeddings": True}
    if a.token_dropout == a.latent_dropout:
      out["ae_dropout"] = a.token_dropout
    else:
      out.update(token_dropout=a.token_dropout, latent_dropout=a.latent_dropout)
    return {**out, "torch_dtype": "float32"}
