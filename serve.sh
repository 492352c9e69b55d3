#!/usr/bin/env bash
# Serve a trained model through an OpenAI-compatible API (http://127.0.0.1:8000/v1).
#   sh serve.sh                                       # the demo model, after `sh train.sh`
#   sh serve.sh --model_weights outputs/run1          # a training output, checkpoint or merged dir
#   VLM_API_KEY=secret sh serve.sh --host 0.0.0.0     # reachable from the network, with a key
# Every flag of `python -m runtime.serve` can follow.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

if [ "$#" -eq 0 ] && [ ! -d outputs/demo ]; then
  echo "outputs/demo not found: train the demo first (sh train.sh), or pass --model_weights DIR" >&2
  exit 2
fi
exec "$PYTHON" -m runtime.serve "$@"
