#!/usr/bin/env bash
# Our streaming and snapkv policies against kvpress's StreamingLLMPress and
# SnapKVPress on one random-weight Llama prefill (which positions each KV head keeps; Jaccard 1.0
# expected). kvpress 0.5.5 pins transformers < 5.3, older than ours, so it gets its own virtual
# environment (.venv-kvpress, ignored by git) with our package installed without dependencies.
# Not part of CI. Usage: bash experiments/kvpress_crosscheck.sh [--tokens 512 --budget 256 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-kvpress}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import kvpress, kvpress_rl" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0 kvpress==0.5.5
    "$VENV/bin/pip" install -q --no-deps -e .
    "$VENV/bin/pip" install -q "pluggy>=1.5" "safetensors>=0.4"  # what importing the executor needs besides torch and transformers
fi
"$VENV/bin/python" experiments/kvpress_crosscheck.py "$@"
