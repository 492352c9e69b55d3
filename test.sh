#!/usr/bin/env bash
# Ask a trained model about images.
#   sh test.sh                        # the demo: answer the held-out shapes, report accuracy
#   sh test.sh --model_weights outputs/run1 --image_path photo.jpg --prompt "Describe the image."
# Every flag of test.py can follow.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

if [ "$#" -eq 0 ]; then
  DEMO_ROOT=${DEMO_ROOT:-demo_assets}
  exec "$PYTHON" test.py --model_weights outputs/demo \
    --data_path "$DEMO_ROOT/shapes/test.json" --image_folder "$DEMO_ROOT/shapes" \
    --output_file outputs/demo/eval_answers.json
fi
exec "$PYTHON" test.py "$@"
