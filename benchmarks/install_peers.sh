#!/usr/bin/env bash
# Installs the peer libraries the benchmarks compare against into the active Python environment.
# --no-deps is essential: their declared dependencies make pip replace the CPU torch wheel with a
# multi-GB CUDA build (and pull torchvision, which no library here imports on the measured paths).
set -euo pipefail
PY="${PYTHON:-python}"
"$PY" -m pip install --disable-pip-version-check --no-deps backpack-for-pytorch==1.7.1 nngeometry==0.4 curvlinops-for-pytorch==3.0.1 unfoldNd==0.2.3 einconv==0.1.0 einops==0.8.2 opt_einsum==3.4.0 linear_operator==0.6.1 tqdm kronfluence==1.0.1 accelerate==1.15.0
"$PY" - <<'PYEOF'
import importlib

for mod in ("backpack", "nngeometry", "curvlinops", "kronfluence"):
    try:
        importlib.import_module(mod)
        print(f"{mod}: ok")
    except Exception as exc:  # report, do not fail: the benchmarks record a missing peer
        print(f"{mod}: cannot be imported ({type(exc).__name__}: {exc})")
PYEOF
