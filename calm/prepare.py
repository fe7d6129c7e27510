"""Tokenise a corpus once into shards: `python -m calm.prepare --config CFG --out DIR [k=v ...]`.

The source is `data.train` (or `--source`): text / JSON Lines (.gz, .zst) files, a directory, a
glob or `tfds:NAME:SPLIT`. It is cut into pieces defined by the input alone (one per file, byte
ranges of large uncompressed JSON Lines files, record ranges of a TFDS split); worker processes
stream each piece's documents through the tokenizer (memory does not grow with the corpus) into
`shard-NNNNN.bin` (EOS after every document). A shard is written under a temporary name and
renamed when complete, so after a kill a rerun keeps the finished shards, redoes the rest and
gives the same bytes whatever the number of processes. `plan.json` (the absolute source, the
tokenizer, the pieces) is written first, once everything is checked: a rerun with the same plan
resumes, any other is refused unless `--force` (which starts over), and a preparation that fails
removes what it wrote. `manifest.json` is written last (see `calm.shards`); train with
`data.train=prepared:DIR data.tokenizer=DIR/tokenizer.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import pathlib
import sys
import time
from typing import Iterator, Sequence

import numpy as np

from calm import data, paths, shards
from calm.errors import CalmError, ConfigError, DataError
from calm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PIECE_BYTES = 64 << 20  # input bytes per shard of a large JSON Lines file
PIECE_RECORDS = 1 << 16  # TFDS records per shard
PLAN = "plan.json"  # the pieces and tokenizer of a preparation, written before its shards


@dataclasses.dataclass(frozen=True)
class Piece:
  """A part of the source: a whole file, a byte range of a JSON Lines file, or TFDS records."""

  kind: str  # "file" | "range" | "tfds"
  source: str
  start: int = 0
  end: int | None = None


def plan_pieces(spec: str, data_cfg, piece_bytes: int = PIECE_BYTES,
                piece_records: int = PIECE_RECORDS) -> list[Piece]:
  """The source's pieces in stream order (a function of the input and the sizes only)."""
  if data._is_tfds(spec, data_cfg):
    n = len(data.tfds_source(spec, data_cfg)[0])
    return [Piece("tfds", spec, lo, min(n, lo + piece_records))
            for lo in range(0, n, piece_records)]
  pieces = []
  for f in data.resolve_files(spec, data_cfg):
    size = f.stat().st_size
    if (size > piece_bytes and data.file_format(f, data_cfg) == "jsonl"
        and not data.is_compressed(f) and not data.is_json_array(f)):
      pieces += [Piece("range", str(f), lo, min(size, lo + piece_bytes))
                 for lo in range(0, size, piece_bytes)]
    else:
      pieces.append(Piece("file", str(f)))
  return pieces


def piece_documents(piece: Piece, data_cfg) -> Iterator[str]:
  if piece.kind == "tfds":
    return data.iter_tfds_documents(piece.source, data_cfg, piece.start, piece.end)
  return data.iter_file_documents(pathlib.Path(piece.source), data_cfg, piece.start, piece.end)


# ----------------------------------------------------------------------------- workers

_worker: dict = {}


def _init_worker(tok_json: str, special: tuple[int, int, int], data_cfg, out: str,
                 dtype: str) -> None:
  import tokenizers

  pad, bos, eos = special
  _worker.update(tok=Tokenizer(tokenizers.Tokenizer.from_str(tok_json), pad_id=pad, bos_id=bos,
                               eos_id=eos), data_cfg=data_cfg, out=pathlib.Path(out),
                 dtype=np.dtype(dtype))


def _write_shard(job: tuple[int, Piece]) -> tuple[int, int]:
  """Tokenises one piece into its shard (temporary name, then rename) → (index, tokens)."""
  index, piece = job
  w = _worker
  final = w["out"] / shards.shard_name(index)
  tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
  n = 0
  try:
    with open(tmp, "wb") as f:
      for ids, _ in data.encode_stream(piece_documents(piece, w["data_cfg"]), w["tok"], w["dtype"],
                                       chunk=256):
        f.write(ids.tobytes())
        n += ids.shape[0]
    os.replace(tmp, final)
  finally:
    with contextlib.suppress(OSError):
      tmp.unlink()
  return index, n


@contextlib.contextmanager
def _one_thread_per_process() -> Iterator[None]:
  """Worker processes inherit an environment that keeps the tokenizer to one thread each."""
  keys = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
  old = {k: os.environ.get(k) for k in keys}
  os.environ.update(keys)
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


# ----------------------------------------------------------------------------- driver


def _count(path: pathlib.Path, dtype: np.dtype, eos_id: int) -> tuple[int, int]:
  """(tokens, documents) of a finished shard, read in slices."""
  size = path.stat().st_size
  if size == 0:
    return 0, 0
  mm = np.memmap(path, dtype, "r")
  docs = sum(int(np.count_nonzero(mm[i:i + (1 << 24)] == eos_id))
             for i in range(0, mm.shape[0], 1 << 24))
  return int(mm.shape[0]), docs


def _source_spec(spec: str, data_cfg) -> str:
  """The source as the plan records it: files, directories and globs as absolute paths (a
  relative path means another corpus from another working directory)."""
  spec = spec.strip()
  if data._is_tfds(spec, data_cfg):
    return spec
  return os.path.abspath(os.path.expanduser(spec))


def _out_dir(out: str | os.PathLike) -> pathlib.Path:
  """`out` as a directory that exists or can be made; ConfigError otherwise (nothing is made)."""
  return paths.output_dir(out, "prepare into")


def _ours(root: pathlib.Path) -> list[pathlib.Path]:
  """The files a preparation writes that exist under `root`."""
  if not root.is_dir():
    return []
  names = [PLAN, shards.MANIFEST, shards.TOKENIZER]
  return ([root / n for n in names if (root / n).exists()] + sorted(root.glob("shard-*.bin"))
          + sorted(root.glob(".shard-*.tmp*")))


def _tokenizer(cfg, spec: str, root: pathlib.Path, resume: bool):
  """data.tokenizer, else DIR/tokenizer.json of a resumed preparation, else one trained on the
  source; nothing is written."""
  import tempfile

  from calm.run import get_tokenizer

  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=spec))
  if cfg.data.tokenizer or (resume and (root / shards.TOKENIZER).is_file()):
    return get_tokenizer(cfg, root, train_if_missing=False)
  with tempfile.TemporaryDirectory() as scratch:  # get_tokenizer saves what it trains
    return get_tokenizer(cfg, scratch)


def prepare(cfg, out: str | os.PathLike, *, source: str = "", workers: int = 0,
            piece_bytes: int = PIECE_BYTES, piece_records: int = PIECE_RECORDS,
            progress: bool = True, force: bool = False) -> dict:
  """Tokenises `source` (default data.train) into shards under `out`; returns the manifest.

  Everything is checked before anything is written. A directory holding another preparation (or
  files of one without its plan.json) is refused unless `force`, which replaces them. A
  preparation that fails leaves no files that would block a rerun.
  """
  spec = source or cfg.data.train
  if not spec.strip():
    raise ConfigError("data.train: name the source to prepare (or pass --source)")
  if shards.prepared_dir(spec) is not None:
    raise DataError(f"{spec}: already prepared")
  if not (_positive(piece_bytes) and _positive(piece_records)):
    raise ConfigError(f"piece sizes must be positive integers, got {piece_bytes} bytes and "
                      f"{piece_records} records")
  root = _out_dir(out)
  spec = _source_spec(spec, cfg.data)
  existing = _ours(root)
  old_plan = _read_plan(root) if (root / PLAN).is_file() else None
  if existing and old_plan is None and not force:
    raise DataError(f"{root} holds {', '.join(sorted({_kind(p) for p in existing}))} but no "
                    f"{PLAN} (not a preparation this version can resume); use a new directory "
                    "or --force to replace them")
  resume = old_plan is not None and not force
  tok = _tokenizer(cfg, spec, root, resume)
  dtype = shards.token_dtype(tok.vocab_size)
  pieces = plan_pieces(spec, cfg.data, piece_bytes, piece_records)
  d = cfg.data
  plan = {"format": shards.FORMAT, "source": spec, "dtype": dtype.name,
          "data": {"format": d.format, "separator": d.separator, "text_field": d.text_field},
          "tokenizer": {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                        "eos_id": tok.eos_id},
          "pieces": [dataclasses.asdict(p) for p in pieces]}
  if resume and old_plan != json.loads(json.dumps(plan)):
    raise DataError(f"{root} holds a preparation of another source, tokenizer or piece size; "
                    "use a new directory or --force to replace it")

  # Checked: now write. A fresh preparation that fails removes what it wrote.
  fresh = not resume
  made_root = not root.exists()
  if fresh:
    for p in existing:  # only with force
      p.unlink()
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"--out {root}: cannot create ({e.strerror or e})") from None
  try:
    if not (root / shards.TOKENIZER).is_file():
      tok.save(root / shards.TOKENIZER)
    if fresh:
      shards.write_json_atomic(root / PLAN, plan)
    return _run(cfg, root, spec, plan, pieces, tok, dtype, workers, progress)
  except CalmError:  # a kill or ^C keeps the finished shards for a rerun to resume
    if fresh:
      for p in _ours(root):
        with contextlib.suppress(OSError):
          p.unlink()
      if made_root:
        with contextlib.suppress(OSError):
          root.rmdir()
    raise


def _positive(n) -> bool:
  return isinstance(n, (int, np.integer)) and n >= 1


def _kind(p: pathlib.Path) -> str:
  return "shards" if p.name.startswith(("shard-", ".shard-")) else p.name


def _read_plan(root: pathlib.Path):
  try:
    return json.loads((root / PLAN).read_text())
  except (OSError, ValueError) as e:
    raise DataError(f"{root / PLAN}: unreadable ({e}); use a new directory or --force") from None


def _run(cfg, root: pathlib.Path, spec: str, plan: dict, pieces: Sequence[Piece], tok,
         dtype: np.dtype, workers: int, progress: bool) -> dict:
  """Writes the missing shards, then the manifest."""
  for stale in root.glob(".shard-*.tmp*"):  # half-written shards of a killed run
    stale.unlink()

  todo = [(i, p) for i, p in enumerate(pieces) if not (root / shards.shard_name(i)).is_file()]
  workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
  t0 = time.time()
  new_tokens = 0
  if todo:
    log.info("%s: %d pieces (%d done), %d worker processes", spec, len(pieces),
             len(pieces) - len(todo), workers)
    ctx = multiprocessing.get_context("spawn")  # no inherited threads or locks
    init = (tok.raw.to_str(), (tok.pad_id, tok.bos_id, tok.eos_id), cfg.data, str(root),
            dtype.name)
    with _one_thread_per_process(), ctx.Pool(workers, _init_worker, init) as pool:
      done = pool.imap_unordered(_write_shard, todo)
      if progress:
        from tqdm import tqdm

        done = tqdm(done, total=len(todo), desc="prepare", unit="shard")
      for _, n in done:
        new_tokens += n
  seconds = time.time() - t0

  entries, total_tokens, total_docs = [], 0, 0
  for i in range(len(pieces)):
    name = shards.shard_name(i)
    n, docs = _count(root / name, dtype, tok.eos_id)
    entries.append({"file": name, "tokens": n, "documents": docs})
    total_tokens += n
    total_docs += docs
  if total_tokens == 0:
    raise DataError(f"{spec}: no documents")
  manifest = {k: v for k, v in plan.items() if k != "pieces"}
  manifest.update(tokens=total_tokens, documents=total_docs, shards=entries)
  shards.write_json_atomic(root / shards.MANIFEST, manifest)
  rate = new_tokens / seconds if seconds > 0 and new_tokens else 0.0
  log.info("%s: %d tokens, %d documents in %d shards (%.0f tokens/s this run)", root,
           total_tokens, total_docs, len(entries), rate)
  return manifest


if __name__ == "__main__":
  from calm.cli import prepare as _entry

  sys.exit(_entry())
