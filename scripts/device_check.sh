#!/usr/bin/env bash
# One command on a machine with one GPU: a venv with calm-jax and jax with CUDA from the package
# index, then bench/device_check.py: bf16 matmul peak, CALM-M and Transformer-S training steps at
# the official micro-batch (tokens/s, MFU, memory), CALM vs AR generation at batch 1 and 64, all
# in one JSON file. Without a GPU it runs at tiny sizes on the CPU (marked "tiny" in the JSON).
#
#   scripts/device_check.sh [--out FILE] [--python PYTHON] [--tiny]
#
# --python: use this interpreter as it is (nothing installed); default: create .venv-device.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=device_check.json PY="" ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --tiny) ARGS+=(--tiny); shift ;;
    *) echo "error: unknown argument $1 (use --out FILE, --python PYTHON, --tiny)" >&2; exit 2 ;;
  esac
done
if [ -z "$PY" ]; then
  VENV=${VENV:-.venv-device}
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  PY=$VENV/bin/python
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -e .
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    JAX_VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('jax'))")
    echo "GPU found: installing jax[cuda12]==$JAX_VERSION"
    "$PY" -m pip install -q "jax[cuda12]==$JAX_VERSION"
  else
    echo "no GPU found: checking on the CPU at tiny sizes"
  fi
fi
exec "$PY" -m bench.device_check --out "$OUT" ${ARGS[@]+"${ARGS[@]}"}
