"""The Python front door: `calm.open` → generate / stream / score / encode / decode, and the rule
that only the stage and head registries know stage and head names."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import calm
from calm import engine
from calm.cli import evaluation
from calm.errors import CalmError, ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "data" / "gutenberg-slice" / "heldout"

PROMPTS = ["The old man", "It was", "A", "She said that the King of the land had",
           "Once upon a time there", "Why?", "and then, quite suddenly, the door opened and",
           "Th"]


@pytest.fixture(scope="module")
def opened(tiny_runs):
  return {s: calm.open(tiny_runs / s) for s in ("ae", "calm", "ar")}


@pytest.mark.parametrize("stage,settings", [
    ("calm", dict(temperature=1.0)),
    ("calm", dict(temperature=0.5, sampler="batch", num_candidates=16)),
    ("calm", dict(temperature=0.5, sampler="exact", max_attempts=64)),
    ("ar", dict(temperature=0.8, top_p=0.9)),
])
def test_batch_gives_each_prompt_its_own_text(lively, stage, settings):
  """8 prompts of different lengths in one batch == each alone with its seed (seed + i)."""
  r = lively[stage]
  batch = r.generate(PROMPTS, max_new_tokens=12, seed=10, **settings)
  assert isinstance(batch, list) and len(batch) == len(PROMPTS)
  for i, p in enumerate(PROMPTS):
    alone = r.generate(p, max_new_tokens=12, seed=10 + i, **settings)
    assert isinstance(alone, str) and alone == batch[i], (i, p)
  # the seed matters (else the equality above would say nothing)
  other = r.generate(PROMPTS, max_new_tokens=12, seed=99, **settings)
  assert other != batch


@pytest.mark.parametrize("stage", ["calm", "ar"])
def test_stream_yields_the_generated_text(lively, stage):
  r = lively[stage]
  stats: dict = {}
  pieces = list(r.stream("The old man", max_new_tokens=16, seed=3, stats=stats))
  assert "".join(pieces) == r.generate("The old man", max_new_tokens=16, seed=3)
  (c,) = r.complete("The old man", max_new_tokens=16, seed=3)
  assert stats["tokens"] == len(c.token_ids) > 0
  assert c.text == r.tokenizer.decode(c.token_ids)
  assert c.finished == (c.token_ids[-1] == r.tokenizer.eos_id)
  assert ("mean_draws" in c.stats) == (stage == "calm")


@pytest.mark.parametrize("stage", ["calm", "ar"])
def test_engine_steps_equal_the_loop(lively, stage):
  """prefill + decode_step, step by step, gives the compiled loop's tokens."""
  r = lively[stage]
  eng, eos = r.engine, r.tokenizer.eos_id
  ids = [r.tokenizer.encode(p) for p in PROMPTS[:3]]
  keys = engine.row_keys([5, 6, 7])
  sampler = r.stage.sampler(r.config.sampling)
  g = eng.generate(ids, keys, max_new_tokens=12, sampler=sampler)
  st = eng.prefill(ids, keys, max_new_tokens=12)
  steps = []
  for _ in range(-(-12 // eng.tokens_per_step)):
    st, toks, _ = eng.decode_step(st, sampler)
    steps.append(np.asarray(toks))
  out = np.concatenate(steps, axis=1)
  assert [engine.trim(row, eos)[:12] for row in out] == g.tokens
  assert len(set(map(tuple, g.tokens))) == 3  # the rows differ


def test_score_is_calm_eval(opened, tiny_runs, tmp_path):
  """`Run.score` on a source and on the same documents as texts gives calm-eval's numbers."""
  texts = [p.read_text() for p in sorted(HELDOUT.glob("*.txt"))][:1]
  paras = [t for t in texts[0].split("\n\n") if len(t.split()) > 20][:6]
  src = tmp_path / "docs.jsonl"
  src.write_text("".join(json.dumps({"text": t}) + "\n" for t in paras))
  for stage in ("calm", "ar"):
    out = tmp_path / f"{stage}.json"
    assert evaluation.main(["--config", str(tiny_runs / stage / "config.yaml"), "--out",
                            str(out), f"eval.data={src}"]) == 0
    want = json.loads(out.read_text())
    for report in (opened[stage].score(str(src)), opened[stage].score(paras)):
      assert report.brierlm == pytest.approx(want["brierlm"], abs=1e-9)
      assert list(report.brier) == pytest.approx(want["brier"], abs=1e-9)
      assert report.documents == want["documents"] == len(paras)
      assert report.positions == want["positions"] > 0
      assert (report.energy is not None) == ("energy" in want) == (stage == "calm")
      if report.energy is not None:
        assert report.energy["loss"] == pytest.approx(want["energy"]["loss"], rel=1e-6)


def test_encode_decode_match_the_autoencoder(opened):
  ae_run = opened["ae"]
  ae = ae_run.model
  text = "It was the best of times, it was the worst of times."
  z = ae_run.encode(text)
  ids = ae_run.tokenizer.encode(text)
  K = ae.chunk_size
  assert z.shape == (-(-len(ids) // K), ae.latent_dim) and z.dtype == np.float32
  ids = np.asarray(ids + [ae_run.tokenizer.pad_id] * (-len(ids) % K), np.int32)
  mu, _ = ae.encode(ids.reshape(1, -1, K))
  np.testing.assert_allclose(z, np.asarray(mu[0]), rtol=1e-5, atol=1e-6)
  want = ae_run.tokenizer.decode(np.asarray(ae.decode_ids(mu))[0].reshape(-1).tolist())
  assert ae_run.decode(z) == want
  assert opened["calm"].decode(z) == want  # a CALM run decodes through its autoencoder
  with pytest.raises(CalmError, match="latents must be"):
    ae_run.decode(np.zeros((3, ae.latent_dim + 1)))


def test_attributes_and_errors(opened, tiny_runs):
  r = opened["calm"]
  assert r.step == 3 and r.checkpoint_dir.is_dir() and r.run_dir == tiny_runs / "calm"
  assert r.config.stage == "calm" and r.stage.needs_autoencoder
  assert r.tokenizer.vocab_size <= r.config.model.vocab_size
  assert calm.open(tiny_runs / "calm" / "config.yaml").step == 3
  with pytest.raises(CalmError, match="prompt too long"):
    r.generate("word " * 400, max_new_tokens=16)
  with pytest.raises(CalmError, match="temperature"):
    r.generate("x", temperature=1.5)
  with pytest.raises(ConfigError, match="generation needs a calm or ar run"):
    opened["ae"].generate("x")
  with pytest.raises(ConfigError, match="encode / decode need"):
    opened["ar"].encode("x")
  with pytest.raises(ConfigError, match="no such run"):
    calm.open(tiny_runs / "missing")
  with pytest.raises(CalmError, match="at least one token|non-empty"):
    opened["ae"].encode("")


def test_a_fresh_interpreter_elsewhere(tiny_runs, tmp_path):
  """The notebook example from another directory, in a new process."""
  code = (
      "import calm\n"
      f"r = calm.open({str(tiny_runs / 'calm')!r})\n"
      "out = r.generate(['The old man', 'It was'], max_new_tokens=8, temperature=0.5)\n"
      "assert isinstance(out, list) and len(out) == 2 and all(isinstance(t, str) for t in out)\n"
      "docs = ['The old man walked down to the sea and looked at the boats for a long time. ' * 3]\n"
      "print('brierlm', r.score(docs).brierlm)\n")
  p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  assert re.search(r"^brierlm \d+\.\d+", p.stdout, re.M), p.stdout


# ----------------------------------------------------------------------------- registries


NAMES = "autoencoder|calm|ar|energy|flow|diffusion"
COMPARISONS = re.compile(
    rf'(==|!=)\s*"({NAMES})"|"({NAMES})"\s*(==|!=)|\bin\s*\(\s*"({NAMES})"'
    r'|(\.stage|\bstage|head\.kind|head_kind)\s*(==|!=|\bin\b|\bnot in\b)\s*[("\[]')


def test_only_the_registries_compare_stage_and_head_names():
  """Outside calm/stages/ and calm/heads.py no module compares a stage name or head kind."""
  hits = []
  for path in sorted((ROOT / "calm").rglob("*.py")):
    rel = path.relative_to(ROOT).as_posix()
    if rel.startswith("calm/stages/") or rel == "calm/heads.py":
      continue
    for n, line in enumerate(path.read_text().splitlines(), 1):
      if COMPARISONS.search(line.split("#")[0]):
        hits.append(f"{rel}:{n}: {line.strip()}")
  assert not hits, "\n".join(hits)
  # the pattern does catch what it is meant to
  for bad in ('if cfg.stage == "calm":', 'kind = "x" if h.kind == "flow" else 1',
              'if stage in ("calm", "ar"):', 'if "energy" != kind:'):
    assert COMPARISONS.search(bad), bad


def test_no_argparse_outside_the_cli():
  """Every argparse entry point lives in calm/cli/; library modules hold none."""
  offenders = [p.relative_to(ROOT).as_posix() for p in (ROOT / "calm").rglob("*.py")
               if "argparse" in p.read_text() and p.parent.name != "cli"]
  assert offenders == []


def test_a_head_is_one_module_and_one_registry_line():
  from calm import heads

  for kind in heads.KINDS:
    cls = heads.get(kind)
    assert issubclass(cls, nnx.Module) and cls.model_type == kind
    for attr in ("loss", "draw", "sample", "validate", "target_draws", "energy_references",
                 "train_macs_per_position", "reference_rows", "normalize_reference",
                 "reference_config", "architecture"):
      assert hasattr(cls, attr), (kind, attr)
  with pytest.raises(ConfigError, match="model.head.kind"):
    heads.get("nope")
