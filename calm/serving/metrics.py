"""Server counters, rendered in the Prometheus text exposition format."""

from __future__ import annotations

import collections
import threading
import time

# time-to-first-token histogram buckets (seconds)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0


class Metrics:
  """Thread-safe counters: requests by HTTP status, generated tokens (and their rate over the
  last 10 s), time to first token; queue depth and slot occupancy are read when rendered."""

  def __init__(self):
    self._lock = threading.Lock()
    self.requests: collections.Counter = collections.Counter()
    self.tokens = 0
    self.prompt_tokens = 0
    self.ttft_count, self.ttft_sum = 0, 0.0
    self.ttft_buckets = [0] * len(TTFT_BUCKETS)
    self._recent: collections.deque = collections.deque()  # (time, tokens)

  def request(self, status: int) -> None:
    with self._lock:
      self.requests[status] += 1

  def generated(self, tokens: int, now: float | None = None) -> None:
    now = time.monotonic() if now is None else now
    with self._lock:
      self.tokens += tokens
      self._recent.append((now, tokens))
      self._trim(now)

  def prompt(self, tokens: int) -> None:
    with self._lock:
      self.prompt_tokens += tokens

  def first_token(self, seconds: float) -> None:
    with self._lock:
      self.ttft_count += 1
      self.ttft_sum += seconds
      for i, edge in enumerate(TTFT_BUCKETS):
        if seconds <= edge:
          self.ttft_buckets[i] += 1

  def _trim(self, now: float) -> None:
    while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
      self._recent.popleft()

  def tokens_per_second(self, now: float | None = None) -> float:
    now = time.monotonic() if now is None else now
    with self._lock:
      self._trim(now)
      return sum(t for _, t in self._recent) / RATE_WINDOW_S

  def render(self, *, queue_depth: int, slots_busy: int, slots: int, draining: bool) -> str:
    """The metrics page (text/plain; version=0.0.4)."""
    rate = self.tokens_per_second()
    with self._lock:
      lines = ["# HELP calm_requests_total Completion requests answered, by HTTP status.",
               "# TYPE calm_requests_total counter"]
      lines += [f'calm_requests_total{{code="{c}"}} {n}' for c, n in sorted(self.requests.items())]
      lines += ["# HELP calm_generated_tokens_total Tokens generated.",
                "# TYPE calm_generated_tokens_total counter",
                f"calm_generated_tokens_total {self.tokens}",
                "# HELP calm_prompt_tokens_total Prompt tokens prefilled.",
                "# TYPE calm_prompt_tokens_total counter",
                f"calm_prompt_tokens_total {self.prompt_tokens}",
                f"# HELP calm_tokens_per_second Tokens generated per second over the last "
                f"{RATE_WINDOW_S:g} s.",
                "# TYPE calm_tokens_per_second gauge",
                f"calm_tokens_per_second {rate:.3f}",
                "# HELP calm_queue_depth Choices waiting for a decode slot.",
                "# TYPE calm_queue_depth gauge",
                f"calm_queue_depth {queue_depth}",
                "# HELP calm_slots_busy Decode slots in use.",
                "# TYPE calm_slots_busy gauge",
                f"calm_slots_busy {slots_busy}",
                "# HELP calm_slots Decode slots compiled.",
                "# TYPE calm_slots gauge",
                f"calm_slots {slots}",
                "# HELP calm_draining 1 while the server finishes its requests before exiting.",
                "# TYPE calm_draining gauge",
                f"calm_draining {int(draining)}",
                "# HELP calm_time_to_first_token_seconds From a choice's arrival to its first "
                "token.",
                "# TYPE calm_time_to_first_token_seconds histogram"]
      lines += [f'calm_time_to_first_token_seconds_bucket{{le="{edge:g}"}} {n}'
                for edge, n in zip(TTFT_BUCKETS, self.ttft_buckets)]
      lines += [f'calm_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_count}',
                f"calm_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                f"calm_time_to_first_token_seconds_count {self.ttft_count}"]
    return "\n".join(lines) + "\n"
