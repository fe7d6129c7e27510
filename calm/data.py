"""Text sources → documents → one EOS-separated token stream → blocks → Grain batches.

Sources: `.txt` (documents split on `data.separator`), `.jsonl`/`.json` (JSON Lines with a
`data.text_field`; also `.gz`, and `.zst` when zstandard is installed), a directory (its
top-level files of those types) or a glob of such files, `tfds:NAME[:SPLIT]` (ArrayRecord via
`tfds.data_source`, no TensorFlow needed), and `prepared:DIR` token shards (`calm.prepare`).
Documents are streamed (`iter_documents`); small sources are tokenised into the run directory.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import pathlib
import re
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator

import grain
import numpy as np

from calm import shards
from calm.errors import ConfigError, DataError
from calm.tokenizer import Tokenizer

if TYPE_CHECKING:
  import jax

  from calm.config import Config, DataConfig

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
COMPRESSED_SUFFIXES = (".gz", ".zst")
_ENCODE_CHUNK = 2048  # documents per encode_batch call
_BATCH_CHARS = 1 << 20  # characters per encode_batch call (about)
_PIECE_CHARS = 1 << 16  # a longer document is encoded in pieces cut at whitespace


# ----------------------------------------------------------------------------- sources


def _is_tfds(spec: str, data_cfg: DataConfig) -> bool:
  return spec.startswith("tfds:") or data_cfg.format == "tfds"


def base_suffix(path: pathlib.Path) -> str:
  """The format suffix of a possibly compressed file: `a.jsonl.gz` → `.jsonl`."""
  suffixes = [s.lower() for s in path.suffixes]
  if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
    suffixes.pop()
  return suffixes[-1] if suffixes else ""


def is_compressed(path: pathlib.Path) -> bool:
  return path.suffix.lower() in COMPRESSED_SUFFIXES


def resolve_files(spec: str, data_cfg: DataConfig) -> list[pathlib.Path]:
  """The files a path / directory / glob spec names, sorted; DataError if there are none."""
  spec = spec.strip()
  if not spec:
    raise DataError("empty data source")
  suffixes = TEXT_SUFFIXES + JSON_SUFFIXES
  if any(c in spec for c in "*?[") and not pathlib.Path(spec).exists():
    files = [pathlib.Path(f) for f in sorted(globlib.glob(spec, recursive=True))]
    files = [f for f in files if f.is_file()]
    if not files:
      raise DataError(f"no files match {spec}")
    return files
  p = pathlib.Path(spec)
  if p.is_dir():
    files = sorted(f for f in p.iterdir()
                   if f.is_file() and not f.name.startswith(".")
                   and (data_cfg.format != "auto" or base_suffix(f) in suffixes))
    if not files:
      subdirs = sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
      hint = f" (subdirectories: {', '.join(subdirs)})" if subdirs else ""
      raise DataError(f"no {'/'.join(suffixes)} files in directory {p}{hint}")
    return files
  if p.is_file():
    return [p]
  if p.exists():
    raise DataError(f"{p}: not a regular file")
  raise DataError(f"data source not found: {p}")


@contextlib.contextmanager
def _open_binary(path: pathlib.Path) -> Iterator[BinaryIO]:
  """A binary reader of the file's (decompressed) bytes; one-line DataErrors."""
  try:
    if path.stat().st_size == 0:
      raise DataError(f"{path}: empty file")
    suffix = path.suffix.lower()
    if suffix == ".gz":
      f = gzip.open(path, "rb")
    elif suffix == ".zst":
      try:
        import zstandard
      except ImportError:
        raise DataError(f"{path}: reading .zst needs the zstandard package "
                        "(or decompress the file first)") from None
      f = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
      f = io.BufferedReader(f)
    else:
      f = open(path, "rb")
  except PermissionError:
    raise DataError(f"{path}: permission denied") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
  try:
    with f:
      yield f
  except (OSError, EOFError) as e:  # truncated or corrupt compressed data
    raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _decode(raw: bytes, path: pathlib.Path, offset: int = 0) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not valid UTF-8 at byte offset {offset + e.start} "
                    f"(byte 0x{raw[e.start]:02x})") from None


def _read_text(path: pathlib.Path) -> str:
  with _open_binary(path) as f:
    raw = f.read()
  if not raw:
    raise DataError(f"{path}: empty file")
  return _decode(raw, path).removeprefix("\ufeff")


def _txt_documents(path: pathlib.Path, text: str, separator: str) -> list[str]:
  if "\r" not in separator:
    text = text.replace("\r\n", "\n")
  return [d.strip("\r\n") for d in text.split(separator) if d.strip()]


def _json_text(rec: Any, where: str, field: str) -> str | None:
  """The record's text field; None when blank."""
  if not isinstance(rec, dict):
    raise DataError(f"{where}: expected a JSON object with a '{field}' field, "
                    f"got {type(rec).__name__}")
  if field not in rec:
    keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
    raise DataError(f"{where}: no '{field}' field (keys: {keys}); set data.text_field")
  v = rec[field]
  if not isinstance(v, str):
    raise DataError(f"{where}: field '{field}' is {type(v).__name__}, not a string")
  return v if v.strip() else None


def is_json_array(path: pathlib.Path) -> bool:
  """Whether a JSON file holds one array of records (read whole) rather than JSON Lines."""
  with _open_binary(path) as f:
    head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
  return head.startswith(b"[")


def _json_array_documents(path: pathlib.Path, field: str) -> Iterator[str]:
  text = _read_text(path)
  try:
    recs = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
  for i, r in enumerate(recs):
    d = _json_text(r, f"{path}: record {i}", field)
    if d is not None:
      yield d


def _jsonl_documents(path: pathlib.Path, field: str, start: int, end: int | None
                     ) -> Iterator[str]:
  """Documents of the lines that start in byte range [start, end) (all lines by default)."""
  with _open_binary(path) as f:
    pos = 0
    if start > 0:  # begin at the first line that starts at or after `start`
      f.seek(start - 1)
      pos = start if f.read(1) == b"\n" else start + len(f.readline())
      f.seek(pos)
    lineno = 0 if start == 0 else None  # line numbers are known only from the file's start
    for raw in f:
      if end is not None and pos >= end:
        break
      line_start, pos = pos, pos + len(raw)
      if lineno is not None:
        lineno += 1
      where = f"{path}:{lineno}" if lineno is not None else f"{path}: line at byte {line_start}"
      if line_start == 0:
        raw = raw.removeprefix(b"\xef\xbb\xbf")
      if not raw.strip():
        continue
      # decode first: json.loads(bytes) would guess an encoding; lines split only on "\n"
      line = _decode(raw, path, line_start)
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
      d = _json_text(rec, where, field)
      if d is not None:
        yield d


def file_format(path: pathlib.Path, data_cfg: DataConfig) -> str:
  """"jsonl" or "txt" for a file of the source."""
  if data_cfg.format != "auto":
    return data_cfg.format
  return "jsonl" if base_suffix(path) in JSON_SUFFIXES else "txt"


def iter_file_documents(path: pathlib.Path, data_cfg: DataConfig, start: int = 0,
                        end: int | None = None) -> Iterator[str]:
  """A file's documents in order, streamed (JSON Lines) or per file (text, JSON arrays).

  [start, end) selects the JSON Lines documents whose line starts in that byte range of an
  uncompressed file, so consecutive ranges partition the file's documents.
  """
  whole = start == 0 and end is None
  n = 0
  if file_format(path, data_cfg) == "jsonl" and not is_json_array(path):
    docs: Iterable[str] = _jsonl_documents(path, data_cfg.text_field, start, end)
  elif not whole:
    raise ValueError(f"{path}: only uncompressed JSON Lines files can be read by byte range")
  elif file_format(path, data_cfg) == "jsonl":
    docs = _json_array_documents(path, data_cfg.text_field)
  else:
    docs = _txt_documents(path, _read_text(path), data_cfg.separator)
  for d in docs:
    n += 1
    yield d
  if whole and n == 0:
    raise DataError(f"{path}: no documents (only blank text)")


_TFDS_SPEC = re.compile(r"(?P<name>[^:]+(?::\d+(?:\.\d+)*)?)(?::(?P<split>.+))?")


def _parse_tfds(spec: str) -> tuple[str, str]:
  """`tfds:NAME[/CONFIG][:VERSION][:SPLIT]` → (name, split); the split defaults to train."""
  body = spec[len("tfds:"):] if spec.startswith("tfds:") else spec
  m = _TFDS_SPEC.fullmatch(body.strip())
  if not m:
    raise DataError(f"{spec!r}: expected tfds:NAME[:SPLIT]")
  return m["name"], m["split"] or "train"


def tfds_source(spec: str, data_cfg: DataConfig) -> tuple[Any, str]:
  """(random-access TFDS data source, its display name)."""
  name, split = _parse_tfds(spec)
  where = f"tfds:{name}:{split}"
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(f"{where}: tensorflow-datasets is not installed") from None
  try:
    src = tfds.data_source(name, split=split, data_dir=data_cfg.tfds_data_dir or None,
                           download=False)
  except Exception as e:  # tfds raises many unrelated types for "not found"
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise DataError(f"{where}: cannot open ({msg[:200]})") from None
  return src, where


def iter_tfds_documents(spec: str, data_cfg: DataConfig, start: int = 0,
                        end: int | None = None) -> Iterator[str]:
  """Documents of records [start, end) of a TFDS split, in record order."""
  src, where = tfds_source(spec, data_cfg)
  field = data_cfg.text_field
  end = len(src) if end is None else min(end, len(src))
  for lo in range(start, end, 1024):
    idx = list(range(lo, min(end, lo + 1024)))
    recs = src.__getitems__(idx) if hasattr(src, "__getitems__") else [src[i] for i in idx]
    for i, rec in zip(idx, recs):
      if not isinstance(rec, dict) or field not in rec:
        keys = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
        raise DataError(f"{where}: record {i} has no '{field}' feature ({keys}); "
                        "set data.text_field")
      v = rec[field]
      if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
      if isinstance(v, bytes):
        try:
          v = v.decode("utf-8")
        except UnicodeDecodeError as e:
          raise DataError(f"{where}: record {i} is not valid UTF-8 at byte offset "
                          f"{e.start}") from None
      if not isinstance(v, str):
        raise DataError(f"{where}: record {i} feature '{field}' is {type(v).__name__}, "
                        "not text")
      if v.strip():
        yield v


def iter_documents(spec: str, data_cfg: DataConfig) -> Iterator[str]:
  """All documents of a source in a deterministic order, streamed; DataError on bad input."""
  if _is_tfds(spec, data_cfg):
    n = 0
    for d in iter_tfds_documents(spec, data_cfg):
      n += 1
      yield d
    if n == 0:
      raise DataError(f"{spec}: no documents")
    return
  for f in resolve_files(spec, data_cfg):
    yield from iter_file_documents(f, data_cfg)


def read_documents(spec: str, data_cfg: DataConfig) -> list[str]:
  """All documents of a source as a list (small sources; see `iter_documents`)."""
  if shards.prepared_dir(spec) is not None:
    raise DataError(f"{spec}: a prepared token directory holds no text")
  return list(iter_documents(spec, data_cfg))


# ----------------------------------------------------------------------------- tokenisation


def encode_documents(docs: Iterable[str], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(flat int32 ids with EOS after every document, per-document lengths including EOS)."""
  flats, lens = [], []
  for ids, n in encode_stream(docs, tokenizer, np.int32):
    flats.append(ids)
    lens.append(n)
  if not flats:
    return np.zeros((0,), np.int32), np.zeros((0,), np.int64)
  return np.concatenate(flats), np.concatenate(lens)


def encode_stream(docs: Iterable[str], tokenizer: Tokenizer, dtype: Any = np.int32,
                  chunk: int = _ENCODE_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Encodes documents in chunks → (flat ids with EOS after each document, lengths incl. EOS).

  A chunk holds at most `chunk` documents and about _BATCH_CHARS characters; a document longer
  than _PIECE_CHARS is encoded alone, piece by piece (`_pieces`, cut at whitespace), so memory
  does not grow with a document's length.
  """
  eos = (tokenizer.eos_id,)

  def encode(batch: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = tokenizer.encode_batch(batch)
    n = np.fromiter(map(len, ids), np.int64, len(ids)) + 1
    out = np.fromiter(itertools.chain.from_iterable(x for i in ids for x in (i, eos)), dtype,
                      int(n.sum()))
    return out, n

  batch: list[str] = []
  chars = 0
  for doc in docs:
    if len(doc) > _PIECE_CHARS:
      if batch:
        yield encode(batch)
        batch, chars = [], 0
      parts = [np.asarray(tokenizer.encode(p), dtype) for p in _pieces(doc, _PIECE_CHARS)]
      out = np.concatenate([*parts, np.asarray(eos, dtype)])
      yield out, np.array([out.shape[0]], np.int64)
      continue
    batch.append(doc)
    chars += len(doc)
    if len(batch) >= chunk or chars >= _BATCH_CHARS:
      yield encode(batch)
      batch, chars = [], 0
  if batch:
    yield encode(batch)


def _pieces(text: str, size: int) -> Iterator[str]:
  """`text` in pieces of at most `size` characters, each after the first starting at a whitespace
  character followed by a non-whitespace one (a boundary where word-level pre-tokenizers split
  anyway, so the ids are those of the whole text), or cut at `size` when there is none."""
  lo = 0
  while len(text) - lo > size:
    hi = lo + size
    cut = hi
    for ws in (" ", "\n", "\t"):
      i = hi
      while (i := text.rfind(ws, lo + size // 2, i)) > lo:
        if not text[i + 1].isspace():
          cut = i
          break
      if cut != hi:
        break
    yield text[lo:cut]
    lo = cut
  yield text[lo:]


def tokenized_documents(spec: str, data_cfg: DataConfig, tokenizer: Tokenizer) -> list[np.ndarray]:
  """Each document's ids followed by EOS (int32), in source order."""
  if shards.prepared_dir(spec) is not None:
    flat = open_prepared(spec, tokenizer).stream()
    return np.split(flat, np.flatnonzero(flat == tokenizer.eos_id)[:-1] + 1)
  flat, lengths = encode_documents(iter_documents(spec, data_cfg), tokenizer)
  return np.split(flat, np.cumsum(lengths)[:-1])


def prepared_root(spec: str) -> pathlib.Path:
  """The directory of a prepared spec, which must exist (a one-line DataError otherwise)."""
  root = shards.prepared_dir(spec)
  if root is None or not str(root).strip() or str(root) == ".":
    raise DataError(f"{spec!r}: name the prepared directory (prepared:DIR)")
  if not root.is_dir():
    raise DataError(f"{spec}: prepared directory {root} not found")
  return root


def open_prepared(spec: str, tokenizer: Tokenizer) -> shards.PreparedTokens:
  """The prepared token stream a `prepared:DIR` spec names, checked against the tokenizer."""
  return shards.PreparedTokens(prepared_root(spec), tokenizer.fingerprint)


def check_token_ids(ids: np.ndarray, vocab_size: int, where: str) -> None:
  """Every id must be a row of the model's embedding (a corrupt or foreign shard is not)."""
  if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
    bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
    raise DataError(f"{where}: token id {bad} is outside the model's vocabulary of {vocab_size} "
                    f"(a corrupt shard, or one made with another tokenizer)")


def _cache_key(spec: str, data_cfg: DataConfig, tokenizer: Tokenizer) -> str | None:
  if _is_tfds(spec, data_cfg):
    return None  # records are not files we can stat cheaply; always re-read
  h = hashlib.sha256()
  h.update(json.dumps([data_cfg.format, data_cfg.separator, data_cfg.text_field,
                       tokenizer.fingerprint]).encode())
  for f in resolve_files(spec, data_cfg):
    st = f.stat()
    h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


def token_stream(spec: str, data_cfg: DataConfig, tokenizer: Tokenizer,
                 cache_dir: str | os.PathLike | None = None) -> np.ndarray:
  """The source as one flat int32 stream with EOS after every document.

  With `cache_dir`, the stream is stored as `tokens-<hash>.npy` (keyed by the files' paths,
  sizes and mtimes and by the tokenizer) and later calls memory-map it instead of tokenising.
  A prepared directory (`prepared:DIR`) is read as it is.
  """
  if shards.prepared_dir(spec) is not None:
    return open_prepared(spec, tokenizer).stream()
  key = _cache_key(spec, data_cfg, tokenizer) if cache_dir is not None else None
  path = pathlib.Path(cache_dir) / f"tokens-{key}.npy" if key else None
  if path is not None and path.is_file():
    try:
      return np.load(path, mmap_mode="r")
    except (OSError, ValueError):
      log.warning("ignoring unreadable token cache %s", path)
  tokens, lengths = encode_documents(iter_documents(spec, data_cfg), tokenizer)
  log.info("tokenised %s: %d documents, %d tokens", spec, len(lengths), tokens.shape[0])
  if path is not None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      np.save(tmp, tokens)
      os.replace(tmp, path)
    except OSError as e:  # a read-only run directory only costs the cache
      log.warning("cannot cache tokens in %s (%s)", path.parent, e.strerror or e)
      with contextlib.suppress(OSError):
        tmp.unlink()
  return tokens


def pack_blocks(tokens: np.ndarray, block_tokens: int, what: str = "data") -> np.ndarray:
  """[n_blocks, block_tokens] view of the stream; the ragged tail is dropped."""
  n = tokens.shape[0] // block_tokens
  if n == 0:
    raise DataError(f"{what} has {tokens.shape[0]} tokens, fewer than one block of "
                    f"data.block_tokens={block_tokens}")
  return tokens[:n * block_tokens].reshape(n, block_tokens)


def eval_blocks(cfg: Config, tokenizer: Tokenizer, run_dir: str | os.PathLike | None,
                spec: str) -> np.ndarray:
  """Held-out source as [n_blocks, data.block_tokens] int32, in order (no shuffle)."""
  tokens = token_stream(spec, cfg.data, tokenizer, run_dir)
  return np.asarray(pack_blocks(tokens, cfg.data.block_tokens, what=f"eval source {spec}"))


# ----------------------------------------------------------------------------- iterator


class TrainIterator(grain.DatasetIterator):
  """Endless shuffled batches [local_batch, block_tokens] int32 for one process.

  Global batch i is elements [i·G, (i+1)·G) of a per-epoch shuffled, repeated stream of blocks;
  process p yields rows [p·G/P, (p+1)·G/P) of it. The state is the global batch index (plus a
  description of the stream, checked on restore), so it is the same on every process and stays
  valid when the process count changes. Works with `grain.checkpoint.CheckpointSave`.
  """

  def __init__(self, blocks_QT: np.ndarray | shards.TokenBlocks, *, global_batch: int, seed: int, shuffle: bool = True,
               process_index: int = 0, process_count: int = 1, prefetch: int = 2,
               workers: int = 1):
    self._closed = True  # until the grain base is initialised (its __del__ reads this)
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ConfigError(f"process_index {process_index} out of range for {process_count} "
                        "processes")
    if global_batch % process_count:
      raise ConfigError(f"train.batch_size: {global_batch} is not divisible by the "
                        f"{process_count} processes")
    self.local_batch = global_batch // process_count
    self._meta = {"num_blocks": int(blocks_QT.shape[0]), "block_tokens": int(blocks_QT.shape[1]),
                  "global_batch": int(global_batch), "seed": int(seed), "shuffle": bool(shuffle)}
    # Shuffle/batch block *indices*, then gather each batch with one fancy index (2x faster
    # than stacking per-block elements for small blocks; same batches).
    ds = grain.MapDataset.range(blocks_QT.shape[0])
    if shuffle:
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None).batch(self.local_batch)[process_index::process_count]
    ds = ds.map(lambda idx_B: np.asarray(blocks_QT[idx_B], dtype=np.int32))
    read = grain.ReadOptions(num_threads=workers if prefetch else 0,
                             prefetch_buffer_size=max(prefetch, workers) if prefetch else 0)
    super().__init__(ds.to_iter_dataset(read).__iter__())

  def __next__(self) -> np.ndarray:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._parent.get_state(), **self._meta}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a position; a changed global batch resumes at the same block (rounded down)."""
    for k, v in self._meta.items():
      if k != "global_batch" and k in state and state[k] != v:
        raise DataError(f"data iterator state was saved with {k}={state[k]}, but the current "
                        f"data gives {k}={v}; the data position cannot be resumed")
    if not isinstance(state.get("grain"), dict):
      raise DataError("data iterator state is malformed (no 'grain' entry)")
    inner = dict(state["grain"])
    new_batch = self._meta["global_batch"]
    old_batch = state.get("global_batch", new_batch)
    if old_batch != new_batch and "next_index" in inner:
      inner["next_index"] = inner["next_index"] * old_batch // new_batch
      log.warning("train.batch_size changed from %d to %d: resuming the data stream at block %d",
                  old_batch, new_batch, inner["next_index"] * new_batch)
    self._parent.set_state(inner)


def make_train_iterator(cfg: Config, tokenizer: Tokenizer, run_dir: str | os.PathLike | None, *,
                        process_index: int = 0, process_count: int = 1,
                        prefetch: int = 2) -> TrainIterator:
  """Training batches from cfg.data.train: a prepared directory (memory-mapped, each process
  reads only its rows) or a raw source (token stream cached in run_dir)."""
  what = f"training source {cfg.data.train}"
  if shards.prepared_dir(cfg.data.train) is not None:
    blocks = shards.TokenBlocks(open_prepared(cfg.data.train, tokenizer), cfg.data.block_tokens)
    if len(blocks) == 0:
      raise DataError(f"{what} has {len(blocks.tokens)} tokens, fewer than one block of "
                      f"data.block_tokens={blocks.block_tokens}")
  else:
    tokens = token_stream(cfg.data.train, cfg.data, tokenizer, run_dir)
    blocks = pack_blocks(tokens, cfg.data.block_tokens, what=what)
  return TrainIterator(blocks, global_batch=cfg.train.batch_size, seed=cfg.data.seed,
                       shuffle=cfg.data.shuffle, process_index=process_index,
                       process_count=process_count,
                       prefetch=prefetch if cfg.data.workers else 0, workers=cfg.data.workers)


def to_global(local_batch_np: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """Assembles every process's local rows into one global array with `sharding`."""
  import jax

  return jax.make_array_from_process_local_data(sharding, local_batch_np)
