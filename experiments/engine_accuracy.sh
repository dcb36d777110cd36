#!/usr/bin/env bash
# The counted task's grid through both engines (transformers = the executor, vllm = the plugin), 100 test
# problems, the committed RLKV heads at s = 0.6 and 0.8, float32, greedy; then cell by cell: accuracy and answers.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/engines}
GRID=(--tasks embedded_count --strategy rlkv --heads benchmarks/results/heads-rlkv-embedded-count.safetensors --sparsity 0.6,0.8 --limit 100 --batch-size 32)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=2
.venv/bin/kvrl eval "${GRID[@]}" --engine transformers --output "$OUT/transformers"
.venv/bin/kvrl eval "${GRID[@]}" --engine vllm --output "$OUT/vllm"
.venv/bin/kvrl report engines "$OUT/transformers" "$OUT/vllm"
