#!/usr/bin/env bash
# Stand-in for the GPU machine's image, on a CPU: a fresh virtual environment holding only the image's
# packages (torch, here the CPU wheel 2.13.0 standing in for 2.11; transformers 5.17; accelerate, peft,
# pluggy, rich, click, safetensors, setuptools; no lm-eval, math-verify or gguf), the project installed
# the way benchmarks/rlkv_gpu.sh installs it (--no-deps --no-build-isolation, from a copy of the working
# tree), then the GPU benchmarks' CPU smoke runs. An import of anything the image lacks fails here.
#
#   experiments/gpu_image_check.sh            # about 3 minutes with the downloads; VENV=... and PYTHON=... to change
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/gpu-image-venv}
PYTHON=${PYTHON:-python3.11}  # the torch CPU wheel at hand is for CPython 3.11 (the image: 3.12)
SRC=$(mktemp -d /tmp/gpu-image-src.XXXXXX)
trap 'rm -rf "$SRC"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONWARNINGS=ignore

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 'transformers==5.17.*' accelerate peft pluggy rich click safetensors setuptools
# what the device machine receives: tracked files and untracked ones git does not ignore
git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - | tar -xf - -C "$SRC"
(cd "$SRC" && "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .)
"$VENV/bin/pip" list --format=freeze | grep -iE '^(torch|transformers|accelerate|peft|pluggy|rich|click|safetensors|setuptools|kvpress)' || true
for missing in lm_eval math_verify gguf; do
  if "$VENV/bin/python" -c "import $missing" 2>/dev/null; then echo "FAIL: $missing is importable in $VENV"; exit 1; fi
done
echo "absent, as on the image: lm_eval math_verify gguf"

cd "$SRC"
echo "== benchmarks/rlkv_step.py (CPU smoke) =="
"$VENV/bin/python" benchmarks/rlkv_step.py --device cpu --layers 2 --seq-len 256 --json "$SRC/rlkv_step.json"
"$VENV/bin/python" - "$SRC/rlkv_step.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
assert len(report["steps"]) == 2 and all(step["grad_abs_sum"] > 0 for step in report["steps"]), report["steps"]
print("rlkv_step: 2 steps, gate gradients non-zero")
PY
echo "== benchmarks/executor.py (CPU smoke) =="
"$VENV/bin/python" benchmarks/executor.py --layers 2 --lengths 256 --batches 1 --sparsities 0,0.5 --steps 2 --warmup 1 \
  --output "$SRC/executor.csv"
echo "== kvrl (the CLI loads without the missing packages) =="
"$VENV/bin/kvrl" --version
"$VENV/bin/kvrl" strategies >/dev/null && echo "kvrl strategies: ok"
"$VENV/bin/python" -c "import sys, kvpress_rl.strategies.rlkv.learner; bad = [m for m in ('lm_eval', 'math_verify', 'gguf') if m in sys.modules]; assert not bad, bad; print('learner imports none of lm_eval, math_verify, gguf')"
echo "gpu image check: OK"
