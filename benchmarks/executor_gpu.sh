#!/usr/bin/env bash
# The executor benchmark on a lent GPU: Qwen2.5-7B layout (28 layers, 28 query / 4 KV heads, head
# dim 128), bf16, 32k context, batch 8. Prints the same table as benchmarks/executor.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/executor.py --layout qwen2.5-7b --layers 28 --dtype bfloat16 --device cuda \
  --lengths 32768 --batches 8 --steps 20 --warmup 5 --output "${OUT:-benchmarks/results}/executor_gpu.csv" "$@"
