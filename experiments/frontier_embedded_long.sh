#!/bin/bash
# The accuracy / KV-memory frontier on the long embedded task (8 hops, 64 links, ~560 tokens per problem).
set -e
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
K=${KVRL:-.venv/bin/kvrl}
OUT=${OUT:-kvrl-frontier}
COMMON="--tasks embedded_long --limit 100 --batch-size 25 --output $OUT"
$K eval $COMMON --strategy rlkv --heads ${RLKV_HEADS:-heads-rlkv.safetensors} --sparsity 0.6,0.8 --full-policy rkv --full-budget all,0.5,0.25
$K eval $COMMON --strategy retrieval --heads ${RETRIEVAL_HEADS:-heads-retrieval.safetensors} --sparsity 0.6,0.8
$K eval $COMMON --strategy snapkv,rkv --sparsity 0.8,0.9,0.95
$K report $OUT --frontier
echo DONE
