"""Prepared token directories: a manifest plus raw little-endian token shards.

Layout of a directory written by `python -m calm.prepare`:
  manifest.json        format, dtype, tokenizer fingerprint, source, shards (file, tokens,
                       documents) in stream order; written last, so its presence means complete
  tokenizer.json       the tokenizer that produced the ids
  shard-00000.bin ...  ids of whole documents, EOS after each, dtype uint16 or uint32

The shards concatenated in manifest order are the source's token stream (the same stream that
`calm.data.token_stream` makes from the raw source with the same tokenizer).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from calm.errors import DataError

FORMAT = "calm-tokens/1"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
PREFIX = "prepared:"


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(index: int) -> str:
  return f"shard-{index:05d}.bin"


def prepared_dir(spec: str) -> pathlib.Path | None:
  """The directory of a `prepared:DIR` spec or of a directory holding a manifest, else None."""
  spec = spec.strip()
  if spec.startswith(PREFIX):
    return pathlib.Path(spec[len(PREFIX):])
  p = pathlib.Path(spec)
  return p if spec and (p / MANIFEST).is_file() else None


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=1) + "\n")
  os.replace(tmp, path)


def read_manifest(root: pathlib.Path) -> dict:
  """The manifest of a prepared directory; one-line DataError if missing or malformed."""
  path = root / MANIFEST
  if not root.is_dir():
    raise DataError(f"prepared data not found: {root}")
  if not path.is_file():
    raise DataError(f"{root}: no {MANIFEST} (not a prepared directory, or `python -m "
                    "calm.prepare` did not finish; rerun it to resume)")
  try:
    m = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: unreadable manifest ({e})") from None
  if not isinstance(m, dict) or m.get("format") != FORMAT:
    raise DataError(f"{path}: not a {FORMAT} manifest")
  return m


class PreparedTokens:
  """Memory-mapped view of a prepared directory's token stream (nothing is read until used)."""

  def __init__(self, root: str | os.PathLike, fingerprint: str | None = None):
    self.root = pathlib.Path(root)
    self.manifest = m = read_manifest(self.root)
    self.dtype = np.dtype(m["dtype"])
    want = m["tokenizer"]["fingerprint"]
    if fingerprint is not None and fingerprint != want:
      raise DataError(f"{self.root}: prepared with tokenizer {want}, but the run's tokenizer is "
                      f"{fingerprint}; use {self.root / TOKENIZER} (data.tokenizer) or "
                      "prepare again")
    self.shards: list[np.ndarray] = []
    for s in m["shards"]:
      path = self.root / s["file"]
      want_bytes = int(s["tokens"]) * self.dtype.itemsize
      try:
        size = path.stat().st_size
      except OSError:
        raise DataError(f"{path}: shard listed in the manifest is missing") from None
      if size != want_bytes:
        raise DataError(f"{path}: {size} bytes on disk, the manifest says {want_bytes} "
                        "(truncated or replaced); prepare again")
      self.shards.append(np.memmap(path, self.dtype, "r") if size else
                         np.zeros((0,), self.dtype))
    self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the stream as int32 (copies only that range)."""
    out = np.empty(stop - start, np.int32)
    i = int(np.searchsorted(self.offsets, start, side="right")) - 1
    pos = start
    while pos < stop:
      lo = pos - self.offsets[i]
      n = min(stop, self.offsets[i + 1]) - pos
      out[pos - start:pos - start + n] = self.shards[i][lo:lo + n]
      pos += n
      i += 1
    return out

  def stream(self) -> np.ndarray:
    """The whole stream as one int32 array (for small held-out sets)."""
    return self.read(0, len(self))


class TokenBlocks:
  """[num_blocks, block_tokens] rows of a prepared stream, read on demand (ragged tail dropped).

  Indexing with an array of row indices reads only those rows: a process that gathers its own
  batch rows touches only the pages holding them.
  """

  def __init__(self, tokens: PreparedTokens, block_tokens: int):
    self.tokens = tokens
    self.block_tokens = block_tokens
    self.shape = (len(tokens) // block_tokens, block_tokens)

  def __len__(self) -> int:
    return self.shape[0]

  def rows(self, idx: Sequence[int]) -> np.ndarray:
    t = self.block_tokens
    out = np.empty((len(idx), t), np.int32)
    for r, i in enumerate(np.asarray(idx).reshape(-1)):
      i = int(i)
      if not 0 <= i < self.shape[0]:
        raise IndexError(f"block {i} out of range for {self.shape[0]} blocks")
      out[r] = self.tokens.read(i * t, (i + 1) * t)
    return out

  def __getitem__(self, idx: Any) -> np.ndarray:
    if isinstance(idx, slice):
      return self.rows(range(*idx.indices(self.shape[0])))
    if np.ndim(idx) == 0:
      return self.rows([idx])[0]
    return self.rows(idx)
