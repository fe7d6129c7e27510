"""Sources, EOS-separated packing, deterministic/resumable Grain batches, one-line data errors."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from calm import config
from calm import data as D
from calm.errors import ConfigError, DataError
from calm.tokenizer import Tokenizer, train_tokenizer

from conftest import ROOT, TFDS_DOCS, subprocess_env

K = 4
DOCS = TFDS_DOCS


@pytest.fixture(scope="module")
def tok(request) -> Tokenizer:
  demo = pathlib.Path(request.config.rootpath) / "data" / "gutenberg-slice"
  text = (demo / "train" / "pg35.txt").read_text()[:150_000]
  return train_tokenizer([p for p in text.split("\n\n") if p.strip()], 300)


def _cfg(train: str, **kw) -> config.Config:
  base = {"data.train": train, "model.vocab_size": 300, "model.chunk_size": K,
          "data.block_tokens": 16, "train.batch_size": 4}
  return config.replace(config.Config(), **{**base, **kw})


def _check_stream(tokens: np.ndarray, docs: list[str], tok: Tokenizer) -> None:
  """The stream is exactly encode(doc) + [EOS] for every document, and EOS only at ends."""
  expect = np.concatenate([np.array(tok.encode(d) + [tok.eos_id], np.int32) for d in docs])
  np.testing.assert_array_equal(tokens, expect)
  ends = np.cumsum([len(tok.encode(d)) + 1 for d in docs]) - 1
  np.testing.assert_array_equal(np.flatnonzero(tokens == tok.eos_id), ends)


def _check_blocks(blocks: np.ndarray, tokens: np.ndarray, block_tokens: int) -> None:
  assert blocks.dtype == np.int32 and blocks.shape[1] == block_tokens and block_tokens % K == 0
  assert blocks.shape[0] == tokens.shape[0] // block_tokens
  np.testing.assert_array_equal(blocks.reshape(-1), tokens[:blocks.size])


# ----------------------------------------------------------------------------- sources


def test_txt_source_blocks_have_eos_at_document_ends(tmp_path, tok):
  (tmp_path / "a.txt").write_text("\n\n".join(DOCS[:7]) + "\n\n\n\n")
  (tmp_path / "b.txt").write_text("\r\n\r\n".join(DOCS[7:]))  # CRLF files split the same way
  (tmp_path / "notes.md").write_text("ignored: not a text source suffix")
  cfg = _cfg(str(tmp_path))
  docs = D.read_documents(str(tmp_path), cfg.data)
  assert docs == DOCS
  tokens = D.token_stream(str(tmp_path), cfg.data, tok)
  _check_stream(tokens, DOCS, tok)
  blocks = D.eval_blocks(cfg, tok, None, str(tmp_path))
  _check_blocks(blocks, tokens, 16)


def test_jsonl_source_and_glob(tmp_path, tok):
  for name, docs in (("x.jsonl", DOCS[:8]), ("y.json", DOCS[8:])):
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    (tmp_path / name).write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")
  cfg = _cfg(str(tmp_path / "*.js*"))
  assert D.read_documents(str(tmp_path / "*.js*"), cfg.data) == DOCS
  docs = D.tokenized_documents(str(tmp_path / "*.js*"), cfg.data, tok)
  assert [d.tolist() for d in docs] == [tok.encode(d) + [tok.eos_id] for d in DOCS]
  tokens = D.token_stream(str(tmp_path / "*.js*"), cfg.data, tok)
  _check_stream(tokens, DOCS, tok)
  _check_blocks(D.pack_blocks(tokens, 32), tokens, 32)


def test_existing_path_with_glob_characters_is_literal(tmp_path):
  p = tmp_path / "notes [draft].txt"
  p.write_text("one\n\ntwo")
  assert D.read_documents(str(p), _cfg(str(p)).data) == ["one", "two"]


def test_json_array_and_custom_text_field(tmp_path):
  (tmp_path / "arr.json").write_text(json.dumps([{"body": "one"}, {"body": " "}, {"body": "two"}]))
  cfg = _cfg(str(tmp_path / "arr.json"), **{"data.text_field": "body"})
  assert D.read_documents(str(tmp_path / "arr.json"), cfg.data) == ["one", "two"]


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
  p = tmp_path / "u.jsonl"
  p.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n")
  assert D.read_documents(str(p), _cfg(str(p)).data) == ["a\u2028b"]


@pytest.mark.parametrize("spec,want", [
    ("tfds:lm1b", ("lm1b", "train")),
    ("tfds:c4/en:3.0.1:validation", ("c4/en:3.0.1", "validation")),
    ("tfds:mnist:3.0.1", ("mnist:3.0.1", "train")),
    ("tfds:wiki:train[:10%]", ("wiki", "train[:10%]")),
])
def test_tfds_spec_parsing(spec, want):
  assert D._parse_tfds(spec) == want


def test_wikitext_jsonl_reads(shared_data):
  path = shared_data / "wikitext103-test" / "wikitext_document_level-test.json"
  docs = D.read_documents(str(path), _cfg(str(path)).data)
  assert len(docs) == 62 and docs[0].startswith(" = Robert Boulter = ")


def test_tfds_source_without_tensorflow(tmp_path, tok, tfds_dir):
  cfg = _cfg("tfds:calm_tiny_text", **{"data.tfds_data_dir": str(tfds_dir)})
  docs = D.read_documents("tfds:calm_tiny_text", cfg.data)  # default split: train
  assert sorted(docs) == sorted(DOCS)  # tfds stores records in its own (fixed) order
  assert D.read_documents("tfds:calm_tiny_text", cfg.data) == docs
  assert sorted(D.read_documents("tfds:calm_tiny_text:test", cfg.data)) == sorted(DOCS[:2])
  tokens = D.token_stream("tfds:calm_tiny_text", cfg.data, tok, tmp_path / "run")
  _check_stream(tokens, docs, tok)
  _check_blocks(D.pack_blocks(tokens, 16), tokens, 16)
  it = D.make_train_iterator(cfg, tok, tmp_path / "run", prefetch=0)
  assert next(it).shape == (4, 16)
  assert "tensorflow" not in sys.modules
  with pytest.raises(DataError, match="no 'body' feature"):
    D.read_documents("tfds:calm_tiny_text", config.replace(cfg.data, text_field="body"))
  with pytest.raises(DataError, match="tfds:no_such_dataset_xyz:train: cannot open") as e:
    D.read_documents("tfds:no_such_dataset_xyz", cfg.data)
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- errors


def _err(spec, cfg=None) -> str:
  cfg = cfg or _cfg(str(spec))
  with pytest.raises(DataError) as e:
    D.read_documents(str(spec), cfg.data)
  msg = str(e.value)
  assert "\n" not in msg and "Traceback" not in msg
  return msg


def test_missing_empty_and_blank_sources(tmp_path):
  assert "not found" in _err(tmp_path / "nope.txt")
  (tmp_path / "empty.txt").write_bytes(b"")
  assert _err(tmp_path / "empty.txt") == f"{tmp_path / 'empty.txt'}: empty file"
  (tmp_path / "blank.txt").write_text("\n\n  \n\n")
  assert "no documents" in _err(tmp_path / "blank.txt")
  assert "no files match" in _err(tmp_path / "*.parquet")
  (tmp_path / "d" / "train").mkdir(parents=True)
  assert "subdirectories: train" in _err(tmp_path / "d")


def test_non_utf8_names_file_and_offset(tmp_path):
  p = tmp_path / "latin1.txt"
  p.write_bytes("café au lait\n\n".encode() + "naïve".encode("latin-1"))
  assert _err(p) == f"{p}: not valid UTF-8 at byte offset 17 (byte 0xef)"


def test_unreadable_file(tmp_path, monkeypatch):
  p = tmp_path / "secret.txt"
  p.write_text("hidden")
  p.chmod(0)
  try:
    if os.geteuid() == 0:  # root reads anything: simulate the permission failure
      real_open = open

      def fake_open(path, *a, **kw):
        if pathlib.Path(path) == p:
          raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

      monkeypatch.setattr(D, "open", fake_open, raising=False)
    assert _err(p) == f"{p}: permission denied"
  finally:
    p.chmod(0o644)


def test_bad_json_line_and_missing_field(tmp_path):
  p = tmp_path / "bad.jsonl"
  p.write_text('{"text": "ok"}\n{"text": "oops"\n')
  assert _err(p).startswith(f"{p}:2: invalid JSON")
  p.write_text('{"text": "ok"}\n\n{"content": "x", "id": 3}\n')
  assert _err(p) == f"{p}:3: no 'text' field (keys: content, id); set data.text_field"
  p.write_text('{"text": 5}\n')
  assert "is int, not a string" in _err(p)


def test_too_little_data_for_one_block(tmp_path, tok):
  (tmp_path / "short.txt").write_text("tiny")
  cfg = _cfg(str(tmp_path / "short.txt"), **{"data.block_tokens": 64})
  with pytest.raises(DataError, match="fewer than one block"):
    D.make_train_iterator(cfg, tok, None)


# ----------------------------------------------------------------------------- cache


def test_token_cache_is_reused_and_invalidated(tmp_path, tok):
  src = tmp_path / "c.txt"
  src.write_text("\n\n".join(DOCS))
  cfg = _cfg(str(src))
  run = tmp_path / "run"
  first = D.token_stream(str(src), cfg.data, tok, run)
  cached = list(run.glob("tokens-*.npy"))
  assert len(cached) == 1
  again = D.token_stream(str(src), cfg.data, tok, run)
  assert isinstance(again, np.memmap)  # served from the cache, not re-tokenised
  np.testing.assert_array_equal(again, first)
  src.write_text("\n\n".join(DOCS[:3]))
  os.utime(src, ns=(0, 123))  # a changed file gets a new key
  changed = D.token_stream(str(src), cfg.data, tok, run)
  _check_stream(np.asarray(changed), DOCS[:3], tok)
  assert len(list(run.glob("tokens-*.npy"))) == 2
  (tmp_path / "afile").write_text("")  # an unusable cache directory only costs the cache
  np.testing.assert_array_equal(D.token_stream(str(src), cfg.data, tok, tmp_path / "afile" / "x"),
                                changed)


# ----------------------------------------------------------------------------- iterator


def _labelled_blocks(n: int, t: int = 8) -> np.ndarray:
  """Block i is filled with value i, so rows identify blocks."""
  return np.repeat(np.arange(n, dtype=np.int32)[:, None], t, axis=1)


def _take(it, n: int) -> list[np.ndarray]:
  return [next(it) for _ in range(n)]


def test_epoch_is_a_permutation_and_epochs_differ():
  blocks = _labelled_blocks(24)
  it = D.TrainIterator(blocks, global_batch=4, seed=7, prefetch=0)
  e1 = np.concatenate(_take(it, 6))[:, 0]
  e2 = np.concatenate(_take(it, 6))[:, 0]
  assert sorted(e1) == list(range(24)) and sorted(e2) == list(range(24))
  assert not np.array_equal(e1, e2) and not np.array_equal(e1, np.arange(24))
  seq = D.TrainIterator(blocks, global_batch=4, seed=7, shuffle=False, prefetch=0)
  np.testing.assert_array_equal(np.concatenate(_take(seq, 7))[:, 0], np.arange(28) % 24)


def test_same_seed_same_batches_different_seed_different(tmp_path, tok):
  (tmp_path / "t.txt").write_text("\n\n".join(DOCS * 4))
  cfg = _cfg(str(tmp_path / "t.txt"))
  a = _take(D.make_train_iterator(cfg, tok, tmp_path / "r"), 5)
  b = _take(D.make_train_iterator(cfg, tok, tmp_path / "r"), 5)
  c = _take(D.make_train_iterator(config.replace(cfg, **{"data.seed": 1}), tok, tmp_path / "r"), 5)
  assert all(x.shape == (4, 16) and x.dtype == np.int32 for x in a)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_state_round_trip_gives_identical_next_batches(prefetch):
  blocks = _labelled_blocks(37)
  it = D.TrainIterator(blocks, global_batch=6, seed=3, prefetch=prefetch)
  _take(it, 9)  # crosses an epoch boundary (37 blocks / 6 per batch)
  state = json.loads(json.dumps(it.get_state()))  # as written to a checkpoint
  want = _take(it, 8)
  fresh = D.TrainIterator(blocks, global_batch=6, seed=3, prefetch=prefetch)
  fresh.set_state(state)
  assert all(np.array_equal(x, y) for x, y in zip(_take(fresh, 8), want))


def test_state_round_trip_in_a_fresh_process(tmp_path):
  blocks = _labelled_blocks(29)
  np.save(tmp_path / "blocks.npy", blocks)
  it = D.TrainIterator(blocks, global_batch=4, seed=11)
  _take(it, 5)
  (tmp_path / "state.json").write_text(json.dumps(it.get_state()))
  np.save(tmp_path / "want.npy", np.stack(_take(it, 10)))
  code = (
      "import json, sys, numpy as np\n"
      "from calm.data import TrainIterator\n"
      "d = sys.argv[1]\n"
      "it = TrainIterator(np.load(d + '/blocks.npy'), global_batch=4, seed=11)\n"
      "it.set_state(json.load(open(d + '/state.json')))\n"
      "np.save(d + '/got.npy', np.stack([next(it) for _ in range(10)]))\n")
  subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=subprocess_env(),
                 cwd=ROOT, timeout=120)
  np.testing.assert_array_equal(np.load(tmp_path / "got.npy"), np.load(tmp_path / "want.npy"))


def test_grain_checkpoint_handler_round_trip(tmp_path):
  import grain

  blocks = _labelled_blocks(19)
  it = D.TrainIterator(blocks, global_batch=2, seed=5)
  _take(it, 4)
  (tmp_path / "ckpt").mkdir()
  grain.checkpoint.CheckpointHandler().save(tmp_path / "ckpt", item=it)
  want = _take(it, 5)
  fresh = D.TrainIterator(blocks, global_batch=2, seed=5)
  grain.checkpoint.CheckpointHandler().restore(tmp_path / "ckpt", item=fresh)
  assert all(np.array_equal(x, y) for x, y in zip(_take(fresh, 5), want))


def test_restore_rejects_a_different_stream():
  it = D.TrainIterator(_labelled_blocks(20), global_batch=4, seed=0, prefetch=0)
  state = it.get_state()
  other = D.TrainIterator(_labelled_blocks(21), global_batch=4, seed=0, prefetch=0)
  with pytest.raises(DataError, match="num_blocks=20.*num_blocks=21"):
    other.set_state(state)
  with pytest.raises(DataError, match="seed=0.*seed=1"):
    D.TrainIterator(_labelled_blocks(20), global_batch=4, seed=1, prefetch=0).set_state(state)


def test_changed_global_batch_resumes_at_the_same_block():
  blocks = _labelled_blocks(40)
  it = D.TrainIterator(blocks, global_batch=4, seed=9, prefetch=0)
  _take(it, 3)  # 12 blocks consumed
  state = it.get_state()
  rest = np.concatenate(_take(it, 6))[:, 0]  # the next 24 blocks of the stream
  big = D.TrainIterator(blocks, global_batch=6, seed=9, prefetch=0)
  big.set_state(state)
  np.testing.assert_array_equal(np.concatenate(_take(big, 4))[:, 0], rest)


def test_process_shards_tile_the_global_batch_and_share_state():
  blocks = _labelled_blocks(30)
  whole = D.TrainIterator(blocks, global_batch=6, seed=2, prefetch=0)
  parts = [D.TrainIterator(blocks, global_batch=6, seed=2, process_index=p, process_count=3,
                           prefetch=0) for p in range(3)]
  for _ in range(7):
    local = [next(p) for p in parts]
    assert all(x.shape == (2, 8) for x in local)
    np.testing.assert_array_equal(np.concatenate(local), next(whole))
  # A state saved with 3 processes resumes the same global stream on 2.
  state = parts[0].get_state()
  assert all(p.get_state() == state for p in parts)
  two = [D.TrainIterator(blocks, global_batch=6, seed=2, process_index=p, process_count=2,
                         prefetch=0) for p in range(2)]
  for p in two:
    p.set_state(state)
  for _ in range(4):
    np.testing.assert_array_equal(np.concatenate([next(p) for p in two]), next(whole))
  with pytest.raises(ConfigError, match="not divisible by the 4 processes"):
    D.TrainIterator(blocks, global_batch=6, seed=2, process_index=0, process_count=4)


def test_to_global_makes_a_sharded_batch():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  local = _labelled_blocks(16)
  arr = D.to_global(local, NamedSharding(mesh, P("data")))
  assert arr.shape == (16, 8) and arr.dtype == np.int32
  assert len(arr.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(arr), local)


def test_demo_slice_end_to_end(tmp_path, tok, demo_data):
  cfg = _cfg(str(demo_data / "heldout" / "pg11.txt"), **{"data.block_tokens": 64})
  blocks = D.eval_blocks(cfg, tok, tmp_path, cfg.data.train)
  first_eos = int(np.flatnonzero(blocks[0] == tok.eos_id)[0])
  assert tok.decode(blocks[0][:first_eos]) == "ALICE’S ADVENTURES IN WONDERLAND"
  batch = next(D.make_train_iterator(cfg, tok, tmp_path))
  assert batch.shape == (4, 64) and batch.max() < tok.vocab_size
