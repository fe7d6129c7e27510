"""Prepared token shards: same stream as the raw source, deterministic, resumable, checked."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from calm import config, shards
from calm import data as D
from calm import prepare as P
from calm.errors import DataError
from calm.tokenizer import Tokenizer, train_tokenizer

from conftest import DEMO_DATA, ROOT, subprocess_env

PIECE = 8 << 10  # bytes per piece: the corpus below makes ~20 shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[pathlib.Path, Tokenizer]:
  """A JSON Lines file, a gzipped copy of part of it, a text file, and a tokenizer.json."""
  root = tmp_path_factory.mktemp("corpus")
  text = (DEMO_DATA / "train" / "pg35.txt").read_text()[:200_000]
  words = text.split()
  rng = random.Random(0)
  docs = [" ".join(rng.choices(words, k=rng.randint(1, 120))) for _ in range(600)]
  docs[7] = "literal <eos> text and a line\u2028separator"
  lines = [json.dumps({"text": d, "id": i}, ensure_ascii=False) for i, d in enumerate(docs)]
  src = root / "src"
  src.mkdir()
  (src / "a.jsonl").write_text("\n".join(lines[:500]) + "\n\n")
  import gzip

  with gzip.open(src / "b.jsonl.gz", "wt") as f:
    f.write("\n".join(lines[500:550]) + "\n")
  (src / "c.txt").write_text("\n\n".join(docs[550:]))
  tok = train_tokenizer([p for p in text.split("\n\n") if p.strip()], 300)
  tok.save(root / "tokenizer.json")
  return src, tok


def _cfg(train: str, root: pathlib.Path, **kw) -> config.Config:
  base = {"data.train": train, "data.tokenizer": str(root / "tokenizer.json"),
          "model.vocab_size": 300, "model.chunk_size": 4, "data.block_tokens": 32,
          "train.batch_size": 8}
  return config.replace(config.Config(), **{**base, **kw})


def _shard_bytes(root: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*.bin"))}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> pathlib.Path:
  src, _ = corpus
  out = tmp_path_factory.mktemp("prepared")
  P.prepare(_cfg(str(src), src.parent), out, workers=2, piece_bytes=PIECE, progress=False)
  return out


def test_shards_are_the_raw_token_stream(corpus, prepared):
  src, tok = corpus
  cfg = _cfg(str(src), src.parent)
  raw = D.token_stream(str(src), cfg.data, tok)
  m = shards.read_manifest(prepared)
  assert m["dtype"] == "uint16" and m["tokenizer"]["fingerprint"] == tok.fingerprint
  assert len(m["shards"]) > 10  # a.jsonl is cut into byte ranges
  assert m["documents"] == 600 and m["tokens"] == raw.shape[0]
  assert sum(s["tokens"] for s in m["shards"]) == raw.shape[0]
  stream = D.token_stream(f"prepared:{prepared}", cfg.data, tok)
  np.testing.assert_array_equal(stream, raw)
  assert (np.flatnonzero(stream == tok.eos_id).shape[0]) == 600  # literal "<eos>" stays text
  docs = D.tokenized_documents(str(prepared), cfg.data, tok)  # a directory with a manifest
  want = D.tokenized_documents(str(src), cfg.data, tok)
  assert len(docs) == len(want) == 600
  for a, b in zip(docs, want):
    np.testing.assert_array_equal(a, b)


def test_prepare_a_tfds_source(corpus, tfds_dir, tmp_path):
  """A TFDS source is cut into record ranges; the shards hold its raw token stream."""
  _, tok = corpus
  spec = "tfds:calm_tiny_text"
  cfg = _cfg(spec, corpus[0].parent, **{"data.tfds_data_dir": str(tfds_dir)})
  m = P.prepare(cfg, tmp_path / "p", workers=2, piece_records=4, progress=False)
  assert len(m["shards"]) == 4 and m["documents"] == 15  # 15 records, 4 per piece
  np.testing.assert_array_equal(D.token_stream(f"prepared:{tmp_path / 'p'}", cfg.data, tok),
                                D.token_stream(spec, cfg.data, tok))


def test_byte_ranges_partition_a_jsonl_file(corpus):
  src, _ = corpus
  cfg = _cfg(str(src), src.parent)
  f = src / "a.jsonl"
  size = f.stat().st_size
  for step in (13, 97, 4096, size):  # any cut, even inside a line or a UTF-8 sequence
    got = [d for lo in range(0, size, step)
           for d in D.iter_file_documents(f, cfg.data, lo, min(size, lo + step))]
    assert got == D.read_documents(str(f), cfg.data)


def test_same_bytes_for_one_process_and_after_sigkill(corpus, prepared, tmp_path):
  src, _ = corpus
  one = tmp_path / "one"
  P.prepare(_cfg(str(src), src.parent), one, workers=1, piece_bytes=PIECE, progress=False)
  want = _shard_bytes(prepared)
  assert _shard_bytes(one) == want
  assert (one / "manifest.json").read_text() == (prepared / "manifest.json").read_text()

  killed = tmp_path / "killed"
  cmd = [sys.executable, "-m", "calm.prepare", "--config", str(ROOT / "configs" / "tiny.yaml"),
         "--out", str(killed), "--source", str(src), "--workers", "1", "--piece-mb",
         str(PIECE / (1 << 20)), *(f"{k}={v}" for k, v in {
             "data.tokenizer": src.parent / "tokenizer.json", "model.vocab_size": 300}.items())]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while len(list(killed.glob("shard-*.bin"))) < 3 and proc.poll() is None:
      assert time.time() < deadline, "prepare made no shards"
      time.sleep(0.02)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes
    proc.wait()
  assert not (killed / "manifest.json").exists()
  (killed / ".shard-00019.bin.tmp1").write_bytes(b"\x01" * 7)  # as a kill mid-write leaves
  with pytest.raises(DataError, match="no manifest.json"):
    shards.PreparedTokens(killed)
  done_before = {p.name: p.stat().st_mtime_ns for p in killed.glob("shard-*.bin")}
  r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert _shard_bytes(killed) == want
  assert not list(killed.glob(".shard-*"))
  kept = {p.name: p.stat().st_mtime_ns for p in killed.glob("shard-*.bin")}
  assert all(kept[k] == v for k, v in done_before.items())  # finished shards were not redone


def test_training_batches_match_the_raw_source(corpus, prepared):
  src, tok = corpus
  raw_cfg = _cfg(str(src), src.parent)
  prep_cfg = _cfg(f"prepared:{prepared}", src.parent)
  a = D.make_train_iterator(raw_cfg, tok, None, prefetch=0)
  b = D.make_train_iterator(prep_cfg, tok, None, prefetch=0)
  n_blocks = D.token_stream(str(src), raw_cfg.data, tok).shape[0] // 32
  for _ in range(n_blocks // 8 + 3):  # past the end of the first epoch
    np.testing.assert_array_equal(next(a), next(b))
  assert b.get_state() == a.get_state()


class _Recording(shards.TokenBlocks):
  read: list

  def rows(self, idx):
    self.read.extend(int(i) for i in np.asarray(idx).reshape(-1))
    return super().rows(idx)


def test_each_process_reads_only_its_rows(corpus, prepared):
  src, tok = corpus
  tokens = D.open_prepared(str(prepared), tok)
  whole = D.TrainIterator(shards.TokenBlocks(tokens, 32), global_batch=8, seed=3, prefetch=0)
  batches = [next(whole) for _ in range(4)]
  seen = []
  for p in range(2):
    blocks = _Recording(tokens, 32)
    blocks.read = []
    it = D.TrainIterator(blocks, global_batch=8, seed=3, process_index=p, process_count=2,
                         prefetch=0)
    for b in batches:
      np.testing.assert_array_equal(next(it), b[4 * p:4 * (p + 1)])
    assert len(blocks.read) == 4 * 4  # its 4 rows of each of 4 batches, nothing else
    seen.append(set(blocks.read))
  assert not seen[0] & seen[1]


def test_resume_exactly_after_sigkill(corpus, prepared, tmp_path):
  """A process takes 5 batches, saves the iterator state, is killed; a new one resumes."""
  src, tok = corpus
  cfg = _cfg(f"prepared:{prepared}", src.parent)
  straight = D.make_train_iterator(cfg, tok, None, prefetch=0)
  want = [next(straight) for _ in range(9)]
  state = tmp_path / "state.json"
  script = (
      "import json, os, signal, pathlib\n"
      "from calm import config, data, run\n"
      f"cfg = config.replace(config.Config(), **{json.dumps(dict(_flat(cfg)))})\n"
      "tok = run.get_tokenizer(cfg, '.', train_if_missing=False)\n"
      "it = data.make_train_iterator(cfg, tok, None)\n"
      "for _ in range(5): next(it)\n"
      f"pathlib.Path({str(state)!r}).write_text(json.dumps(it.get_state()))\n"
      "os.kill(os.getpid(), signal.SIGKILL)\n")
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == -9, r.stderr[-2000:]
  resumed = D.make_train_iterator(cfg, tok, None, prefetch=0)
  resumed.set_state(json.loads(state.read_text()))
  for b in want[5:]:
    np.testing.assert_array_equal(next(resumed), b)


def _flat(cfg: config.Config):
  return [(f"data.{k}", getattr(cfg.data, k)) for k in ("train", "tokenizer", "block_tokens")] + [
      ("model.vocab_size", 300), ("model.chunk_size", 4), ("train.batch_size", 8)]


def test_bad_prepared_data_is_a_one_line_error(corpus, prepared, tmp_path):
  src, tok = corpus

  def err(spec, tokenizer=tok) -> str:
    with pytest.raises(DataError) as e:
      D.make_train_iterator(_cfg(spec, src.parent), tokenizer, None, prefetch=0)
    assert "\n" not in str(e.value)
    return str(e.value)

  assert "no manifest.json" in err(f"prepared:{tmp_path}")
  assert "not found" in err(f"prepared:{tmp_path / 'nope'}")
  copy = tmp_path / "copy"
  copy.mkdir()
  for p in prepared.iterdir():
    (copy / p.name).write_bytes(p.read_bytes())
  other = train_tokenizer(["some other text entirely"] * 20, 280)
  assert "prepared with tokenizer" in err(str(copy), other)
  shard = copy / "shard-00003.bin"
  shard.write_bytes(shard.read_bytes()[:-10])
  assert "shard-00003.bin: " in err(str(copy)) and "truncated" in err(str(copy))
  # The command line reports bad input in one line, without a traceback.
  r = subprocess.run([sys.executable, "-m", "calm.prepare", "--config",
                      str(ROOT / "configs" / "tiny.yaml"), "--out", str(tmp_path / "o"),
                      "--source", str(tmp_path / "missing.jsonl"),
                      f"data.tokenizer={src.parent / 'tokenizer.json'}", "model.vocab_size=300"],
                     cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- check, then write


def _snapshot(root: pathlib.Path) -> dict[str, bytes]:
  """Every file under `root` (hidden ones too) → its bytes."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _prepare_cli(args, capsys) -> tuple[int, str]:
  from calm.cli import preparation
  from calm.errors import cli

  code = cli(preparation.main)(["--config", str(ROOT / "configs" / "tiny.yaml"), *args,
                                "model.vocab_size=300"])
  return code, capsys.readouterr().err.strip()


def test_refused_prepare_leaves_the_directory_byte_identical(corpus, tmp_path):
  """Another source with another tokenizer into a prepared directory: refused, nothing changed
  (the tokenizer.json was once overwritten before the refusal)."""
  src, _ = corpus
  out = tmp_path / "p1"
  P.prepare(_cfg(str(src / "c.txt"), src.parent), out, workers=1, progress=False)
  other = train_tokenizer(["some other text entirely, with other words"] * 20, 280)
  other.save(tmp_path / "other.json")
  before = _snapshot(out)
  for tokenizer in (str(tmp_path / "other.json"), ""):  # given, or trained on the source
    cfg = _cfg(str(src / "a.jsonl"), src.parent, **{"data.tokenizer": tokenizer})
    with pytest.raises(DataError, match="another source"):
      P.prepare(cfg, out, workers=1, progress=False)
    assert _snapshot(out) == before


def test_relative_source_from_another_directory_is_another_source(corpus, tmp_path,
                                                                  monkeypatch):
  """The same relative --source from another working directory names another corpus."""
  src, _ = corpus
  for w, text in (("w1", "first corpus words"), ("w2", "second corpus, other words")):
    (tmp_path / w / "src").mkdir(parents=True)
    for name in ("a.txt", "b.txt"):
      (tmp_path / w / "src" / name).write_text(f"{text} {name}\n\nmore {text}")
  out = tmp_path / "out"
  monkeypatch.chdir(tmp_path / "w1")
  P.prepare(_cfg("src", src.parent), out, workers=1, progress=False)
  (out / "shard-00001.bin").unlink()  # as an interrupted preparation leaves it
  (out / "manifest.json").unlink()
  before = _snapshot(out)
  monkeypatch.chdir(tmp_path / "w2")
  with pytest.raises(DataError, match="another source"):
    P.prepare(_cfg("src/", src.parent), out, workers=1, progress=False)
  assert _snapshot(out) == before
  monkeypatch.chdir(tmp_path / "w1")  # the same corpus resumes
  m = P.prepare(_cfg("src/", src.parent), out, workers=1, progress=False)
  assert m["source"] == str(tmp_path / "w1" / "src") and m["documents"] == 4


def test_shards_without_a_plan_are_refused_unless_forced(corpus, prepared, tmp_path):
  src, _ = corpus
  out = tmp_path / "old"
  out.mkdir()
  for p in prepared.glob("shard-*.bin"):
    (out / p.name).write_bytes(p.read_bytes()[:-2])  # shards of unknown origin
  before = _snapshot(out)
  cfg = _cfg(str(src), src.parent)
  with pytest.raises(DataError, match="no plan.json") as e:
    P.prepare(cfg, out, workers=2, piece_bytes=PIECE, progress=False)
  assert "\n" not in str(e.value) and "--force" in str(e.value)
  assert _snapshot(out) == before
  P.prepare(cfg, out, workers=2, piece_bytes=PIECE, progress=False, force=True)
  assert _shard_bytes(out) == _shard_bytes(prepared)


def test_force_replaces_another_preparation(corpus, tmp_path):
  src, tok = corpus
  out = tmp_path / "p"
  P.prepare(_cfg(str(src / "c.txt"), src.parent), out, workers=1, progress=False)
  cfg = _cfg(str(src / "b.jsonl.gz"), src.parent)
  m = P.prepare(cfg, out, workers=1, progress=False, force=True)
  assert m["documents"] == 50 and len(list(out.glob("shard-*.bin"))) == 1
  np.testing.assert_array_equal(D.token_stream(f"prepared:{out}", cfg.data, tok),
                                D.token_stream(str(src / "b.jsonl.gz"), cfg.data, tok))


def test_a_failed_prepare_does_not_block_a_rerun(corpus, tmp_path):
  src, _ = corpus
  blank = tmp_path / "blank.txt"
  blank.write_text("\n\n  \n")
  out = tmp_path / "p"
  with pytest.raises(DataError, match="no documents"):
    P.prepare(_cfg(str(blank), src.parent), out, workers=1, progress=False)
  assert not out.exists()
  out.mkdir()
  with pytest.raises(DataError, match="no documents"):
    P.prepare(_cfg(str(blank), src.parent), out, workers=1, progress=False)
  assert _snapshot(out) == {}
  m = P.prepare(_cfg(str(src / "c.txt"), src.parent), out, workers=1, progress=False)
  assert m["documents"] == 50


def test_bad_out_and_piece_size_are_one_line_errors(corpus, tmp_path, monkeypatch, capsys):
  src, _ = corpus
  tok = f"data.tokenizer={src.parent / 'tokenizer.json'}"
  monkeypatch.chdir(tmp_path)
  a_file = tmp_path / "a-file"
  a_file.write_text("keep me")
  cases = [(["--out", ""], "--out"), (["--out", " "], "--out"),
           (["--out", str(a_file)], "not a directory"),
           (["--out", str(a_file / "sub")], "not a directory")]
  cases += [(["--out", "o", "--piece-mb", v], "--piece-mb") for v in ("0", "-1", "nan", "inf",
                                                                      "1e-9")]
  for args, want in cases:
    code, err = _prepare_cli([*args, "--source", str(src / "c.txt"), tok], capsys)
    assert code == 2 and err.startswith("error: ") and want in err and "\n" not in err, (args, err)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written anywhere
  assert a_file.read_text() == "keep me"


def test_memory_does_not_grow_with_a_documents_length(corpus, tmp_path):
  """A text without paragraph breaks takes at most twice the memory of the same text in
  paragraphs (the tokenizer once held a whole document's encoding at once)."""
  src, _ = corpus
  words = (DEMO_DATA / "train" / "pg35.txt").read_text().split()
  rng = random.Random(1)
  paragraphs = [" ".join(rng.choices(words, k=100)) for _ in range(12_000)]  # ~7 MB
  (tmp_path / "paragraphs.txt").write_text("\n\n".join(paragraphs))
  (tmp_path / "line.txt").write_text(" ".join(paragraphs))
  peak = {}
  for name in ("paragraphs", "line"):
    cmd = [sys.executable, "-m", "calm.prepare", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--out", str(tmp_path / f"out-{name}"), "--source", str(tmp_path / f"{name}.txt"),
           "--workers", "1", f"data.tokenizer={src.parent / 'tokenizer.json'}",
           "model.vocab_size=300"]
    script = ("import resource, subprocess, sys\n"
              f"r = subprocess.run({cmd!r}, capture_output=True, text=True)\n"
              "sys.stderr.write(r.stderr)\n"
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
              "sys.exit(r.returncode)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    peak[name] = int(r.stdout.split()[-1])
  assert peak["line"] <= 2 * peak["paragraphs"], peak


def test_a_long_document_is_encoded_in_pieces_with_the_same_ids(corpus, monkeypatch):
  src, tok = corpus
  words = (DEMO_DATA / "train" / "pg35.txt").read_text().split()
  rng = random.Random(2)
  seps = [" ", "  ", "\n", " \n ", "\t", ", ", "   "]
  docs = ["short one", "".join(w + rng.choice(seps) for w in rng.choices(words, k=3000)),
          "x" * 5000, "another short one"]
  monkeypatch.setattr(D, "_PIECE_CHARS", 300)
  assert len(list(D._pieces(docs[1], 300))) > 20
  got = [ids for ids, _ in D.encode_stream(docs, tok)]
  assert len(got) == 4  # the long documents alone, the short ones in batches
  flat, n = np.concatenate(got), np.concatenate([n for _, n in D.encode_stream(docs, tok)])
  want = [np.asarray(tok.encode(d) + [tok.eos_id]) for d in docs[:2]]
  np.testing.assert_array_equal(flat[:n[:2].sum()], np.concatenate(want))
  assert n.tolist()[:2] == [len(w) for w in want] and flat.shape[0] == n.sum()
