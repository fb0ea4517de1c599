#!/usr/bin/env bash
# The test command of the README (and of .ci/run): lint, compile the CUDA sources, run the tests.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
echo "== ruff" >&2
ruff check .
echo "== nvcc: compile every csrc/cuda/*.cu to an object file" >&2
bash scripts/compile_cuda.sh
echo "== pytest (torch, cpp and triton-interpreter lanes)" >&2
export TRITON_INTERPRET=1
exec python -m pytest -q -p no:cacheprovider "$@"
