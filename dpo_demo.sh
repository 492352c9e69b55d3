#!/usr/bin/env bash
# The preference-tuning demo (README, "Preference tuning (DPO)"): an SFT round on yes-only
# existence questions leaves the shapes demo saying "yes" to shapes that are not there; preference
# tuning on generated pairs, started from that model, moves it back (50% -> 90% held out). Plain
# DPO pushes "Yes" down without lifting "No" and degenerates here, so the recipe is DPO + the
# chosen answers' NLL (--rpo_alpha 1.0, RPO). POPE-style evaluation (accuracy, yes-ratio) before
# and after, with runtime.evaluation.
#   sh dpo_demo.sh                 # starts from the shapes demo in $BASE (sh train.sh), or trains it
#   BASE_STEPS=600 sh dpo_demo.sh  # a shorter shapes demo when $BASE holds no finished one
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-.venv/bin/python}
BASE=${BASE:-outputs/demo}
OUT=${OUT:-outputs/dpo-demo}
BASE_STEPS=${BASE_STEPS:--1}   # -1: the full demo recipe
YES_STEPS=${YES_STEPS:-25}     # 400 of the 2,000 yes-only records (batch 16): enough to answer "yes" to all
DPO_STEPS=${DPO_STEPS:-1000}   # eight epochs of the 2,000 pairs, batch 16
POPE=demo_assets/pope

if [ ! -f "$BASE/projector.safetensors" ]; then  # no finished shapes demo there: train one
  sh train.sh --output_dir "$BASE" --max_steps "$BASE_STEPS" --overwrite_output_dir
fi
"$PYTHON" -m demo.preference --root demo_assets

evaluate() {  # evaluate MODEL_DIR REPORT_DIR
  "$PYTHON" -m runtime.evaluation --benchmark pope --data "$POPE/coco_pope_shapes.json" \
    --image_folder "$POPE" --model_weights "$1" --output_dir "$2" --overwrite --no_progress \
    --dtype float32 --max_new_tokens 4
}

"$PYTHON" train.py --config configs/demo.yaml --init_from "$BASE" --overwrite_output_dir \
  --data_path "$POPE/yes_sft.json" --image_folder "$POPE" --output_dir "$OUT/yes" \
  --max_steps "$YES_STEPS" --warmup_steps 0
evaluate "$BASE" "$OUT/eval-base"
evaluate "$OUT/yes" "$OUT/eval-yes"
"$PYTHON" train.py --config configs/demo.yaml --init_from "$OUT/yes" --overwrite_output_dir \
  --training_objective dpo --data_path "$POPE/pairs.json" --image_folder "$POPE" \
  --output_dir "$OUT/dpo" --max_steps "$DPO_STEPS" --warmup_steps 0 \
  --learning_rate 2e-3 --dpo_beta 0.1 --rpo_alpha 1.0
evaluate "$OUT/dpo" "$OUT/eval-dpo"
"$PYTHON" -m runtime.evaluation compare "$OUT/eval-base" "$OUT/eval-yes" "$OUT/eval-dpo"
