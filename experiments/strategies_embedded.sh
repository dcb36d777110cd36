#!/usr/bin/env bash
# Head strategies selected and compared on the embedded links task, rlkv's ablations and training seeds
# (about 2.5 hours on 2 cores).
#   1. head scores with each strategy's defaults: rlkv (timed: the 15-minute bar), retrieval, duo,
#      and the two rlkv ablations (constant L1 weight, no self-distillation);
#   2. greedy, LIMIT test problems: full cache; rlkv at 0.5 (the 97%-of-full bar); rlkv, retrieval,
#      duo and random (3 seeds) at 0.6 and 0.8 (the "beats every head strategy" bar);
#   3. the rest of the grid (0.2, 0.4) and the ablations at 0.6 on SMALL_LIMIT problems;
#   4. the reports (PNG + markdown) and paired sign tests of rlkv against retrieval and duo;
#   5. rlkv trained with seeds 1 and 2 (other training problems and rollouts), at 0.6 and 0.8 on
#      LIMIT problems: how much of a grid cell is the training seed (about 50 minutes more).
# Resumable: every step skips what is already there (kvrl eval resumes its grid cell by cell).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/embedded}
LIMIT=${LIMIT:-500}
SMALL_LIMIT=${SMALL_LIMIT:-100}
KVRL=${KVRL:-.venv/bin/kvrl}
mkdir -p "$OUT"

select_heads() {  # NAME KVRL_SELECT_OPTIONS...
    local name=$1; shift
    [ -f "$OUT/heads-$name.safetensors" ] && return
    /usr/bin/time -f "$name select: %e s wall" "$KVRL" select "$@" --output "$OUT/heads-$name.safetensors"
}
select_heads rlkv --strategy rlkv
select_heads retrieval --strategy retrieval
select_heads duo --strategy duo
select_heads rlkv-constant-l1 --strategy rlkv --no-adaptive-penalty
select_heads rlkv-no-sd --strategy rlkv --no-self-distillation

HEADS="rlkv=$OUT/heads-rlkv.safetensors,retrieval=$OUT/heads-retrieval.safetensors,duo=$OUT/heads-duo.safetensors"
$KVRL eval --strategy rlkv --heads "$OUT/heads-rlkv.safetensors" --sparsity 0.5,0.6,0.8 --limit "$LIMIT" --batch-size 32 --output "$OUT/grid-$LIMIT"
$KVRL eval --strategy retrieval,duo,random --heads "$HEADS" --seeds 0,1,2 --sparsity 0.6,0.8 --limit "$LIMIT" --batch-size 32 --output "$OUT/grid-$LIMIT"
$KVRL eval --strategy rlkv,retrieval,duo,random --heads "$HEADS" --seeds 0,1,2 --sparsity 0.2,0.4,0.6,0.8 --limit "$SMALL_LIMIT" --batch-size 32 \
    --output "$OUT/grid-$SMALL_LIMIT"
for ablation in rlkv-constant-l1 rlkv-no-sd; do
    $KVRL eval --strategy rlkv --heads "$OUT/heads-$ablation.safetensors" --sparsity 0.6 --limit "$SMALL_LIMIT" --batch-size 32 --output "$OUT/$ablation"
done
$KVRL report "$OUT/grid-$LIMIT"
$KVRL report "$OUT/grid-$SMALL_LIMIT"
SAMPLES="$OUT/grid-$LIMIT/samples/embedded"
for pair in "rlkv-s0.6 retrieval-s0.6" "rlkv-s0.6 duo-s0.6" "rlkv-s0.8 retrieval-s0.8" "rlkv-s0.8 duo-s0.8"; do
    set -- $pair
    "$KVRL" report paired "$SAMPLES/$1-seed0.jsonl" "$SAMPLES/$2-seed0.jsonl"
done

for seed in 1 2; do
    select_heads "rlkv-seed$seed" --strategy rlkv --seed "$seed"
    $KVRL eval --strategy rlkv --heads "$OUT/heads-rlkv-seed$seed.safetensors" --sparsity 0.6,0.8 --limit "$LIMIT" --batch-size 32 \
        --output "$OUT/rlkv-seed$seed-$LIMIT"
done
.venv/bin/python - "$OUT" <<'PY'
import sys
from kvpress_rl.evaluators.plots import gate_heatmaps
from kvpress_rl.scores import HeadScores
out = sys.argv[1]
files = [("rlkv, training seed 0", "rlkv"), ("rlkv, training seed 1", "rlkv-seed1"), ("rlkv, training seed 2", "rlkv-seed2"), ("retrieval", "retrieval")]
panels = [(title, HeadScores.load(f"{out}/heads-{name}.safetensors")) for title, name in files]
print(gate_heatmaps(panels, f"{out}/rlkv_gates_seeds.png", kept_at=0.8))
PY
