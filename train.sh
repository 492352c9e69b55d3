#!/usr/bin/env bash
# Train a vision-language model.
#   sh train.sh                                   # the CPU demo: tiny models + shapes data
#   sh train.sh --config configs/qwen7b_chat_clip336_stage2.yaml --data_path ... --image_folder ...
#   NPROC_PER_NODE=4 sh train.sh --config ...     # several GPUs through torchrun
# Every flag of train.py can follow; flags override the YAML config.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
NPROC_PER_NODE=${NPROC_PER_NODE:-1}

args=("$@")
if [ "${#args[@]}" -eq 0 ] || [[ " ${args[*]} " != *" --config "* ]]; then
  # No recipe given: the embedded demo. Builds its models and data once, then reuses them.
  "$PYTHON" -m demo.prepare --root "${DEMO_ROOT:-demo_assets}"
  args=(--config configs/demo.yaml "${args[@]}")
fi

if [ "$NPROC_PER_NODE" -gt 1 ]; then
  exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC_PER_NODE" train.py "${args[@]}"
fi
exec "$PYTHON" train.py "${args[@]}"
