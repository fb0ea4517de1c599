#!/usr/bin/env bash
# The test command of the README (and of .ci/run): lint, compile the CUDA sources, run the tests.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
echo "== ruff" >&2
ruff check .
echo "== nvcc: compile every csrc/cuda/*.cu to an object file" >&2
bash scripts/compile_cuda.sh
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # the docs test renders pages in headless Chromium (it skips, saying so, without one)
  echo "== apt-get install chromium (for the docs render test)" >&2
  { apt-get update -qq && apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "chromium could not be installed: the docs render test will skip" >&2
fi
echo "== pytest (torch, cpp and triton-interpreter lanes)" >&2
export TRITON_INTERPRET=1
exec python -m pytest -q -p no:cacheprovider "$@"
