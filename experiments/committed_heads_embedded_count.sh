#!/usr/bin/env bash
# The counted task's grid and the embedded_long frontier of the committed heads (benchmarks/results/heads-*), with
# the shipped adapter, the code of one commit: the figures of docs/results.md.
#   1. the counted grid on its new test problems (no walk's last word links to itself), 500 problems, greedy:
#      full, rlkv, retrieval, duo at 0.4 / 0.6 / 0.8 (heads-*-embedded-count.safetensors);
#   2. the frontier on embedded_long (experiments/frontier_embedded_long.sh) with the committed rlkv and retrieval heads
#      (rlkv's chosen on the counted task, 5 to 9 steps; retrieval's scores do not depend on the task);
#   3. random (3 seeds) and R-KV on the first 100 counted test problems at 0.6 / 0.8;
#   4. full cache and retrieval at 0.6 on 300 counted validation problems (the task's bar).
# About 2 hours alone on 2 cores. Resumable: kvrl eval resumes its finished cells.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-results/committed-heads-count}
KVRL=${KVRL:-.venv/bin/kvrl}
R=benchmarks/results
mkdir -p "$OUT"

HEADS="rlkv=$R/heads-rlkv-embedded-count.safetensors,retrieval=$R/heads-retrieval-embedded-count.safetensors,duo=$R/heads-duo-embedded-count.safetensors"
"$KVRL" eval --tasks embedded_count --strategy rlkv,retrieval,duo --heads "$HEADS" --sparsity 0.4,0.6,0.8 \
    --limit 500 --batch-size 32 --output "$OUT/count-500"

KVRL="$KVRL" OUT="$OUT/frontier" RLKV_HEADS="$R/heads-rlkv-embedded-count.safetensors" \
    RETRIEVAL_HEADS="$R/heads-retrieval-embedded-count.safetensors" bash experiments/frontier_embedded_long.sh

"$KVRL" eval --tasks embedded_count --strategy rkv,random --seeds 0,1,2 --sparsity 0.6,0.8 \
    --limit 100 --batch-size 50 --output "$OUT/count-100"

"$KVRL" embedded evaluate --task embedded_count --split validation --limit 300 --batch-size 32
"$KVRL" embedded evaluate --task embedded_count --split validation --limit 300 --batch-size 32 \
    --heads "$R/heads-retrieval-embedded-count.safetensors" --sparsity 0.6

"$KVRL" report "$OUT/count-500" --by hops
"$KVRL" report "$OUT/count-100"
echo DONE
