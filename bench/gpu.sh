#!/usr/bin/env bash
# The engine benchmark on CUDA, for a GPU machine with no network. CI never runs it.
#
#   bench/gpu.sh prepare   # here, with network: fills .gpu/ (wheels, tokenizer, config), git-ignored
#   bench/gpu.sh run       # there, from the repo root with .gpu/ carried along: runs
#                          # tests/test_engine.py on the GPU, then prints the benchmark's JSON
#
# The GPU image is expected to have python3 with torch and transformers (as the
# lent H100/H200 machines do); what it lacks travels as wheels in .gpu/wheels.
# The default model's GGUF is too big to carry, so `run` builds a random-weight
# model with its exact config and tokenizer (the benchmark ignores the end token,
# so the weights' values do not matter for speed).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
PY_VERSION=${PY_VERSION:-3.12}   # the GPU image's Python
PYTHON=${PYTHON:-python3}        # there, the python3 that holds torch
DEVICE=${DEVICE:-cuda}           # DEVICE=cpu PYTHON=.venv/bin/python SKIP_WHEELS=1 tries `run` here

prepare() {
    grep -qx "/$GPU_DIR/" .git/info/exclude 2>/dev/null || echo "/$GPU_DIR/" >> .git/info/exclude
    rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR/wheels"
    local platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp "${platforms[@]}" -d "$GPU_DIR/wheels" msgspec
    python3 -m pip download --quiet --no-deps -d "$GPU_DIR/wheels" gguf
    .venv/bin/python -m bench.gpu_prepare "$GPU_DIR" >/dev/null
    du -sh "$GPU_DIR"
}

run() {
    if [[ -z "${SKIP_WHEELS:-}" ]]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/cortex-site "$GPU_DIR"/wheels/*.whl
    fi
    mkdir -p /tmp/cortex-gpu/cortex
    # The repo root is the `cortex` package (see pyproject's package-dir).
    for pkg in protocol broker gateway worker; do ln -sfn "$PWD/$pkg" "/tmp/cortex-gpu/cortex/$pkg"; done
    export PYTHONPATH="/tmp/cortex-gpu:/tmp/cortex-site:$PWD" PYTHONUNBUFFERED=1
    rm -rf /tmp/cortex-gpu/smollm2-random && cp -r "$GPU_DIR/smollm2-random" /tmp/cortex-gpu/
    "$PYTHON" - <<'PY'
import torch
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained("/tmp/cortex-gpu/smollm2-random")
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config).save_pretrained("/tmp/cortex-gpu/smollm2-random")
PY
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    # The engine's correctness tests (batched = alone token for token, cancellation, stops) on
    # this device first; the benchmark's JSON stays the last line printed.
    local tests_rc=0
    CORTEX_TEST_DEVICE="$DEVICE" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_engine.py >&2 || tests_rc=$?
    "$PYTHON" -m bench.engine --device "$DEVICE" --models "$GPU_DIR/models.toml" --model smollm2-random \
        --tokens "${TOKENS:-128}" --levels "${LEVELS:-1,4,16,32,64}"
    return "$tests_rc"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
