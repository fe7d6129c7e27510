"""Frozen dataclass configs loaded from YAML with dotted `key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from calm import heads
from calm.errors import ConfigError


@dataclass(frozen=True)
class AutoencoderConfig:
  """Sizes and robustness recipe of the K-tokens ↔ one-vector autoencoder."""

  hidden_dim: int = 512
  ffn_dim: int = 1280
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  norm_eps: float = 1e-6
  token_dropout: float = 0.15
  latent_dropout: float = 0.15
  kl_clamp: float = 0.5
  kl_weight: float = 1e-3


@dataclass(frozen=True)
class BackboneConfig:
  """Llama-style causal decoder shared by CALM and the AR baseline."""

  hidden_dim: int = 1024
  num_layers: int = 16
  num_heads: int = 16
  num_kv_heads: int = 16
  ffn_dim: int = 2752
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.hidden_dim // self.num_heads


@dataclass(frozen=True)
class HeadConfig:
  """Generative head and its loss: `energy` (one call per sample), `flow` or `diffusion`."""

  kind: str = "energy"  # a head of `calm.heads`
  noise_dim: int = 64  # energy: uniform noise width
  num_blocks: int = 4  # residual blocks of every head
  num_samples: int = 8  # energy: N model samples; flow / diffusion: N target draws per position
  num_target_samples: int = 100  # energy: M draws of the target Gaussian
  beta: float = 1.0
  norm_eps: float = 1e-6
  solver: Literal["euler", "midpoint"] = "midpoint"  # flow sampler
  flow_steps: int = 10  # flow solver steps (midpoint: two network calls each)
  schedule: Literal["cosine", "linear"] = "cosine"  # diffusion noise schedule
  diffusion_steps: int = 1000  # diffusion training steps
  sampling_steps: int = 100  # respaced diffusion sampling steps
  noise_temperature: float = 1.0  # diffusion: scale of each reverse step's noise


@dataclass(frozen=True)
class ModelConfig:
  """Model sizes. `vocab_size` and `chunk_size` (K) are shared by every stage."""

  vocab_size: int = 32000
  chunk_size: int = 4
  latent_dim: int = 128
  dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; params stay float32
  # Activation memory policy of every backbone layer, AE block and head block in training:
  # none = keep everything; minimal = keep the outputs of weight matmuls, recompute the rest
  # (norms, activations, attention scores); full = keep only each block's input.
  remat: Literal["none", "minimal", "full"] = "none"
  # Causal self-attention: auto = cuDNN flash on GPU, Pallas splash on TPU, XLA elsewhere;
  # xla = plain softmax(QKᵀ)V; chunked = XLA, queries in blocks (no [T, T] per head at once).
  attention: Literal["auto", "xla", "chunked", "cudnn", "splash"] = "auto"
  # Run the backbone's decoder layers as one lax.scan over their stacked weights: the step
  # compiles one layer instead of every layer (compile time flat in depth). Parameters and
  # checkpoints keep one entry per layer either way.
  scan_layers: bool = False
  tie_ar_embeddings: bool = False
  autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
  backbone: BackboneConfig = field(default_factory=BackboneConfig)
  head: HeadConfig = field(default_factory=HeadConfig)


@dataclass(frozen=True)
class DataConfig:
  """Training / evaluation sources and packing."""

  train: str = "data/gutenberg-slice/train"  # file, directory, glob or `tfds:NAME[:SPLIT]`
  eval: str = ""  # held-out source; empty = none
  format: Literal["auto", "txt", "jsonl", "tfds"] = "auto"
  separator: str = "\n\n"  # document separator for .txt sources
  text_field: str = "text"
  tfds_data_dir: str = ""
  block_tokens: int = 2048
  tokenizer: str = ""  # path to tokenizer.json; empty = train one into the run directory
  tokenizer_train_bytes: int = 20_000_000  # cap on text used to train the BPE
  shuffle: bool = True
  seed: int = 0
  workers: int = 1  # threads reading training batches ahead of the step (0: in the loop)


@dataclass(frozen=True)
class TrainConfig:
  """Optimisation and the loop."""

  batch_size: int = 8  # global sequences per optimizer step
  grad_accum: int = 1  # micro-batches per step (batch_size / grad_accum sequences each)
  steps: int = 1000
  lr: float = 3e-4
  warmup_steps: int = 1000
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  log_every: int = 10
  eval_every: int = 500
  eval_batches: int = 8
  on_nan: Literal["stop", "skip"] = "stop"
  peak_flops: float = 0.0  # per device; 0 = measure
  autoencoder: str = ""  # calm stage: run directory of the trained autoencoder
  # calm stage: an AR run (or `calm-convert --llama` output) whose token embedding and decoder
  # (layers + final norm) start a new run; the input compression and the head start fresh
  init_backbone: str = ""

  @property
  def micro_batch(self) -> int:
    """Sequences per micro-batch: what one forward pass holds (evaluation runs at this size)."""
    return self.batch_size // self.grad_accum


@dataclass(frozen=True)
class MeshConfig:
  """Device mesh; -1 fills with the remaining devices."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = dataclasses.asdict(self)
    for k, v in sizes.items():
      if not (v == -1 or (isinstance(v, int) and v >= 1)):
        raise ConfigError(f"mesh.{k}: must be -1 (fill) or >= 1, got {v}")
    if list(sizes.values()).count(-1) > 1:
      raise ConfigError(f"mesh: only one axis may be -1 (fill), got {sizes}")


@dataclass(frozen=True)
class CheckpointConfig:
  every: int = 500
  keep: int = 3
  async_save: bool = True


@dataclass(frozen=True)
class DistributedConfig:
  """Multi-host initialisation; `auto` initialises when a cluster is detected."""

  mode: Literal["auto", "on", "off"] = "auto"
  coordinator_address: str = ""
  num_processes: int = 0
  process_id: int = -1
  timeout_s: int = 300


@dataclass(frozen=True)
class CompileCacheConfig:
  """Persistent compilation cache: a program compiled once is loaded by every later launch
  (`calm.compile_cache`). $CALM_COMPILE_CACHE (a directory, or `off`) overrides this section."""

  enabled: bool = True
  dir: str = ""  # empty: $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/calm-jax/jax
  min_compile_secs: float = 0.0  # programs compiled faster than this are not written
  max_gib: float = 20.0  # a local cache drops its least recently used programs beyond this


@dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 1.0
  sampler: Literal["exact", "batch"] = "exact"
  num_candidates: int = 200  # batch sampler
  max_attempts: int = 1000  # exact sampler, per chunk
  draws_per_step: int = 0  # exact sampler: draws per loop iteration; 0 = min(ceil(1/T), 8)
  max_new_tokens: int = 128
  num_samples: int = 1
  top_k: int = 0  # AR only; 0 = off
  top_p: float = 1.0  # AR only
  seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
  data: str = ""  # held-out documents for BrierLM
  block_tokens: int = 2048
  batch_size: int = 8
  max_documents: int = 0  # 0 = all
  seed: int = 0
  group: int = 0  # BrierLM positions scored at once; 0 = automatic (bounded memory)
  noise_sigmas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)


@dataclass(frozen=True)
class Config:
  stage: Literal["autoencoder", "calm", "ar"] = "autoencoder"
  run_dir: str = "runs/default"
  seed: int = 0
  model: ModelConfig = field(default_factory=ModelConfig)
  data: DataConfig = field(default_factory=DataConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
  distributed: DistributedConfig = field(default_factory=DistributedConfig)
  compile_cache: CompileCacheConfig = field(default_factory=CompileCacheConfig)
  sampling: SamplingConfig = field(default_factory=SamplingConfig)
  eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
  """Checks/coerces one YAML value against a dataclass field type."""
  origin = typing.get_origin(tp)
  if dataclasses.is_dataclass(tp):
    if value is None:
      return tp()
    if not isinstance(value, dict):
      raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
    return _build(tp, value, key + ".")
  if origin is Literal:
    choices = typing.get_args(tp)
    if value not in choices:
      raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value
  if origin is tuple:
    (elem, _) = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
      value = [value]
    return tuple(_convert(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
  if origin in (typing.Union, types.UnionType):
    raise ConfigError(f"{key}: unsupported union type")
  if tp is bool:
    if isinstance(value, bool):
      return value
  elif tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
  elif tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
      try:
        return float(value)
      except ValueError:
        pass
  elif tp is str:
    if isinstance(value, str):
      return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return str(value)
  raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - names)
  if unknown:
    raise ConfigError(
        f"unknown config key {prefix}{unknown[0]} (valid keys under "
        f"{prefix.rstrip('.') or 'top level'}: {', '.join(sorted(names))})")
  kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in raw.items()}
  return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
  parts = dotted.split(".")
  node = raw
  for p in parts[:-1]:
    child = node.setdefault(p, {})
    if not isinstance(child, dict):
      raise ConfigError(f"override {dotted}: {p} is not a section")
    node = child
  node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
  """`a.b=3` → ("a.b", 3); the value is parsed as a YAML scalar."""
  if "=" not in text:
    raise ConfigError(f"override {text!r} must look like key.sub=value")
  key, val = text.split("=", 1)
  key = key.strip()
  if not key:
    raise ConfigError(f"override {text!r} has no key")
  try:
    value = yaml.safe_load(val) if val.strip() else ""
  except yaml.YAMLError:
    value = val
  if isinstance(value, (dict, list)) and not val.strip().startswith(("{", "[")):
    value = val.strip()  # `prepared:` or `a: b` are text, not a mapping
  return key, value


def from_dict(raw: dict) -> Config:
  cfg = _build(Config, raw or {})
  validate(cfg)
  return cfg


def read_yaml(path: str | pathlib.Path) -> dict:
  """The raw mapping of a YAML config file."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise ConfigError(f"config file not found: {p}")
  try:
    raw = yaml.safe_load(p.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{p}: top level must be a mapping")
  return raw


def load(path: str | pathlib.Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
  """Loads a YAML config (or defaults), applies `key=value` overrides and validates."""
  raw = read_yaml(path) if path else {}
  for o in overrides:
    k, v = parse_override(o)
    _set_dotted(raw, k, v)
  return from_dict(raw)


def to_dict(cfg: Any) -> dict:
  d = dataclasses.asdict(cfg)

  def lists(x):
    if isinstance(x, dict):
      return {k: lists(v) for k, v in x.items()}
    if isinstance(x, tuple):
      return [lists(v) for v in x]
    return x

  return lists(d)


def dump(cfg: Config, path: str | pathlib.Path) -> None:
  """Writes the resolved config as YAML."""
  p = pathlib.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_name(p.name + ".tmp")  # written whole, then renamed over the old one
  tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
  tmp.replace(p)


def replace(cfg: Any, **changes: Any) -> Any:
  """dataclasses.replace with dotted keys: replace(cfg, **{"model.latent_dim": 8})."""
  nested: dict = {}
  for k, v in changes.items():
    _set_dotted(nested, k, v)

  def apply(obj, upd):
    kw = {k: apply(getattr(obj, k), v) if isinstance(v, dict) else v for k, v in upd.items()}
    return dataclasses.replace(obj, **kw)

  out = apply(cfg, nested)
  if isinstance(out, Config):
    validate(out)
  return out


# ----------------------------------------------------------------------------- validation


def validate_temperature(temperature: Any, key: str = "temperature") -> float:
  """T as a float in (0, 1] (the sampling temperature everywhere), else ConfigError naming `key`."""
  try:
    t = float(temperature)
  except (TypeError, ValueError):
    raise ConfigError(f"{key}: must be a number in (0, 1], got {temperature!r}") from None
  if not math.isfinite(t) or t <= 0.0 or t > 1.0:
    raise ConfigError(f"{key}: must be in (0, 1], got {temperature!r}")
  return t


def _require(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
  """Rejects impossible values with a one-line error naming the key."""
  m = cfg.model
  _require(m.chunk_size >= 1, "model.chunk_size", f"K must be >= 1, got {m.chunk_size}")
  _require(m.vocab_size >= 8, "model.vocab_size", f"must be >= 8, got {m.vocab_size}")
  _require(m.latent_dim >= 1, "model.latent_dim", f"must be >= 1, got {m.latent_dim}")
  a = m.autoencoder
  for k in ("hidden_dim", "ffn_dim", "num_encoder_layers", "num_decoder_layers"):
    _require(getattr(a, k) >= 1, f"model.autoencoder.{k}", "must be >= 1")
  for k in ("token_dropout", "latent_dropout"):
    _require(0.0 <= getattr(a, k) < 1.0, f"model.autoencoder.{k}", "must be in [0, 1)")
  _require(a.kl_weight >= 0, "model.autoencoder.kl_weight", "must be >= 0")
  b = m.backbone
  for k in ("hidden_dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim"):
    _require(getattr(b, k) >= 1, f"model.backbone.{k}", "must be >= 1")
  _require(b.hidden_dim % b.num_heads == 0, "model.backbone.num_heads",
           f"hidden_dim {b.hidden_dim} is not divisible by num_heads {b.num_heads}")
  _require(b.head_dim % 2 == 0, "model.backbone.num_heads", "head_dim must be even for RoPE")
  _require(b.num_heads % b.num_kv_heads == 0, "model.backbone.num_kv_heads",
           f"num_heads {b.num_heads} is not a multiple of num_kv_heads {b.num_kv_heads}")
  h = m.head
  _require(h.kind in heads.KINDS, "model.head.kind",
           f"must be one of {', '.join(heads.KINDS)}; got {h.kind!r}")
  _require(h.num_samples >= 1, "model.head.num_samples", "must be >= 1")
  _require(h.flow_steps >= 1, "model.head.flow_steps", "must be >= 1")
  _require(h.diffusion_steps >= 2, "model.head.diffusion_steps", "must be >= 2")
  _require(1 <= h.sampling_steps <= h.diffusion_steps, "model.head.sampling_steps",
           f"must be in [1, diffusion_steps={h.diffusion_steps}], got {h.sampling_steps}")
  _require(math.isfinite(h.noise_temperature) and h.noise_temperature >= 0,
           "model.head.noise_temperature", f"must be >= 0, got {h.noise_temperature}")
  _require(h.num_target_samples >= 1, "model.head.num_target_samples", "must be >= 1")
  _require(0.0 < h.beta < 2.0, "model.head.beta", f"must be in (0, 2), got {h.beta}")
  _require(h.noise_dim >= 1 and h.num_blocks >= 1, "model.head", "noise_dim and num_blocks >= 1")
  d = cfg.data
  _require(d.block_tokens >= m.chunk_size and d.block_tokens % m.chunk_size == 0,
           "data.block_tokens",
           f"{d.block_tokens} is not a positive multiple of model.chunk_size {m.chunk_size}")
  _require(bool(d.train.strip()), "data.train", "must name a training source")
  _require(bool(d.separator), "data.separator", "must not be empty")
  _require(0 <= d.workers <= 64, "data.workers", f"must be in [0, 64], got {d.workers}")
  t = cfg.train
  _require(t.batch_size >= 1, "train.batch_size", "must be >= 1")
  _require(t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0, "train.grad_accum",
           f"must be >= 1 and divide train.batch_size {t.batch_size}, got {t.grad_accum}")
  _require(t.steps >= 0, "train.steps", "must be >= 0")
  _require(t.lr > 0 and math.isfinite(t.lr), "train.lr", "must be a positive number")
  _require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
  _require(t.log_every >= 1, "train.log_every", "must be >= 1")
  _require(t.eval_every >= 1, "train.eval_every", "must be >= 1")
  _require(cfg.checkpoint.every >= 1, "checkpoint.every", "must be >= 1")
  _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
  cc = cfg.compile_cache
  _require(math.isfinite(cc.min_compile_secs) and cc.min_compile_secs >= 0,
           "compile_cache.min_compile_secs", f"must be >= 0, got {cc.min_compile_secs}")
  _require(math.isfinite(cc.max_gib) and cc.max_gib > 0, "compile_cache.max_gib",
           f"must be a positive number of GiB, got {cc.max_gib}")
  s = cfg.sampling
  validate_temperature(s.temperature, "sampling.temperature")
  _require(s.num_candidates >= 1, "sampling.num_candidates", "must be >= 1")
  _require(s.max_attempts >= 1, "sampling.max_attempts", "must be >= 1")
  _require(s.draws_per_step >= 0, "sampling.draws_per_step",
           "must be >= 0 (0 = min(ceil(1/T), 8))")
  _require(s.max_new_tokens >= 1, "sampling.max_new_tokens", "must be >= 1")
  _require(s.num_samples >= 1, "sampling.num_samples", f"must be >= 1, got {s.num_samples}")
  _require(0.0 < s.top_p <= 1.0, "sampling.top_p", "must be in (0, 1]")
  _require(s.top_k >= 0, "sampling.top_k", "must be >= 0")
  e = cfg.eval
  _require(e.block_tokens >= 4 and e.block_tokens % m.chunk_size == 0, "eval.block_tokens",
           f"{e.block_tokens} is not a multiple of model.chunk_size {m.chunk_size} (>= 4)")
  _require(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
  _require(e.max_documents >= 0, "eval.max_documents", f"must be >= 0 (0 = all), got "
           f"{e.max_documents}")
  _require(e.group >= 0, "eval.group", "must be >= 0 (0 = automatic)")
