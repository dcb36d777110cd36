#!/usr/bin/env bash
# Head strategies selected from scratch and compared on the counted task (`embedded_count`), where copying heads
# are not enough (about 2 hours on 2 cores).
#   1. before any selection: full cache on both tasks, retrieval at s = 0.6 on 300 validation problems
#      (the task is a test of the claim only if retrieval falls at least 10 points below full);
#   2. heads with each strategy's defaults: rlkv on the counted training split (5 to 9 steps; timed),
#      retrieval, duo;
#   3. greedy, LIMIT test problems (5 to 16 steps): full, rlkv, retrieval, duo at 0.4 / 0.6 / 0.8;
#   4. the best token strategy, picked on 20 validation problems at 0.6, and random (3 seeds), on
#      SMALL_LIMIT test problems;
#   5. reports (by sparsity and by the walk's length), paired sign tests of rlkv against each head
#      strategy, heat maps of the heads each keeps.
# Resumable: every step skips what is already there (kvrl eval resumes its grid cell by cell).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-results/counted}
LIMIT=${LIMIT:-500}
SMALL_LIMIT=${SMALL_LIMIT:-100}
KVRL=${KVRL:-.venv/bin/kvrl}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"

"$KVRL" embedded evaluate --task embedded --limit 500 --batch-size 32
"$KVRL" embedded evaluate --task embedded_count --split validation --limit 300 --batch-size 32

select_heads() {  # NAME KVRL_SELECT_OPTIONS...
    local name=$1; shift
    [ -f "$OUT/heads-$name.safetensors" ] && return
    /usr/bin/time -f "$name select: %e s wall" "$KVRL" select "$@" --output "$OUT/heads-$name.safetensors"
}
select_heads rlkv --strategy rlkv --data embedded-count
select_heads retrieval --strategy retrieval
select_heads duo --strategy duo
"$KVRL" embedded evaluate --task embedded_count --split validation --limit 300 --batch-size 32 \
    --heads "$OUT/heads-retrieval.safetensors" --sparsity 0.6

HEADS="rlkv=$OUT/heads-rlkv.safetensors,retrieval=$OUT/heads-retrieval.safetensors,duo=$OUT/heads-duo.safetensors"
"$KVRL" eval --tasks embedded_count --strategy rlkv,retrieval,duo --heads "$HEADS" --sparsity 0.4,0.6,0.8 \
    --limit "$LIMIT" --batch-size 32 --output "$OUT/grid"

TOKEN=$("$PYTHON" experiments/pick_token_strategy.py --task embedded_count --sparsity 0.6 --limit 20 --strategies snapkv,h2o,rkv --batch-size 20 | tee /dev/stderr | tail -1 | sed 's/.*: \([a-z0-9_-]*\) (.*/\1/')
"$KVRL" eval --tasks embedded_count --strategy "$TOKEN,random" --seeds 0,1,2 --sparsity 0.4,0.6,0.8 \
    --limit "$SMALL_LIMIT" --batch-size 50 --output "$OUT/grid-small"

for grid in "$OUT/grid" "$OUT/grid-small"; do "$KVRL" report "$grid" --by hops; done
SAMPLES="$OUT/grid/samples/embedded_count"
for s in 0.4 0.6 0.8; do
    for other in retrieval duo; do
        "$KVRL" report paired "$SAMPLES/rlkv-s$s-seed0.jsonl" "$SAMPLES/$other-s$s-seed0.jsonl"
    done
    for seed in 0 1 2; do  # on the SMALL_LIMIT problems random ran
        "$KVRL" report paired "$SAMPLES/rlkv-s$s-seed0.jsonl" "$OUT/grid-small/samples/embedded_count/random-s$s-seed$seed.jsonl" --common
    done
done
"$PYTHON" - "$OUT" <<'PY'
import sys
from kvpress_rl.evaluators.plots import gate_heatmaps
from kvpress_rl.scores import HeadScores
out = sys.argv[1]
panels = [(f"{name} ({'counted, 5-9 steps' if name == 'rlkv' else 'haystack' if name == 'retrieval' else 'passkey'})",
           HeadScores.load(f"{out}/heads-{name}.safetensors")) for name in ("rlkv", "retrieval", "duo")]
print(gate_heatmaps(panels, f"{out}/heads.png", kept_at=0.6))
PY
