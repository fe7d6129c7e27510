"""calm-serve under load, against the offline engine, on trained runs (the demo's by default).

  python -m bench.bench_serve --calm runs/demo/calm --ar runs/demo/ar [--soak 300]

Each server runs as its own `calm-serve` process (16 slots); clients are this process's
threads (`calm.serving.loadgen`). Rows:
- throughput: 16 concurrent streaming clients × 64 new tokens (the best of 3 waves) vs the
  offline engine generating the same 16 prompts and seeds as one batch of 16 (the best of 3,
  before and after the server's waves);
- head-of-line: time to first token of a 1-token request, idle vs while 15 long requests decode;
- calm_vs_ar: the throughput load against both runs;
- soak: mixed load for --soak seconds (streaming and not, random disconnects, random bad
  requests): 5xx count, valid requests answered completely, server RSS after the soak vs after
  warm-up, slots free at the end.
Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import re
import signal
import statistics
import subprocess
import sys
import time

from bench import common
from calm.serving import loadgen

PROMPTS = ["It was a dark and stormy night", "The old man", "She said that the King of the",
           "Once upon a time there", "In the morning the ship", "Why", "And then, quite",
           "The letter was", "He had never seen", "When the war ended", "My dear friend",
           "The house stood", "At the end of the", "They walked", "There is no", "It is a truth"]


class Served:
  """`calm-serve` on a free port, in its own process."""

  def __init__(self, run_dir: str, slots: int = 16, extra: tuple[str, ...] = ()):
    cmd = [sys.executable, "-m", "calm.cli.serving", "--config", str(run_dir), "--port", "0",
           "--slots", str(slots), "--max-queue", "512", *extra]
    self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = self.proc.stdout.readline()
    m = re.search(r"on (http://\S+) .*compiled in ([\d.]+) s", line)
    if not m:
      raise RuntimeError(f"calm-serve did not start: {line}{self.proc.stderr.read()}")
    self.url, self.compile_s = m.group(1), float(m.group(2))
    models = loadgen.request(self.url, None, method="GET", path="/v1/models").body
    self.context = models["data"][0]["context"]

  def rss_mib(self) -> float:
    for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
    return float("nan")

  def health(self) -> dict:
    return loadgen.request(self.url, None, method="GET", path="/health").body or {}

  def stop(self) -> int:
    self.proc.send_signal(signal.SIGTERM)
    return self.proc.wait(timeout=120)


def stream_body(i: int, max_tokens: int, ignore_eos: bool = False) -> dict:
  return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "seed": i,
          "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}


def throughput(s: Served, clients: int, max_tokens: int, repeats: int = 3) -> dict:
  """Aggregate tokens/s of `clients` concurrent streaming clients, one request of `max_tokens`
  new tokens each (`ignore_eos`: every client gets them all): the best of `repeats` waves (as
  the offline figure is the best of its repeats)."""
  loadgen.run_load(s.url, lambda i, rng: {"body": stream_body(i, 4)}, clients=clients,
                   requests=clients)  # warm the HTTP path
  waves = []
  for _ in range(repeats):
    res, wall = loadgen.run_load(
        s.url, lambda i, rng: {"body": stream_body(i, max_tokens, ignore_eos=True)},
        clients=clients, requests=clients)
    waves.append(loadgen.summary(res, wall))
  best = max(waves, key=lambda w: w["tokens_per_s"])
  return {**best, "waves_tokens_per_s": [w["tokens_per_s"] for w in waves]}


def offline(run_dir: str, clients: int, max_tokens: int, repeats: int = 3) -> dict:
  """The offline engine on the same prompts and seeds as one batch, every row generating
  `max_tokens` (an engine that never stops at EOS, as `ignore_eos` on the server) → best
  tokens/s."""
  import copy

  import calm
  from calm import engine

  r = calm.open(run_dir)
  eng = copy.copy(r.engine)
  eng.eos_id = -1  # no token id: rows never finish early
  ids = [r.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(clients)]
  keys = engine.row_keys(list(range(clients)))
  sampler = r.stage.sampler(r.config.sampling)
  eng.generate(ids, keys, max_new_tokens=max_tokens, sampler=sampler)  # compile
  best = 0.0
  for _ in range(repeats):
    t0 = time.perf_counter()
    g = eng.generate(ids, keys, max_new_tokens=max_tokens, sampler=sampler)
    dt = time.perf_counter() - t0
    tokens = sum(len(t) for t in g.tokens)
    best = max(best, tokens / dt)
  return {"tokens": tokens, "tokens_per_s": best}


def head_of_line(s: Served, long_tokens: int, repeats: int = 9) -> dict:
  """Median time to first token of a 1-token request: idle, then while 15 long requests run
  (a sample counts only if all 15 were still decoding when it was answered)."""
  import threading

  one = lambda i: loadgen.request(s.url, stream_body(1000 + i, 1)).ttft
  idle = statistics.median(one(i) for i in range(repeats))
  busy, discarded = [], 0
  for k in range(3 * repeats):
    if len(busy) == repeats:
      break
    load = threading.Thread(target=loadgen.run_load, args=(
        s.url, lambda i, rng: {"body": stream_body(100 * k + i, long_tokens, True)}),
        kwargs=dict(clients=15, requests=15))
    load.start()
    deadline = time.monotonic() + 60
    while s.health().get("busy", 0) < 15 and time.monotonic() < deadline:
      time.sleep(0.002)
    if time.monotonic() >= deadline:
      raise RuntimeError("the 15 long requests did not all start")
    time.sleep(0.03)  # into their decoding: the probe finds a call in flight
    ttft = one(k)
    if s.health().get("busy", 0) >= 15:
      busy.append(ttft)
    else:
      discarded += 1
    load.join()
  if len(busy) < repeats:
    raise RuntimeError(f"only {len(busy)} of {repeats} probes found 15 requests decoding")
  loaded = statistics.median(busy)
  return {"ttft_idle_s": idle, "ttft_loaded_s": loaded, "ratio": loaded / idle,
          "discarded": discarded}


def soak(s: Served, seconds: float, bad: list[loadgen.Bad]) -> dict:
  """Mixed load for `seconds`: 60% streamed, 10% dropped mid-stream, 15% bad requests."""
  rss_warm = s.rss_mib()

  def make(i: int, rng: random.Random) -> dict:
    u = rng.random()
    if u < 0.15:
      b = rng.choice(bad)
      return {"body": b.body, "method": b.method, "path": b.path, "headers": b.headers,
              "kind": "bad:" + b.name}
    spec = {"body": {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, 96),
                     "seed": i, "temperature": rng.choice([1.0, 0.8, 0.5]),
                     "stream": u < 0.75, "n": rng.choice([1, 1, 1, 2])}}
    if spec["body"]["stream"]:
      spec["body"]["stream_options"] = {"include_usage": True}
    if u > 0.9:
      spec["body"]["stream"] = True
      spec.update(kind="disconnect", disconnect_after=rng.randint(1, 3))
    return spec

  res, wall = loadgen.run_load(s.url, make, clients=16, requests=10**9, duration_s=seconds,
                               seed=1)
  deadline = time.monotonic() + 60
  while s.health().get("busy", 1) and time.monotonic() < deadline:
    time.sleep(0.1)
  out = loadgen.summary(res, wall)
  wrong = [r for r in res if r.kind.startswith("bad:") and not 400 <= r.status < 500]
  h = s.health()
  out.update(bad_requests=sum(r.kind.startswith("bad:") for r in res), bad_not_4xx=len(wrong),
             disconnects=sum(r.kind == "disconnect" for r in res), rss_warm_mib=rss_warm,
             rss_after_mib=s.rss_mib(), slots_busy_after=h.get("busy"), queue_after=h.get("queue"))
  out["rss_growth"] = out["rss_after_mib"] / rss_warm - 1
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--calm", default="runs/demo/calm")
  ap.add_argument("--ar", default="runs/demo/ar")
  ap.add_argument("--clients", type=int, default=16)
  ap.add_argument("--max-tokens", type=int, default=64)
  ap.add_argument("--soak", type=float, default=300.0, help="seconds (0: skip)")
  ap.add_argument("--out", default=str(common.RESULTS / "serve.json"))
  args = ap.parse_args(argv)
  info, load0 = common.machine(), common.load_average()
  rows = []
  for name, run_dir in (("calm", args.calm), ("ar", args.ar)):
    off = offline(run_dir, args.clients, args.max_tokens)
    s = Served(run_dir, slots=args.clients)
    try:
      srv = throughput(s, args.clients, args.max_tokens)
      off2 = offline(run_dir, args.clients, args.max_tokens)  # interleaved: before and after
      off_best = max(off["tokens_per_s"], off2["tokens_per_s"])
      row = {"model": name, "compile_s": s.compile_s, "offline_tokens_per_s": off_best,
             "served_tokens_per_s": srv["tokens_per_s"],
             "served_waves_tokens_per_s": srv["waves_tokens_per_s"],
             "served_vs_offline": srv["tokens_per_s"] / off_best,
             "served_ttft_p50_s": srv["ttft_p50_s"], "served_incomplete": srv["valid_incomplete"]}
      hol = head_of_line(s, long_tokens=s.context - 16)
      row.update({f"hol_{k}": v for k, v in hol.items()})
      if args.soak > 0 and name == "calm":
        bad = loadgen.bad_requests(model=pathlib.Path(run_dir).name, context=10**4,
                                   max_body=1 << 20, api_key=None, calm=True)
        row["soak"] = soak(s, args.soak, bad)
      row["exit_code"] = s.stop()
    finally:
      if s.proc.poll() is None:
        s.proc.kill()
    rows.append(row)
    print(row, flush=True)
  calm_row, ar_row = rows
  summary = {"calm_vs_ar_served_tokens_per_s": calm_row["served_tokens_per_s"] /
             ar_row["served_tokens_per_s"]}
  print(f"\n| model | offline tok/s | served tok/s | served/offline | TTFT idle | TTFT under "
        f"15 | ratio |\n|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['offline_tokens_per_s']:.0f} | {r['served_tokens_per_s']:.0f} | "
          f"{r['served_vs_offline']:.2f} | {r['hol_ttft_idle_s'] * 1e3:.0f} ms | "
          f"{r['hol_ttft_loaded_s'] * 1e3:.0f} ms | {r['hol_ratio']:.2f} |")
  print(f"CALM / AR served tokens/s: {summary['calm_vs_ar_served_tokens_per_s']:.2f}")
  if "soak" in calm_row:
    print("soak:", calm_row["soak"])
  common.write_results(args.out, rows + [summary], info, load0)
  return 0


if __name__ == "__main__":
  from calm.errors import cli

  raise SystemExit(cli(main)())
