"""`calm-serve` with real clients: the official `openai` package, the HTTP load generator and
headless Chromium on the playground page; bad requests, limits, disconnects and draining."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import calm
from calm import engine
from calm.serving import loadgen, server as server_lib

openai = pytest.importorskip("openai")

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVERRIDES = ["sampling.num_candidates=16", "sampling.max_attempts=64",
             f"sampling.draws_per_step={engine.SLOT_DRAWS_PER_STEP}"]
KEY = "sekrit"


def lively_run(tiny_runs, stage):
  from conftest import randomize

  r = calm.open(tiny_runs / stage, overrides=OVERRIDES)
  randomize(r.model, {"calm": 1, "ar": 3}[stage])
  if r.autoencoder is not None:
    randomize(r.autoencoder.model, 2)
  return r


@pytest.fixture(scope="module")
def runs(tiny_runs):
  return {s: lively_run(tiny_runs, s) for s in ("calm", "ar")}


@pytest.fixture(scope="module")
def served(runs):
  """A server per stage (4 slots, API key, small body limit)."""
  out = {s: server_lib.Background(r, server_lib.Options(slots=4, max_queue=64, api_key=KEY,
                                                         max_body_bytes=4096, max_n=4))
         for s, r in runs.items()}
  yield out
  for b in out.values():
    b.stop()


def client(b):
  return openai.OpenAI(base_url=b.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def body(prompt="The old man", **kw):
  return {"prompt": prompt, "max_tokens": 12, **kw}


@pytest.mark.parametrize("stage,kw", [
    ("calm", dict(temperature=1.0)), ("calm", dict(temperature=0.5, sampler="exact")),
    ("calm", dict(temperature=0.5, sampler="batch")), ("ar", dict(temperature=0.8, top_p=0.9)),
])
def test_openai_client_gets_the_front_doors_text(served, runs, stage, kw):
  """Plain and streamed completions through the `openai` package == `Run.generate` with the
  same seed and settings; usage counts the tokens."""
  b, r = served[stage], runs[stage]
  extra = {"sampler": kw["sampler"]} if "sampler" in kw else {}
  settings = {k: v for k, v in kw.items() if k != "sampler"}
  out = client(b).completions.create(model=b.state.limits.model, prompt="The old man",
                                     max_tokens=40, seed=9, extra_body=extra, **settings)
  want = r.complete("The old man", max_new_tokens=40, seed=9, **kw)[0]
  assert out.choices[0].text == want.text
  assert out.choices[0].finish_reason == ("stop" if want.finished else "length")
  assert out.usage.completion_tokens == len(want.token_ids)
  assert out.usage.prompt_tokens == len(r.tokenizer.encode("The old man"))
  pieces, finish = [], None
  for ev in client(b).completions.create(model=b.state.limits.model, prompt="The old man",
                                         max_tokens=40, seed=9, stream=True, extra_body=extra,
                                         **settings):
    pieces.append(ev.choices[0].text)
    finish = ev.choices[0].finish_reason or finish
  assert "".join(pieces) == want.text and finish == out.choices[0].finish_reason
  per_call = b.scheduler.steps_per_call * b.scheduler.engine.tokens_per_step
  if len(want.token_ids) > per_call:  # streamed as it came, a decode call at a time
    assert len([p for p in pieces if p]) > 1


@pytest.mark.parametrize("stage", ["calm", "ar"])
def test_same_seed_alone_or_under_load(served, stage):
  b = served[stage]
  req = body("Once upon a time there", seed=123, temperature=0.7, max_tokens=16)
  alone = loadgen.request(b.url, req, api_key=KEY)
  make = lambda i, rng: {"body": body(["A", "It was", "Why?"][i % 3], seed=i, max_tokens=16,
                                      temperature=0.9, stream=bool(i % 2))}
  results = []
  t = threading.Thread(target=lambda: results.extend(loadgen.run_load(
      b.url, make, clients=6, requests=12, api_key=KEY)[0]))
  t.start()
  while b.scheduler.busy < 2 and t.is_alive():
    time.sleep(0.005)
  loaded = loadgen.request(b.url, req, api_key=KEY)
  t.join()
  assert alone.status == loaded.status == 200
  assert loaded.texts == alone.texts and alone.texts[0]
  assert all(x.status == 200 and x.complete for x in results)
  others = {x.texts[0] for x in results}
  assert len(others) > 2  # the load was made of different texts


def test_n_and_prompt_lists_are_seed_plus_index(served, runs):
  b, r = served["ar"], runs["ar"]
  res = loadgen.request(b.url, body(["The old man", "It was"], n=2, seed=40), api_key=KEY)
  assert res.status == 200 and len(res.texts) == 4
  want = [r.generate(p, max_new_tokens=12, seed=40 + i)
          for i, p in enumerate(["The old man"] * 2 + ["It was"] * 2)]
  assert res.texts == want and len(set(want)) == 4


def test_stop_strings_cut_the_text(served):
  b = served["ar"]
  full = loadgen.request(b.url, body(seed=3, max_tokens=24), api_key=KEY).texts[0]
  stop = full[5:8]
  assert len(stop) == 3 and stop in full
  for stream in (False, True):
    res = loadgen.request(b.url, body(seed=3, max_tokens=24, stop=[stop, "\x00never"],
                                      stream=stream), api_key=KEY)
    assert res.texts == [full[:full.index(stop)]] and res.finish == ["stop"]


def test_temperature_zero(served, runs):
  """AR: greedy, the same text for any seed. CALM: the mode of the candidates (documented)."""
  b = served["ar"]
  texts = {loadgen.request(b.url, body(seed=s, temperature=0), api_key=KEY).texts[0]
           for s in (1, 2, 3)}
  assert len(texts) == 1
  res = loadgen.request(served["calm"].url, body(seed=1, temperature=0), api_key=KEY)
  assert res.status == 200 and res.complete


@pytest.mark.parametrize("stage", ["calm", "ar"])
def test_bad_requests_get_a_4xx_naming_the_field(served, stage):
  b = served[stage]
  bads = loadgen.bad_requests(model=b.state.limits.model, context=b.scheduler.context,
                              max_body=4096, api_key=KEY, calm=stage == "calm")
  assert len(bads) >= 25
  for bad in bads:
    res = loadgen.request(b.url, bad.body, method=bad.method, path=bad.path,
                          headers=bad.headers, api_key=KEY, kind="bad")
    assert res.status == bad.status, (bad.name, res.status, res.error)
    assert res.error and res.error["message"], bad.name
    if bad.param:
      assert res.error["param"] == bad.param, (bad.name, res.error)
    health = loadgen.request(b.url, None, method="GET", path="/health")
    assert health.status == 200, bad.name
  ok = loadgen.request(b.url, body(seed=1), api_key=KEY)
  assert ok.status == 200 and ok.complete


def test_disconnect_frees_the_slot(served):
  b = served["ar"]
  res = loadgen.request(b.url, body(seed=2, max_tokens=60, stream=True), api_key=KEY,
                        disconnect_after=1)
  assert res.status == 200 and not res.complete
  deadline = time.monotonic() + 30
  while (b.scheduler.busy or b.scheduler.waiting) and time.monotonic() < deadline:
    time.sleep(0.01)
  assert b.scheduler.busy == 0


def test_metrics_are_prometheus_text(served):
  b = served["calm"]
  before = _metrics(b)
  res = loadgen.request(b.url, body(seed=5, stream=True), api_key=KEY)
  assert res.complete
  after = _metrics(b)
  assert after['calm_requests_total{code="200"}'] == before.get(
      'calm_requests_total{code="200"}', 0) + 1
  assert after["calm_generated_tokens_total"] > before["calm_generated_tokens_total"]
  assert after["calm_time_to_first_token_seconds_count"] == \
      before["calm_time_to_first_token_seconds_count"] + 1
  assert after["calm_slots"] == 4 and after["calm_slots_busy"] == 0
  assert after["calm_queue_depth"] == 0 and "calm_tokens_per_second" in after
  assert loadgen.request(b.url, None, method="GET", path="/metrics").status == 401


def _metrics(b) -> dict:
  import urllib.request

  req = urllib.request.Request(b.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
  text = urllib.request.urlopen(req).read().decode()
  out = {}
  for line in text.splitlines():
    if line and not line.startswith("#"):
      name, value = line.rsplit(" ", 1)
      out[name] = float(value)
  return out


def test_models_and_health(served):
  b = served["calm"]
  models = client(b).models.list()
  assert [m.id for m in models.data] == [b.state.limits.model]
  h = loadgen.request(b.url, None, method="GET", path="/health")
  assert h.status == 200


def test_full_queue_gets_429_and_drain_finishes_running_requests(runs):
  """One slot, a queue of one: a third concurrent request gets 429. Draining turns new
  requests away with 503 and lets the running ones finish."""
  b = server_lib.Background(runs["ar"], server_lib.Options(slots=1, max_queue=1, max_n=1,
                                                           grace=60))
  gate = threading.Event()  # holds the decode thread's first delivery: the slot stays busy
  deliver = b.scheduler._deliver
  b.scheduler._deliver = lambda *a: (gate.wait(60), deliver(*a))[1]

  def until(cond):
    deadline = time.monotonic() + 60
    while not cond():
      assert time.monotonic() < deadline
      time.sleep(0.002)

  try:
    long = body(seed=1, max_tokens=48, stream=True)
    results = []
    threads = [threading.Thread(target=lambda: results.append(loadgen.request(b.url, long)))
               for _ in range(2)]
    threads[0].start()
    until(lambda: b.scheduler.busy == 1)
    threads[1].start()
    until(lambda: b.scheduler.waiting == 1)
    refused = loadgen.request(b.url, body(seed=2))
    assert refused.status == 429 and refused.error["type"] == "rate_limit_error"
    drain = b.server.drain()
    assert loadgen.request(b.url, body(seed=3)).status == 503
    gate.set()
    for t in threads:
      t.join()
    drain.join()
    assert [r.status for r in results] == [200, 200] and all(r.complete for r in results)
  finally:
    gate.set()
    b.stop()


def test_playground_page_streams_in_headless_chromium(served, tmp_path):
  """The page at / streams a completion into itself: its text is the API's text for the same
  seed, it shows tokens/s, and the screenshot's output box is no longer blank."""
  import io

  from PIL import Image

  import chromium

  if chromium.find() is None:
    pytest.skip("chromium is not installed (.ci/run installs it)")
  b = served["ar"]
  want = loadgen.request(b.url, body(seed=11, max_tokens=24), api_key=KEY).texts[0]
  assert want
  with chromium.Browser(str(tmp_path / "profile")) as page:
    page.open(f"{b.url}/?key={KEY}")
    page.wait_for("document.getElementById('model').textContent.includes('step')")
    blank = page.screenshot()
    page.open(f"{b.url}/?prompt=The%20old%20man&max_tokens=24&seed=11&temperature=1&key={KEY}"
              f"&autorun=1")
    seen = page.wait_for("document.getElementById('generated') && "
                         "document.getElementById('generated').textContent.length > 0 && "
                         "document.getElementById('generated').textContent")
    stats = page.wait_for("document.getElementById('stats').dataset.done === '1' && "
                          "document.getElementById('stats').textContent")
    text = page.evaluate("document.getElementById('generated').textContent")
    done = page.screenshot()
  assert want.startswith(seen) and text == want
  assert re.search(r"\d+ tokens in [\d.]+ s: [\d.]+ tokens/s", stats), stats
  box = (slice(200, 420), slice(20, 880))  # the output box, below the controls
  gray = [np.asarray(Image.open(io.BytesIO(png)).convert("L"), np.float32)[box]
          for png in (blank, done)]
  assert gray[1].std() > gray[0].std() + 1.0


def test_cli_serves_and_exits_zero_on_sigterm(tiny_runs, tmp_path):
  """calm-serve as a process: prints its URL, answers, drains on SIGTERM (the running request
  completes, exit code 0); a taken port is a one-line error."""
  cfg = tiny_runs / "ar" / "config.yaml"
  cmd = [sys.executable, "-m", "calm.cli.serving", "--config", str(cfg), "--port", "0",
         "--slots", "2", "--grace", "60", "--buckets", "16"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                       cwd=tmp_path)
  try:
    line = p.stdout.readline()
    m = re.search(r"on (http://[\d.]+:(\d+))", line)
    assert m, line + p.stderr.read()
    url, port = m.group(1), int(m.group(2))
    result = []
    t = threading.Thread(target=lambda: result.append(loadgen.request(
        url, body(seed=1, max_tokens=48, stream=True))))
    t.start()
    time.sleep(0.5)
    taken = subprocess.run(cmd[:5] + ["--port", str(port)], capture_output=True, text=True,
                           env=env, timeout=120)
    assert taken.returncode == 2 and taken.stderr.count("\n") == 1
    assert "cannot listen" in taken.stderr
    p.send_signal(signal.SIGTERM)
    t.join(timeout=120)
    assert p.wait(timeout=120) == 0
    assert result and result[0].status == 200 and result[0].complete
  finally:
    if p.poll() is None:
      p.kill()


def test_cli_refuses_an_autoencoder_run(tiny_runs):
  r = subprocess.run([sys.executable, "-m", "calm.cli.serving", "--config",
                      str(tiny_runs / "ae" / "config.yaml"), "--port", "0"],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "calm or ar" in r.stderr


@pytest.mark.parametrize("stage", ["calm", "ar"])
def test_nothing_compiles_while_serving(served, stage):
  """After warm-up, prompts of every length, every sampler setting, n, stop and streaming
  reuse the compiled prefill buckets, insert and step."""
  import jax

  b = served[stage]
  compiled = []
  counting = threading.Event()

  def count(event, seconds, **kw):
    if counting.is_set() and event == "/jax/core/compile/backend_compile_duration":
      compiled.append(kw.get("fun_name", event))

  jax.monitoring.register_event_duration_secs_listener(count)
  counting.set()
  settings = ([dict(temperature=1.0), dict(temperature=0.3, sampler="exact"),
               dict(temperature=0.6, sampler="batch"), dict(temperature=0)] if stage == "calm"
              else [dict(temperature=1.0), dict(temperature=0.5, top_p=0.8), dict(temperature=0),
                    dict(temperature=1.7)])
  words = "the old man said that it was a long way to the sea and back again".split()
  make = lambda i, rng: {"body": body(" ".join(words[:1 + (7 * i) % 11]),
                                      seed=i, max_tokens=1 + i % 9, stream=bool(i % 2),
                                      n=1 + i % 2, stop=["zz"] if i % 3 else None,
                                      **settings[i % len(settings)])}
  results, _ = loadgen.run_load(b.url, make, clients=4, requests=16, api_key=KEY)
  counting.clear()
  assert all(r.status == 200 and r.complete for r in results), [r.error for r in results]
  assert not compiled, compiled


def test_int8_weights_serve(tiny_runs):
  """A run opened with int8 weights serves like any other (the text is the front door's)."""
  pytest.importorskip("qwix")
  r = calm.open(tiny_runs / "ar", weights="int8")
  with server_lib.Background(r, server_lib.Options(slots=2, buckets=(16,))) as b:
    res = loadgen.request(b.url, body(seed=4))
  assert res.status == 200 and res.complete
  assert res.texts == [r.generate("The old man", max_new_tokens=12, seed=4)]


class CountingEngine:
  """An engine whose decode calls are counted."""

  def __init__(self, inner):
    self.inner, self.calls = inner, 0

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def step_slots(self, *args, **kwargs):
    self.calls += 1
    return self.inner.step_slots(*args, **kwargs)


@pytest.mark.parametrize("stage", ["calm", "ar"])
def test_scheduler_runs_no_call_after_the_last_token(runs, stage):
  """Requests that end by max_tokens cost exactly the decode calls their tokens need: none is
  dispatched once every slot's budget is spent (the call after it would be read by nobody)."""
  from calm.serving.scheduler import Choice, Scheduler

  r = runs[stage]
  s = Scheduler(r, slots=4, max_queue=8, steps_per_call=2)
  s.engine = CountingEngine(r.engine)
  per_call = 2 * r.engine.tokens_per_step
  done = threading.Semaphore(0)
  chs = [Choice(r.tokenizer.encode("The old man"), seed=i, settings=engine.RowSettings(),
                max_tokens=3 * per_call, stops=(), ignore_eos=True,
                emit=lambda delta, finish: finish is not None and done.release())
         for i in range(3)]
  s.start()
  try:
    s.submit(chs)
    for _ in chs:
      assert done.acquire(timeout=120)
    time.sleep(0.2)  # a call dispatched after the last delivery would show up here
  finally:
    s.close()
  assert [c.generated for c in chs] == [3 * per_call] * 3
  assert s.engine.calls == 3
