"""Byte-level BPE: exact round trips, special ids, save/load, loading foreign tokenizers."""

import json
import pathlib

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from calm import config
from calm.run import get_tokenizer
from calm.errors import CalmError, ConfigError, DataError
from calm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer


def _paragraphs(path: pathlib.Path, limit: int) -> list[str]:
  return [p for p in path.read_text()[:limit].split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def tok(request) -> Tokenizer:
  demo = pathlib.Path(request.config.rootpath) / "data" / "gutenberg-slice"
  texts = _paragraphs(demo / "train" / "pg35.txt", 200_000)
  return train_tokenizer(texts, 400)


def test_special_ids_and_vocab(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == 400
  assert [tok.raw.id_to_token(i) for i in range(3)] == ["<pad>", "<bos>", "<eos>"]


def test_round_trip_on_held_out_book(tok, demo_data):
  text = (demo_data / "heldout" / "pg11.txt").read_text()[:60_000]
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert min(ids) >= 3 and max(ids) < tok.vocab_size  # real text never yields control ids
  assert len(ids) < len(text.encode())  # merges were learned: fewer tokens than bytes


def test_round_trip_odd_text_and_literal_specials(tok):
  text = "  “Naïve” café — 日本語 🙂\ttabs\r\nCRLF\n\n\n<eos> and <pad> are just text"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.eos_id not in ids and tok.pad_id not in ids
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text
  assert tok.decode([tok.eos_id], skip_special_tokens=False) == "<eos>"


def test_encode_batch_matches_encode(tok):
  texts = ["The Time Traveller", "", "smiled.\nAre you sure?", "x" * 50]
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_save_load_round_trip(tok, tmp_path):
  path = tmp_path / "sub" / "tokenizer.json"
  tok.save(path)
  loaded = load_tokenizer(path)
  assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (0, 1, 2, 400)
  text = "It was the best of times, it was the worst of times."
  assert loaded.encode(text) == tok.encode(text)
  assert loaded.fingerprint == tok.fingerprint
  assert load_tokenizer(tmp_path / "sub").vocab_size == 400  # a directory works too


def test_train_is_deterministic(demo_data):
  texts = _paragraphs(demo_data / "train" / "pg41.txt", 60_000)
  a, b = train_tokenizer(texts, 300), train_tokenizer(texts, 300)
  assert a.fingerprint == b.fingerprint


def test_vocab_below_byte_alphabet_is_an_error():
  with pytest.raises(ConfigError, match="at least 259"):
    train_tokenizer(["abc"], 100)


def _word_level(tmp_path: pathlib.Path, words: list[str], specials: list[str]) -> pathlib.Path:
  vocab = {w: i for i, w in enumerate(words)}
  t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=words[0]))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  t.add_special_tokens(specials)
  path = tmp_path / "tokenizer.json"
  t.save(str(path))
  return path


def test_load_foreign_tokenizer_finds_specials_by_name(tmp_path):
  path = _word_level(tmp_path, ["!", "hello", "world"], ["<|begin_of_text|>", "<|end_of_text|>"])
  t = load_tokenizer(path)
  assert t.bos_id == t.raw.token_to_id("<|begin_of_text|>") == 3
  assert t.eos_id == t.raw.token_to_id("<|end_of_text|>") == 4
  assert t.pad_id == t.eos_id  # no pad token: falls back to EOS
  assert t.encode("hello world") == [1, 2]


def test_load_foreign_tokenizer_uses_tokenizer_config(tmp_path):
  path = _word_level(tmp_path, ["a", "b"], ["<|end_of_text|>", "<|eot_id|>"])
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"eos_token": {"content": "<|eot_id|>"}}))
  assert load_tokenizer(path).eos_id == 3


def test_load_errors_are_one_line(tmp_path):
  with pytest.raises(DataError, match="not found") as e:
    load_tokenizer(tmp_path / "missing.json")
  assert "\n" not in str(e.value)
  bad = tmp_path / "bad.json"
  bad.write_text('{"version": "1.0", "model": ')
  with pytest.raises(DataError, match="not a valid tokenizer.json") as e:
    load_tokenizer(bad)
  assert "\n" not in str(e.value)
  no_eos = _word_level(tmp_path, ["a", "b"], [])
  with pytest.raises(CalmError, match="no end-of-sequence token"):
    load_tokenizer(no_eos)


def _cfg(**kw) -> config.Config:
  base = {"model.vocab_size": 300, "data.tokenizer_train_bytes": 50_000, "data.block_tokens": 64}
  return config.replace(config.Config(), **{**base, **kw})


def test_get_tokenizer_trains_once_then_reuses(tmp_path, demo_data):
  cfg = _cfg(**{"data.train": str(demo_data / "train" / "pg41.txt")})
  run = tmp_path / "run"
  with pytest.raises(DataError, match="no tokenizer"):
    get_tokenizer(cfg, run, train_if_missing=False)
  first = get_tokenizer(cfg, run)
  assert (run / "tokenizer.json").is_file() and first.vocab_size == 300
  # A different training source is ignored once run/tokenizer.json exists.
  cfg2 = _cfg(**{"data.train": str(demo_data / "train" / "pg35.txt")})
  assert get_tokenizer(cfg2, run).fingerprint == first.fingerprint


def test_tokenizer_sample_streams_an_evenly_strided_sample():
  """The BPE training sample is read in two streamed passes, never as a list of the corpus."""
  from calm.run import _sample_texts
  passes = []

  def docs():
    passes.append(0)
    return (f"doc{i:03d}" for i in range(100))  # 6 characters each, 600 in all

  assert _sample_texts(docs, 60) == [f"doc{i:03d}" for i in range(0, 100, 10)]
  assert len(passes) == 2
  assert _sample_texts(docs, 10_000) == [f"doc{i:03d}" for i in range(100)]
  assert _sample_texts(lambda: iter(["x" * 50]), 8) == ["x" * 8]  # one long document: cut


def test_get_tokenizer_explicit_path_and_vocab_check(tmp_path, tok):
  tok.save(tmp_path / "tok.json")
  cfg = _cfg(**{"data.tokenizer": str(tmp_path / "tok.json"), "model.vocab_size": 512})
  assert get_tokenizer(cfg, tmp_path / "run").fingerprint == tok.fingerprint
  assert not (tmp_path / "run" / "tokenizer.json").exists()
  small = _cfg(**{"data.tokenizer": str(tmp_path / "tok.json"), "model.vocab_size": 399})
  with pytest.raises(ConfigError, match="400 tokens.*vocab_size is 399"):
    get_tokenizer(small, tmp_path / "run")
