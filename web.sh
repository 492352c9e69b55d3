#!/usr/bin/env bash
# Chat with a trained model in the browser (http://127.0.0.1:7860).
#   sh web.sh                                     # the demo model, after `sh train.sh`
#   sh web.sh --model_weights outputs/run1        # a training output, checkpoint or merged dir
#   sh web.sh --host 0.0.0.0 --auth user:secret   # reachable from the network, with a password
# Every flag of `python -m runtime.web` can follow.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

if [ "$#" -eq 0 ] && [ ! -d outputs/demo ]; then
  echo "outputs/demo not found: train the demo first (sh train.sh), or pass --model_weights DIR" >&2
  exit 2
fi
exec "$PYTHON" -m runtime.web "$@"
