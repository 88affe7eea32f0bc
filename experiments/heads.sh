#!/usr/bin/env bash
# Shared heads for every CAFT run of the experiment: self-distillation, then head training with
# the model frozen (the commands of docs/heads.md, with outputs under experiments/).
set -euo pipefail
export HF_HUB_OFFLINE=1
ASSETS=${CAFT_ASSETS:-../shared}
mkdir -p experiments/heads-stories260k
caft distill --model "$ASSETS/models/stories260k" --output experiments/heads-stories260k/distill.jsonl \
  --prompts "$ASSETS/data/instruct/alpaca-demo/alpaca_en_demo.json:3" \
            "$ASSETS/data/instruct/self-instruct/seed_tasks.jsonl:1" \
            "$ASSETS/data/instruct/mt-bench/mt_bench_question.jsonl:1" \
  --num-prompts 500 --max-new-tokens 128 --batch-size 32
caft train-heads --model "$ASSETS/models/stories260k" --data experiments/heads-stories260k/distill.jsonl \
  --eval-rows 80 --head-train-steps 300 --eval-steps 50 --early-stopping-patience 3 \
  --head-learning-rate 0.001 --per-device-train-batch-size 8 --logging-steps 25 \
  --output-dir experiments/heads-stories260k/run --overwrite-output-dir
