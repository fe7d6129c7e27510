"""`calm-serve`: a continuous-batching HTTP server with an OpenAI-style completions API.

- `protocol`: request validation and response bodies (the OpenAI completions shape).
- `scheduler`: decode slots on the generation engine, requests admitted between steps.
- `metrics`: counters in the Prometheus text format.
- `app`: the HTTP routes (Starlette) and the playground page.
- `loadgen`: an HTTP load generator (tests and `bench/bench_serve.py`).
"""
