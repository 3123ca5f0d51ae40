#!/usr/bin/env bash
# Build llama-cpp-python from source in its own venv, for
# `kvengine bench decode|throughput --baseline llamacpp` (see README.md here).
# Idempotent: an existing venv whose llama_cpp imports is left as it is.
#
#   bash tools/llamacpp_reference/setup.sh [VENV]     # default: .venv-llamacpp
#
# Needs python3.11+, cmake and a C++ compiler (apt-get install cmake build-essential).
# About 4 minutes on 2 cores. CMAKE_ARGS from the environment are passed through;
# the default builds for this CPU (-DGGML_NATIVE=ON), CPU only.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$repo/.venv-llamacpp}"
python="${PYTHON:-python3.11}"

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "llama.cpp venv ready: $venv ($("$venv/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)'))"
    exit 0
fi

for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install cmake build-essential" >&2; exit 1; }
done

"$python" -m venv "$venv"
"$venv/bin/pip" install --upgrade pip
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" \
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$venv/bin/pip" install --no-binary llama-cpp-python -r "$here/requirements.txt"
"$venv/bin/python" -c "import llama_cpp; print('llama.cpp venv ready:', '$venv', llama_cpp.__version__)"
