"""Byte-level BPE tokenizer: train, save, load (any local tokenizer.json) and encode."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from calm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 in tokenizers trained here
MIN_BPE_VOCAB = len(SPECIAL_TOKENS) + 256  # specials + the byte alphabet

# Names used by common tokenizer families, most specific first.
_EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>",
              "<|end|>", "[SEP]")
_BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
_PAD_NAMES = (PAD, "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")


class Tokenizer:
  """A `tokenizers.Tokenizer` plus the ids of its pad/bos/eos tokens.

  Encoding never adds special tokens and never turns literal text such as "<eos>" into a
  control id, so raw data cannot inject document boundaries.
  """

  def __init__(self, tok: tokenizers.Tokenizer, *, pad_id: int, bos_id: int, eos_id: int):
    self.raw = tok
    self.raw.encode_special_tokens = True  # literal "<eos>" in text is ordinary text
    self._pad_id, self._bos_id, self._eos_id = int(pad_id), int(bos_id), int(eos_id)

  @property
  def vocab_size(self) -> int:
    return self.raw.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def bos_id(self) -> int:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def fingerprint(self) -> str:
    """Short hash of the serialised tokenizer (cache key for token streams)."""
    return hashlib.sha256(self.raw.to_str().encode()).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    return self.raw.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Encodes many texts in parallel (no offsets are computed)."""
    return [e.ids for e in self.raw.encode_batch_fast(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    return self.raw.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def save(self, path: str | os.PathLike) -> None:
    """Writes tokenizer.json atomically (safe against concurrent readers)."""
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    self.raw.save(str(tmp))
    os.replace(tmp, p)

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id})")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Trains a byte-level BPE with <pad>=0, <bos>=1, <eos>=2; decode(encode(x)) == x."""
  if vocab_size < MIN_BPE_VOCAB:
    raise ConfigError(f"model.vocab_size: a byte-level BPE needs at least {MIN_BPE_VOCAB} "
                      f"tokens (3 special + 256 bytes), got {vocab_size}")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(texts, trainer)
  ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
  assert ids == [0, 1, 2], ids
  return Tokenizer(tok, pad_id=0, bos_id=1, eos_id=2)


def _config_token(cfg: dict, key: str) -> str | None:
  v = cfg.get(key)
  if isinstance(v, dict):
    v = v.get("content")
  return v if isinstance(v, str) else None


def _find_id(tok: tokenizers.Tokenizer, preferred: str | None, names: Sequence[str]) -> int | None:
  for name in ((preferred,) if preferred else ()) + tuple(names):
    i = tok.token_to_id(name)
    if i is not None:
      return i
  return None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Loads a tokenizer.json; special ids come from a sibling tokenizer_config.json or by name."""
  p = pathlib.Path(path)
  if p.is_dir():
    p = p / "tokenizer.json"
  if not p.is_file():
    raise DataError(f"tokenizer file not found: {p}")
  try:
    tok = tokenizers.Tokenizer.from_file(str(p))
  except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise DataError(f"{p}: not a valid tokenizer.json ({msg})") from None
  side: dict = {}
  side_path = p.with_name("tokenizer_config.json")
  if side_path.is_file():
    try:
      side = json.loads(side_path.read_text())
    except (OSError, ValueError):
      log.warning("ignoring unreadable %s", side_path)
    side = side if isinstance(side, dict) else {}
  eos = _find_id(tok, _config_token(side, "eos_token"), _EOS_NAMES)
  if eos is None:
    raise DataError(f"{p}: no end-of-sequence token found (looked for {', '.join(_EOS_NAMES)})")
  bos = _find_id(tok, _config_token(side, "bos_token"), _BOS_NAMES)
  pad = _find_id(tok, _config_token(side, "pad_token"), _PAD_NAMES)
  return Tokenizer(tok, pad_id=eos if pad is None else pad, bos_id=eos if bos is None else bos,
                   eos_id=eos)
