#!/usr/bin/env bash
# On a lent GPU (one H200; its own image: Python 3.12, torch, transformers, accelerate, peft, pluggy, rich,
# click, safetensors, setuptools; no network, no lm-eval, math-verify or gguf), in under 10 minutes:
#   1. the project installed without dependencies;
#   2. two RLKV learner steps on a random-weight model with the full Qwen2.5-7B layout (28 layers), bf16,
#      4 prompts x 4 samples x 2,048 tokens (128 prompt + 1,920 sampled by the gated model), activation
#      checkpointing and micro-batches of 7,680 tokens (the official settings): peak memory
#      (torch.cuda.max_memory_allocated) and tokens per second (benchmarks/rlkv_step.py);
#   3. the gated model's decoding attention against full attention (benchmarks/plan_attention_gpu.py --gated);
#   4. the executor's decode benchmark at 32k, batch 8 (benchmarks/executor_gpu.sh).
# Results go to $OUT (default benchmarks/results): rlkv_step_gpu.json / .txt, gated_attention_gpu.txt,
# executor_gpu.csv / .txt.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
export OUT HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
status=0

"$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"

echo "== RLKV learner: 2 steps, Qwen2.5-7B layout, 4 x 4 x 2048 tokens, bf16 =="
timeout 330 "$PYTHON" benchmarks/rlkv_step.py --device cuda --layout qwen2.5-7b --layers 28 --dtype bfloat16 \
  --prompts 4 --samples 4 --seq-len 2048 --steps 2 --json "$OUT/rlkv_step_gpu.json" "$@" 2>&1 | tee "$OUT/rlkv_step_gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "rlkv_step failed or ran past 330 s"; status=1; }

echo "== gated decoding attention (RLKV rollouts): 64 rollouts at 1k, 4k, 7k, Qwen2.5-7B layout =="
timeout 45 "$PYTHON" benchmarks/plan_attention_gpu.py --gated 2>&1 | tee "$OUT/gated_attention_gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gated attention check failed or ran past 45 s"; status=1; }

echo "== executor: decode at 32k, batch 8 =="
timeout 200 bash benchmarks/executor_gpu.sh 2>&1 | tee "$OUT/executor_gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "executor benchmark failed or ran past 200 s"; status=1; }
exit $status
