#!/usr/bin/env bash
# Issue 24: every published figure of the counted task and of the frontier re-measured with what is shipped.
#   1. the counted grid on its new test problems (no walk's last word links to itself), 500 problems, greedy,
#      with the committed heads (benchmarks/results/heads-*-embedded-count.safetensors);
#   2. the frontier (embedded_long): rlkv and retrieval heads selected on the links task with the shipped
#      adapter (their defaults; copied to benchmarks/results/ afterwards), then benchmarks/frontier_embedded.sh;
#   3. random (3 seeds) and R-KV on the first 100 counted test problems;
#   4. full cache and retrieval at 0.6 on 300 counted validation problems (the task's bar).
# About 2 hours alone on 2 cores. Resumable: kvrl eval resumes its cells, selections are skipped when present.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-results/issue24}
KVRL=${KVRL:-.venv/bin/kvrl}
R=benchmarks/results
mkdir -p "$OUT"

HEADS="rlkv=$R/heads-rlkv-embedded-count.safetensors,retrieval=$R/heads-retrieval-embedded-count.safetensors,duo=$R/heads-duo-embedded-count.safetensors"
"$KVRL" eval --tasks embedded_count --strategy rlkv,retrieval,duo --heads "$HEADS" --sparsity 0.4,0.6,0.8 \
    --limit 500 --batch-size 32 --output "$OUT/count-500"

[ -f "$OUT/heads-rlkv-embedded.safetensors" ] || \
    /usr/bin/time -f "rlkv select: %e s wall" "$KVRL" select --strategy rlkv --output "$OUT/heads-rlkv-embedded.safetensors"
[ -f "$OUT/heads-retrieval-embedded.safetensors" ] || \
    "$KVRL" select --strategy retrieval --output "$OUT/heads-retrieval-embedded.safetensors"
KVRL="$KVRL" OUT="$OUT/frontier" RLKV_HEADS="$OUT/heads-rlkv-embedded.safetensors" \
    RETRIEVAL_HEADS="$OUT/heads-retrieval-embedded.safetensors" bash benchmarks/frontier_embedded.sh

"$KVRL" eval --tasks embedded_count --strategy rkv,random --seeds 0,1,2 --sparsity 0.6,0.8 \
    --limit 100 --batch-size 50 --output "$OUT/count-100"

"$KVRL" embedded evaluate --task embedded_count --split validation --limit 300 --batch-size 32
"$KVRL" embedded evaluate --task embedded_count --split validation --limit 300 --batch-size 32 \
    --heads "$R/heads-retrieval-embedded-count.safetensors" --sparsity 0.6

"$KVRL" report "$OUT/count-500" --by hops
"$KVRL" report "$OUT/count-100"
echo DONE
