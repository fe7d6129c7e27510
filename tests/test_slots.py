"""Decode slots (what a server batches over): a prompt prefilled alone, inserted into a free
slot between steps and decoded with its own sampler settings gets exactly the text it gets
from `Run.generate` alone with its seed, whatever the other slots hold."""

import numpy as np
import pytest

from calm import engine
from calm.engine import RowSettings
from calm.errors import CalmError

PROMPTS = ["The old man", "It was", "A", "She said that the King of the land had",
           "Once upon a time there", "Why?"]


def run_slots(r, jobs, *, num_slots, max_new, capacity=32, bucket=16, stagger=1, steps=1,
              spans=()):
  """Decodes `jobs` [(prompt, seed, RowSettings)] through `num_slots` slots, admitting job j
  no earlier than step j·stagger into the first free slot → new tokens per job. `spans`: the
  attention spans (cache positions) a call may use, the smallest that holds every live row."""
  eng, tok = r.engine, r.tokenizer
  sampler = r.stage.sampler(r.config.sampling)
  state = eng.slots(num_slots, eng.positions(capacity))
  owner: list = [None] * num_slots
  filled = [0] * num_slots
  out = {j: [] for j in range(len(jobs))}
  pending, step = list(range(len(jobs))), 0
  while pending or any(o is not None for o in owner):
    for s in range(num_slots):
      if owner[s] is None and pending and pending[0] * stagger <= step:
        j = pending.pop(0)
        prompt, seed, _ = jobs[j]
        row = eng.prefill_row_batch([tok.encode(prompt)], engine.row_keys([seed]),
                                    capacity=eng.positions(capacity),
                                    positions=eng.positions(bucket))
        state = eng.insert_rows(state, row, [s])
        owner[s] = j
        filled[s] = eng.positions(bucket)
    rows = eng.slot_rows([None if o is None else jobs[o][2] for o in owner])
    live = [s for s in range(num_slots) if owner[s] is not None]
    span = next((b for b in spans if b >= max(filled[s] for s in live) + steps), None)
    for s in live:
      filled[s] += steps
    state, toks, _ = eng.step_slots(state, rows, sampler, steps, span)
    toks = np.asarray(toks)
    for s, j in enumerate(owner):
      if j is None:
        continue
      out[j].extend(toks[s].tolist())
      if tok.eos_id in out[j] or len(out[j]) >= max_new:
        out[j] = engine.trim(np.asarray(out[j]), tok.eos_id)[:max_new]
        owner[s] = None
    step += 1
  return [out[j] for j in range(len(jobs))]


def alone(r, prompt, seed, s: RowSettings, max_new):
  kw = dict(temperature=s.temperature)
  if r.engine.tokens_per_step > 1:
    kw.update(sampler=s.sampler, num_candidates=16, max_attempts=64)
  else:
    kw.update(top_p=s.top_p)
  (c,) = r.complete(prompt, max_new_tokens=max_new, seed=seed, **kw)
  return c.token_ids


@pytest.fixture(scope="module")
def slotted(tiny_runs):
  """Lively runs (see conftest) with the settings the slots' fixed part reads."""
  import calm
  from conftest import randomize

  over = ["sampling.num_candidates=16", "sampling.max_attempts=64",
          f"sampling.draws_per_step={engine.SLOT_DRAWS_PER_STEP}"]
  out = {s: calm.open(tiny_runs / s, overrides=over) for s in ("calm", "ar")}
  randomize(out["calm"].model, 1)
  randomize(out["calm"].autoencoder.model, 2)
  randomize(out["ar"].model, 3)
  return out


CALM_SETTINGS = [RowSettings(1.0), RowSettings(0.5, sampler="exact"),
                 RowSettings(0.4, sampler="batch"), RowSettings(0.7, sampler="exact"),
                 RowSettings(1.0, sampler="batch"), RowSettings(0.5, sampler="batch")]
AR_SETTINGS = [RowSettings(1.0), RowSettings(0.8, top_p=0.9), RowSettings(0.5),
               RowSettings(1.0, top_p=0.5), RowSettings(0.9), RowSettings(0.3, top_p=0.95)]


@pytest.mark.parametrize("stage", ["calm", "ar"])
def test_slots_give_each_request_its_own_text(slotted, stage):
  """Mixed settings, staggered admission, fewer slots than requests: every request's tokens
  == `Run.generate` alone with its seed and settings."""
  r = slotted[stage]
  settings = CALM_SETTINGS if stage == "calm" else AR_SETTINGS
  jobs = [(p, 20 + i, s) for i, (p, s) in enumerate(zip(PROMPTS, settings))]
  got = run_slots(r, jobs, num_slots=3, max_new=12)
  want = [alone(r, p, seed, s, 12) for p, seed, s in jobs]
  assert got == want
  assert len(set(map(tuple, want))) == len(want)  # the requests differ


@pytest.mark.parametrize("stage", ["calm", "ar"])
def test_slot_count_position_and_steps_per_call_do_not_change_a_request(slotted, stage):
  r = slotted[stage]
  jobs = [(p, 7, RowSettings(0.6)) for p in PROMPTS[:4]]
  a = run_slots(r, jobs, num_slots=4, max_new=8, stagger=0)
  b = run_slots(r, jobs[::-1], num_slots=2, max_new=8, stagger=2)[::-1]
  c = run_slots(r, jobs, num_slots=3, max_new=8, steps=3)  # 3 steps per call
  # attention over only the positions the live rows fill: spans just above the prompt bucket
  p = r.engine.positions(16)
  d = run_slots(r, jobs, num_slots=3, max_new=8, steps=2, spans=(p + 2, p + 4))
  assert a == b == c == d


def test_greedy_ar_is_the_most_likely_token(slotted):
  """AR at temperature 0: the same tokens for any seed, each the argmax of the next-token
  logits of the prompt + tokens so far."""
  import jax.numpy as jnp

  r = slotted["ar"]
  got = run_slots(r, [("The old man", s, RowSettings(0.0, top_p=0.5)) for s in (1, 2)],
                  num_slots=2, max_new=6, stagger=0)
  assert got[0] == got[1]
  prompt = r.tokenizer.encode("The old man")
  # causal: the logits at position i of prompt + answer are the next-token logits after i
  logits_BTV, _ = r.model(jnp.asarray([prompt + got[0]]))
  best = np.argmax(np.asarray(logits_BTV[0], np.float32), axis=-1)
  assert best[len(prompt) - 1:len(prompt) - 1 + len(got[0])].tolist() == got[0]


def test_zero_temperature_weights_are_the_mode():
  """CALM at temperature 0 (1/T = inf): uniform over each row's most frequent candidates."""
  import jax.numpy as jnp
  from calm import temperature as tm

  a, b, c = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
  cand = jnp.asarray([[a, b, a, c, b, a], [c, b, b, c, a, a]], jnp.int32)
  w = np.exp(np.asarray(tm.batch_log_weights_rows(cand, jnp.asarray([np.inf, np.inf]))))
  np.testing.assert_allclose(w[0], [1, 0, 0, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(w[1], [1, 1, 0, 0, 1, 0], atol=1e-6)
  # a finite row next to it keeps its own rule (T = 1/2 → C(count, 2))
  w = np.exp(np.asarray(tm.batch_log_weights_rows(cand, jnp.asarray([2.0, np.inf]))))
  np.testing.assert_allclose(w[0], [3, 1, 0, 0, 0, 0], atol=1e-5)


def test_settings_are_checked(slotted):
  calm_eng, ar_eng = slotted["calm"].engine, slotted["ar"].engine
  for bad in (RowSettings(-0.1), RowSettings(2.5), RowSettings(float("nan")),
              RowSettings(0.5, top_p=0.0), RowSettings(0.5, sampler="greedy")):
    for eng in (calm_eng, ar_eng):
      with pytest.raises(CalmError):
        eng.check_settings(bad)
  with pytest.raises(CalmError, match="top_p"):
    calm_eng.check_settings(RowSettings(0.5, top_p=0.9))
  with pytest.raises(CalmError, match="temperature"):
    calm_eng.check_settings(RowSettings(1.5))  # CALM's samplers sharpen only: T <= 1
  ar_eng.check_settings(RowSettings(1.5, top_p=0.9))
  ar_eng.check_settings(RowSettings(0.0))
