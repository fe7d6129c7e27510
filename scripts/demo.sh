#!/usr/bin/env bash
# `make demo`: tokenizer + autoencoder + CALM + AR baseline on the shipped Gutenberg slice, then
# sample text and score BrierLM. Runs on CPU; re-running resumes/finishes instantly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RUN=${RUN:-runs/demo}
CFG=configs/demo.yaml
EXTRA=("$@")
EXPECT="At this size (1.2M tokens per stage on CPU) expect the CALM normalised score to climb from \
about -0.06 to about -0.01 (it has learnt which chunks are common, not yet to use the context; \
see docs/learning.md), BrierLM near 0 for both models and garbled samples."

echo "== 1/5 autoencoder (K=4 tokens <-> one vector) =="
$PY train.py --config $CFG stage=autoencoder run_dir=$RUN/ae train.lr=2e-3 "${EXTRA[@]}"
echo "-- held-out reconstruction (token accuracy from mu and under latent noise)"
$PY -m calm.evaluate --config $RUN/ae/config.yaml --out $RUN/reconstruction.json
echo "== 2/5 CALM energy model on top of the frozen autoencoder =="
$PY train.py --config $CFG stage=calm run_dir=$RUN/calm train.autoencoder=$RUN/ae \
  "${EXTRA[@]}"
echo "-- is it learning? (normalised energy score: 0 = ignores the context, 1 = perfect)"
$PY scripts/calm_progress.py $RUN/calm
echo "== 3/5 discrete AR baseline (same tokenizer, same backbone size) =="
$PY train.py --config $CFG stage=ar run_dir=$RUN/ar data.tokenizer=$RUN/ae/tokenizer.json \
  "${EXTRA[@]}"
echo "== 4/5 samples =="
PROMPT="It was a dark and stormy night"
$PY sample.py --config $RUN/calm/config.yaml --prompt "$PROMPT" --max-tokens 48
$PY sample.py --config $RUN/calm/config.yaml --prompt "$PROMPT" --max-tokens 48 \
  --temperature 0.5 --sampler batch
$PY sample.py --config $RUN/calm/config.yaml --prompt "$PROMPT" --max-tokens 48 \
  --temperature 0.5 --sampler exact
$PY sample.py --config $RUN/ar/config.yaml --prompt "$PROMPT" --max-tokens 48
echo "== 5/5 BrierLM on held-out books =="
$PY -m calm.evaluate --config $RUN/calm/config.yaml --out $RUN/brier_calm.json
$PY -m calm.evaluate --config $RUN/ar/config.yaml --out $RUN/brier_ar.json
echo "demo finished: runs, logs and checkpoints under $RUN"
$PY scripts/calm_progress.py $RUN/calm
echo "$EXPECT"
