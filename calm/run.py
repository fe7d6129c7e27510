"""A run directory resolved into what inference and resuming need: its model, the frozen
autoencoder a CALM run depends on, and the tokenizer (see `calm.paths` for how a run's config
finds its files)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from calm import checkpoint, compile_cache, data, paths, shards, stages
from calm.config import Config, SamplingConfig
from calm.errors import CalmError, CheckpointError, ConfigError, DataError
from calm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- models


def load_model(run_dir: str | os.PathLike, *, step: int | None = None, mesh=None,
               expect_stage: str | None = None) -> checkpoint.Loaded:
  """The model of a run's checkpoint (default the latest step), rebuilt from its saved config."""
  return checkpoint.load_for_inference(run_dir, stages.build_model, step=step, mesh=mesh,
                                       expect_stage=expect_stage)


def frozen_autoencoder(cfg: Config, mesh=None, metadata: dict | None = None) -> checkpoint.Loaded:
  """The CALM stage's autoencoder, checked against `cfg.model` (K, vocab, latent, sizes)."""
  ae_dir = paths.autoencoder_dir(cfg, metadata)
  loaded = load_model(ae_dir, mesh=mesh, expect_stage="autoencoder")
  checkpoint.check_compatible(loaded.config, cfg, keys=checkpoint.arch_keys("autoencoder"),
                              what=f"autoencoder {ae_dir}")
  want = (metadata or {}).get("autoencoder_fingerprint")
  if want:  # the autoencoder this model was trained on, not just one of the same shape
    step, got = checkpoint.fingerprint(ae_dir, loaded.step)
    if got != want:
      raise CheckpointError(
          f"train.autoencoder: {ae_dir} step {step} is not the autoencoder this model was "
          f"trained on ({metadata.get('autoencoder')} step {metadata.get('autoencoder_step')}, "
          f"fingerprint {want[:12]}); give that run with train.autoencoder=DIR")
  return loaded


# ----------------------------------------------------------------------------- tokenizer


def _sample_texts(docs: Callable[[], Iterable[str]], max_bytes: int) -> list[str]:
  """An evenly strided sample of documents totalling at most ~max_bytes characters; two streamed
  passes over `docs()` (memory: the sample, not the corpus)."""
  total = sum(len(d) for d in docs())
  stride = max(1, -(-total // max(1, max_bytes)))
  out, n = [], 0
  for i, d in enumerate(docs()):
    if i % stride:
      continue
    if n + len(d) > max_bytes:
      if not out:
        out.append(d[:max_bytes])
      break
    out.append(d)
    n += len(d)
  return out


def get_tokenizer(cfg: Config, run_dir: str | os.PathLike, *, ae_dir: str | os.PathLike | None = None,
                  train_if_missing: bool = True) -> Tokenizer:
  """`data.tokenizer`, else the autoencoder run's tokenizer.json, else the run's own, else a
  prepared training source's, else (when training) a BPE trained on the training data and saved
  into the run directory."""
  local = pathlib.Path(run_dir) / "tokenizer.json"
  ae_tok = pathlib.Path(ae_dir) / "tokenizer.json" if ae_dir else None
  if cfg.data.tokenizer:
    tok, where = load_tokenizer(cfg.data.tokenizer), cfg.data.tokenizer
  elif ae_tok is not None and ae_tok.is_file():
    tok, where = load_tokenizer(ae_tok), str(ae_tok)
  elif local.is_file():
    tok, where = load_tokenizer(local), str(local)
  elif shards.prepared_dir(cfg.data.train) is not None:
    src = data.prepared_root(cfg.data.train) / shards.TOKENIZER
    if not src.is_file():
      raise DataError(f"no tokenizer: {src} does not exist and data.tokenizer is not set")
    tok, where = load_tokenizer(src), str(src)
    if train_if_missing:  # a training run keeps its own copy, as for a trained one
      tok.save(local)
  elif not train_if_missing:
    raise DataError(f"no tokenizer: {local} does not exist and data.tokenizer is not set")
  else:
    sample = _sample_texts(lambda: data.iter_documents(cfg.data.train, cfg.data),
                           cfg.data.tokenizer_train_bytes)
    log.info("training a %d-token BPE on %d documents (%d characters)", cfg.model.vocab_size,
             len(sample), sum(map(len, sample)))
    tok, where = train_tokenizer(sample, cfg.model.vocab_size), str(local)
    tok.save(local)
  if tok.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"model.vocab_size: tokenizer {where} has {tok.vocab_size} tokens but "
                      f"model.vocab_size is {cfg.model.vocab_size}; set it to at least "
                      f"{tok.vocab_size}")
  return tok


# ----------------------------------------------------------------------------- a whole run


@dataclasses.dataclass(frozen=True)
class Completion:
  """One generated continuation: its text and token ids (without the prompt), whether it
  ended with EOS (else it reached max_new_tokens) and the sampler statistics of its batch."""

  text: str
  token_ids: list[int]
  finished: bool
  stats: dict[str, float]


@dataclasses.dataclass(frozen=True)
class BrierReport:
  """A BrierLM report (`calm-eval`'s numbers): Brier-1..4 with standard errors, BrierLM with
  its standard error and bootstrap 95% interval over documents, the energy report of heads that
  have one, and the protocol."""

  brier: tuple[float, ...]
  brier_se: tuple[float, ...]
  brierlm: float
  brierlm_se: float | None
  brierlm_ci95: tuple[float, float] | None
  documents: int
  positions: int
  energy: dict[str, float] | None
  protocol: dict
  summary: dict  # everything, as written to brierlm.json


class Run:
  """A trained run ready for inference: its model, the frozen autoencoder of a CALM run, and
  the tokenizer. Open one with `calm.open(path)`.

  Attributes: `config` (the run's resolved config), `stage` (its `calm.stages` object),
  `tokenizer`, `step` (the checkpoint step loaded), `run_dir`, `checkpoint_dir`, `model`,
  `autoencoder` (the loaded autoencoder checkpoint of a CALM run, else None), `precision`
  ({"weights": ..., "cache": ...}, see `calm.quantize`).
  """

  def __init__(self, config: Config, loaded: checkpoint.Loaded,
               autoencoder: checkpoint.Loaded | None, tokenizer: Tokenizer, *,
               precision: dict[str, str | None] | None = None):
    self.config, self.loaded, self.autoencoder, self.tokenizer = (config, loaded, autoencoder,
                                                                  tokenizer)
    self.precision = precision or {"weights": "float32", "cache": None}
    self.stage = stages.get_stage(config)
    self._engine = None

  def __repr__(self) -> str:
    return (f"Run({self.config.stage}, {self.run_dir}, step {self.step}, "
            f"{self.tokenizer.vocab_size} tokens)")

  @property
  def model(self) -> nnx.Module:
    return self.loaded.model

  @property
  def step(self) -> int:
    return self.loaded.step

  @property
  def run_dir(self) -> pathlib.Path:
    return pathlib.Path(self.loaded.run_dir)

  @property
  def checkpoint_dir(self) -> pathlib.Path:
    return self.run_dir / checkpoint.SUBDIR / str(self.step)

  @property
  def checkpoints(self) -> dict[str, str]:
    """{stage: "run_dir step N"} of the checkpoints in use (for reports)."""
    out = {self.config.stage: f"{self.loaded.run_dir} step {self.loaded.step}"}
    if self.autoencoder is not None:
      out["autoencoder"] = f"{self.autoencoder.run_dir} step {self.autoencoder.step}"
    return out

  # --------------------------------------------------------------------------- generation

  @property
  def engine(self):
    """The generation engine (`calm.engine`) of this run, built on first use."""
    if not self.stage.generates:
      raise ConfigError(f"stage: generation needs a calm or ar run, this is {self.config.stage}")
    if self._engine is None:
      self._engine = self.stage.engine(self)
    return self._engine

  def _sampling(self, overrides: dict) -> SamplingConfig:
    """The run's `sampling` section with the given (non-None) fields replaced, validated."""
    from calm import config as config_lib

    s = self.config.sampling
    fields = {k: v for k, v in overrides.items() if v is not None}
    if fields.get("sampler") not in (None, "exact", "batch"):
      raise CalmError(f"sampler must be exact or batch, got {fields['sampler']!r}")
    s = dataclasses.replace(s, **fields)
    config_lib.validate(dataclasses.replace(self.config, sampling=s))
    return s

  def _prompt_ids(self, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    tok, context = self.tokenizer, self.config.data.block_tokens  # the training context
    out = []
    for text in prompts:
      if not isinstance(text, str):
        raise CalmError(f"a prompt must be a string, got {type(text).__name__}")
      ids = tok.encode(text) or [tok.eos_id]
      if len(ids) + max_new_tokens > context:
        raise CalmError(f"prompt too long: {len(ids)} tokens + sampling.max_new_tokens="
                        f"{max_new_tokens} exceed the model's training context of {context} "
                        f"tokens (data.block_tokens); shorten the prompt or generate fewer "
                        f"tokens")
      out.append(ids)
    return out

  def _run(self, prompts: Sequence[str], on_tokens=None, **sampling_fields) -> tuple:
    from calm import engine as engine_lib

    s = self._sampling(sampling_fields)
    ids = self._prompt_ids(prompts, s.max_new_tokens)
    keys_B = engine_lib.row_keys([s.seed + i for i in range(len(ids))])
    g = self.engine.generate(ids, keys_B, max_new_tokens=s.max_new_tokens,
                             sampler=self.stage.sampler(s), on_tokens=on_tokens)
    return g, s

  def complete(self, prompts: str | Sequence[str], *, max_new_tokens: int | None = None,
               temperature: float | None = None, sampler: str | None = None,
               num_candidates: int | None = None, max_attempts: int | None = None,
               top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None) -> list[Completion]:
    """Like `generate`, with the token ids, whether each row ended with EOS and the sampler
    statistics (CALM: `mean_draws` per chunk, `capped` chunks that hit `max_attempts`)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise CalmError("no prompts")
    g, _ = self._run(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                     sampler=sampler, num_candidates=num_candidates, max_attempts=max_attempts,
                     top_k=top_k, top_p=top_p, seed=seed)
    return [Completion(self.tokenizer.decode(t), t, f, g.stats)
            for t, f in zip(g.tokens, g.finished)]

  def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int | None = None,
               temperature: float | None = None, sampler: str | None = None,
               num_candidates: int | None = None, max_attempts: int | None = None,
               top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None) -> str | list[str]:
    """Continues each prompt → its new text (a string for a string, a list for a list).

    Prompts of different lengths run as one batch. Settings default to the run's `sampling`
    section: `temperature` in (0, 1]; CALM: `sampler` "exact" (rejection, exact ∝ P^(1/T)) or
    "batch" (over `num_candidates` head samples), `max_attempts` caps the exact sampler's draws
    per chunk; AR: `top_k`, `top_p`. Prompt i draws from seed + i (`seed` default
    sampling.seed), so it gets the same text alone with that seed as in any batch.
    """
    out = [c.text for c in self.complete(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, sampler=sampler,
        num_candidates=num_candidates, max_attempts=max_attempts, top_k=top_k, top_p=top_p,
        seed=seed)]
    return out[0] if isinstance(prompts, str) else out

  def stream(self, prompt: str, *, stats: dict | None = None, **settings) -> Iterator[str]:
    """Yields the new text of one prompt in pieces as the model produces them (never splitting
    a multi-byte character); `settings` as for `generate`. A dict given as `stats` receives the
    sampler statistics and the number of new `tokens` when the stream ends. One stream runs at a time in a process."""
    if not isinstance(prompt, str):
      raise CalmError(f"stream takes one prompt string, got {type(prompt).__name__}")
    max_new = self._sampling(settings).max_new_tokens
    self._prompt_ids([prompt], max_new)  # a user mistake surfaces before the thread starts
    pieces: queue.Queue = queue.Queue()

    def work():
      try:
        pieces.put(("done", self._run([prompt], on_tokens=pieces.put, **settings)[0]))
      except BaseException as e:  # re-raised in the caller's thread
        pieces.put(("error", e))

    threading.Thread(target=work, daemon=True).start()
    tok, ids, shown = self.tokenizer, [], ""
    while True:
      item = pieces.get()
      if isinstance(item, tuple):
        what, value = item
        if what == "error":
          raise value
        text = tok.decode(value.tokens[0])  # the final ids are authoritative
        if stats is not None:
          stats.update(value.stats, tokens=len(value.tokens[0]))
        if text.startswith(shown) and len(text) > len(shown):
          yield text[len(shown):]
        return
      for t in np.asarray(item)[0].tolist():
        if len(ids) < max_new and not (ids and ids[-1] == tok.eos_id):
          ids.append(t)
      text = tok.decode(ids)
      if text.startswith(shown) and len(text) > len(shown) and not text.endswith("\ufffd"):
        yield text[len(shown):]
        shown = text

  # --------------------------------------------------------------------------- evaluation

  def score(self, documents: str | Sequence[str], *, max_documents: int | None = None,
            block_tokens: int | None = None, batch_size: int | None = None,
            seed: int | None = None, group: int | None = None) -> BrierReport:
    """BrierLM on held-out documents: a list of texts, or a source (a .txt / .jsonl file,
    directory or glob, `tfds:NAME:SPLIT`, `prepared:DIR`). Settings default to the run's `eval`
    section; the numbers are `calm-eval`'s. The energy report (energy head) needs at least one
training batch of blocks; with fewer documents it is left out (`energy` is None)."""
    from calm import config as config_lib, data, evaluate

    if not self.stage.generates:
      raise ConfigError(f"stage: BrierLM scores calm or ar runs, this is {self.config.stage}")
    fields = {k: v for k, v in dict(max_documents=max_documents, block_tokens=block_tokens,
                                    batch_size=batch_size, seed=seed, group=group).items()
              if v is not None}
    ev = dataclasses.replace(self.config.eval, **fields)
    config_lib.validate(dataclasses.replace(self.config, eval=ev))
    if isinstance(documents, str):
      source = documents
      docs = data.tokenized_documents(source, self.config.data, self.tokenizer)
    else:
      texts = list(documents)
      if not texts or not all(isinstance(t, str) for t in texts):
        raise DataError("score needs a non-empty list of document strings (or a source path)")
      source = f"{len(texts)} documents"
      flat, lengths = data.encode_documents(texts, self.tokenizer)
      docs = np.split(flat, np.cumsum(lengths)[:-1])
    s = evaluate.brierlm(self, docs, ev, source=source, energy_if_enough=True)
    ci = s["brierlm_ci95"]
    return BrierReport(tuple(s["brier"]), tuple(s["brier_se"]), s["brierlm"], s["brierlm_se"],
                       tuple(ci) if ci is not None else None, s["documents"], s["positions"],
                       s.get("energy"), s["protocol"], s)

  # --------------------------------------------------------------------------- latents

  def _ae(self) -> nnx.Module:
    if self.autoencoder is not None:
      return self.autoencoder.model
    if self.stage.needs_autoencoder or self.stage.generates:
      raise ConfigError(f"stage: encode / decode need an autoencoder or calm run, this is "
                        f"{self.config.stage}")
    return self.model

  def encode(self, text: str) -> np.ndarray:
    """The text's latent vectors μ [S, L], one per chunk of K tokens (the last chunk padded with
    the pad id)."""
    ae = self._ae()
    K = ae.chunk_size
    ids = self.tokenizer.encode(text)
    if not ids:
      raise CalmError("encode needs a non-empty text")
    ids += [self.tokenizer.pad_id] * (-len(ids) % K)
    mu, _ = _encode_jit(*nnx.split(ae), np.asarray(ids, np.int32).reshape(1, -1, K))
    return np.asarray(mu[0], np.float32)

  def decode(self, latents: np.ndarray) -> str:
    """Text from latent vectors [S, L] (or one [L]): each decoded to K tokens by argmax."""
    ae = self._ae()
    z = np.asarray(latents, np.float32)
    z = z[None] if z.ndim == 1 else z
    if z.ndim != 2 or z.shape[-1] != ae.latent_dim:
      raise CalmError(f"latents must be [S, {ae.latent_dim}] or [{ae.latent_dim}], got "
                      f"{list(np.shape(latents))}")
    ids = np.asarray(_decode_jit(*nnx.split(ae), z[None]))[0].reshape(-1)
    return self.tokenizer.decode(ids.tolist())


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(graphdef, state, ids_BSK):
  return nnx.merge(graphdef, state).encode(ids_BSK)


@functools.partial(jax.jit, static_argnums=0)
def _decode_jit(graphdef, state, z_BSL):
  return nnx.merge(graphdef, state).decode_ids(z_BSL)


def load(cfg: Config, *, step: int | None = None, mesh=None,
         stages_allowed: Sequence[str] | None = None, weights: str = "float32",
         cache: str | None = None) -> Run:
  """Loads the run `cfg.run_dir` (checkpoint step `step`, default the latest), its weight
  matrices (the autoencoder's included) stored in `weights` precision and its KV cache in
  `cache` (None: the compute dtype); see `calm.quantize`."""
  from calm import quantize

  quantize.check(weights, cache)
  if stages_allowed is not None and cfg.stage not in stages_allowed:
    raise ConfigError(f"stage: this command needs a {' or '.join(stages_allowed)} run, got "
                      f"{cfg.stage}")
  stage = stages.get_stage(cfg)
  loaded = load_model(cfg.run_dir, step=step, mesh=mesh, expect_stage=cfg.stage)
  ae = ae_dir = None
  if stage.needs_autoencoder:
    ae = frozen_autoencoder(cfg, mesh, loaded.metadata)
    ae_dir = ae.run_dir
  tok = get_tokenizer(cfg, cfg.run_dir, ae_dir=ae_dir, train_if_missing=False)
  check_tokenizer(tok, loaded.metadata, f"the model in {cfg.run_dir}")
  if weights != "float32" or cache is not None:
    loaded = _with_precision(loaded, weights, cache)
    ae = _with_precision(ae, weights, None) if ae is not None else None
  return Run(config=cfg, loaded=loaded, autoencoder=ae, tokenizer=tok,
             precision={"weights": weights, "cache": cache})


def _with_precision(loaded: checkpoint.Loaded, weights: str, cache: str | None
                    ) -> checkpoint.Loaded:
  from calm import quantize

  graphdef, params = nnx.split(quantize.apply(loaded.model, weights, cache))
  return dataclasses.replace(loaded, graphdef=graphdef, params=quantize.place(params))


def check_tokenizer(tokenizer: Tokenizer, metadata: dict, what: str) -> None:
  """The tokenizer in use must be the one `what` was trained with (its fingerprint is recorded
  in the checkpoint metadata; older checkpoints without one are not checked)."""
  want = metadata.get("tokenizer_fingerprint")
  if want and want != tokenizer.fingerprint:
    raise ConfigError(f"data.tokenizer: {what} was trained with another tokenizer (fingerprint "
                      f"{want[:12]}) than the one in use ({tokenizer.fingerprint[:12]}); drop the "
                      f"data.tokenizer override, or give the file of the tokenizer it was "
                      f"trained with")


def open(path: str | os.PathLike, step: int | None = None, *,
         overrides: Sequence[str] = (), mesh=None, weights: str = "float32",
         cache: str | None = None) -> Run:  # noqa: A001 (calm.open)
  """Opens a trained run: its directory or its `config.yaml` (`overrides`: dotted key=value, as
  on the command line; `step`: a checkpoint step, default the latest). `weights`: "float32",
  "bf16" or "int8" storage of the weight matrices; `cache`: "float32" or "bf16" KV cache (None:
  the compute dtype); see `calm.quantize`."""
  from calm import quantize

  quantize.check(weights, cache)
  p = pathlib.Path(path)
  cfg_path = p / paths.CONFIG_FILE if p.is_dir() else p
  if not cfg_path.is_file():
    raise ConfigError(f"{path}: not a run directory (no {paths.CONFIG_FILE})"
                      if p.is_dir() else f"{path}: no such run directory or config file")
  cfg = paths.load_config(cfg_path, list(overrides))
  compile_cache.enable(cfg)
  return load(cfg, step=step, mesh=mesh, weights=weights, cache=cache)
