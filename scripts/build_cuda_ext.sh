#!/usr/bin/env bash
# Build fimfast._C with its CUDA kernels against the CUDA build of torch==2.13.0, without a GPU.
#
#   bash scripts/build_cuda_ext.sh [--log FILE]
#
# In a separate virtual environment (build/cuda-venv; FIMFAST_CUDA_VENV overrides) it downloads
# torch==2.13.0 from the public index with `pip --isolated` (the cu130 wheel and its nvidia-*
# runtime wheels: about 3 GB, kept in build/cuda-wheels), installs it, installs fimfast from this
# checkout with FIMFAST_BUILD_CUDA=1 (nvcc from CUDA_HOME, default /usr/local/cuda; architectures
# TORCH_CUDA_ARCH_LIST, default "8.0;9.0"), imports fimfast._C (no GPU is needed to load it) and
# checks through torch's dispatcher that every op of the extension has a CUDA kernel.
# The CPU-only environment .venv is not touched. Each step prints its wall time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --log) LOG="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build_cuda_ext.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -n "$LOG" ]; then
  mkdir -p "$(dirname "$LOG")"
  exec > >(tee "$LOG") 2>&1
fi
PY="${FIMFAST_PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi
VENV="${FIMFAST_CUDA_VENV:-$ROOT/build/cuda-venv}"
WHEELS="${FIMFAST_CUDA_WHEELS:-$ROOT/build/cuda-wheels}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
NVCC="$CUDA_HOME/bin/nvcc"
[ -x "$NVCC" ] || { echo "build_cuda_ext.sh: no nvcc at $NVCC (set CUDA_HOME)" >&2; exit 1; }

t0=$SECONDS
step() { echo "== [$((SECONDS - t0)) s] $*"; }

step "environment"
date -u +"%Y-%m-%dT%H:%M:%SZ"
uname -srm
"$PY" --version
"$NVCC" --version | tail -2
echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# --isolated: no pip configuration of this machine (local CPU wheels, constraints) applies
PIP=("$VPY" -m pip --isolated --disable-pip-version-check)

step "download torch==2.13.0 (CUDA) and its dependencies into $WHEELS"
s=$SECONDS
mkdir -p "$WHEELS"
"${PIP[@]}" download -q -d "$WHEELS" torch==2.13.0 numpy setuptools wheel ninja
du -sh "$WHEELS"
ls "$WHEELS" | sed 's/^/  /'
echo "download: $((SECONDS - s)) s"

step "install from $WHEELS"
s=$SECONDS
"${PIP[@]}" install -q --no-index --find-links "$WHEELS" torch==2.13.0 numpy setuptools wheel ninja
"$VPY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
echo "install: $((SECONDS - s)) s"

step "build and install fimfast with FIMFAST_BUILD_CUDA=1"
s=$SECONDS
rm -rf "$ROOT/build/lib."* "$ROOT/build/temp."* "$ROOT/build/bdist."*
set +o pipefail
FIMFAST_BUILD_CUDA=1 PATH="$VENV/bin:$CUDA_HOME/bin:$PATH" \
  "${PIP[@]}" install -v --no-build-isolation --no-deps --no-index "$ROOT" 2>&1 |
  grep -v -E '^\s*(copying|creating|adding) '
rc=${PIPESTATUS[0]}
set -o pipefail
[ "$rc" -eq 0 ] || { echo "build_cuda_ext.sh: pip install failed ($rc)" >&2; exit "$rc"; }
echo "build: $((SECONDS - s)) s"

step "import fimfast._C and check the CUDA kernels in torch's dispatcher"
cd "$(mktemp -d)"  # import the installed fimfast, not the checkout
"$VPY" - <<'EOF'
import os
import subprocess

import torch

import fimfast
from fimfast import _C, _ext
from fimfast.ops import registry

so = _C.__file__
print("fimfast._C:", so, f"({os.path.getsize(so) / 2**20:.1f} MiB)")
ok, why = _ext.load()
assert ok, why
assert _ext.has_cuda(), "fimfast._C was built without its CUDA kernels (see the build log above)"
# every op the extension defines (TORCH_LIBRARY(fimfast, ...)) must have a CPU kernel, and a
# CUDA kernel where the backend registry names a cuda backend for it; an op without one (a
# CPU-only kernel) is never called on a CUDA tensor: the registry runs its torch backend there
ops = sorted(
    name.split("::", 1)[1]
    for name in torch._C._dispatch_get_all_op_names()
    if name.startswith("fimfast::")
)
cuda_ops = sorted(op for op, impls in registry._IMPLS.items() if "cuda" in impls)
missing = []
for op in ops:
    keys = {k: torch._C._dispatch_has_kernel_for_dispatch_key(f"fimfast::{op}", k)
            for k in ("CPU", "CUDA", "Meta")}
    wants_cuda = op in cuda_ops
    print(f"  fimfast::{op:<18} " + " ".join(f"{k}={'yes' if v else 'NO'}" for k, v in keys.items())
          + ("" if wants_cuda else "  (CPU only: the torch backend on CUDA tensors)"))
    if not keys["CPU"] or (wants_cuda and not keys["CUDA"]):
        missing.append(op)
# ops whose cuda backend is a composite (lm_head_probe) run on the ops above
for op in cuda_ops:
    if op not in ops:
        print(f"  {op}: cuda backend composed of the ops above ({registry._IMPLS[op]['cuda']})")
assert ops, "fimfast._C registered no ops"
assert not missing, f"ops without their CPU or CUDA kernel: {missing}"
# cuobjdump: the toolkit's, else the one triton ships
import triton.backends.nvidia as nv  # noqa: E402

cuobjdump = next((p for p in (os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"),
                              os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump"))
                  if os.path.exists(p)), None)
if cuobjdump is not None:
    out = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True).stdout
    archs = sorted({line.rsplit(".", 2)[-2] for line in out.splitlines() if ".sm_" in line})
    print("cubins in fimfast._C:", ", ".join(archs) or "none")
    assert archs, "fimfast._C holds no cubin"
    use = subprocess.run([cuobjdump, "--dump-resource-usage", so], capture_output=True,
                         text=True).stdout
    import re  # noqa: E402

    arch, worst = None, {}
    for line in use.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m:
            reg, stack, shared, local = map(int, m.groups())
            w = worst.setdefault(arch, [0, 0, 0, 0, 0])
            w[0] += 1
            w[1:] = [max(w[1], reg), max(w[2], stack), max(w[3], shared), max(w[4], local)]
    for arch, (n, reg, stack, shared, local) in sorted(worst.items()):
        print(f"  {arch}: {n} kernels, at most {reg} registers, {shared} B static shared, "
              f"{stack} B stack, {local} B local")
        # a small stack frame holds registers saved around calls (ptxas -v reports them as spill
        # stores); local memory would be a spilled or dynamically indexed array
        assert local == 0, f"a CUDA kernel uses local memory on {arch}"
n_cuda = sum(op in cuda_ops for op in ops)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), fimfast {fimfast.__version__}: "
      f"{len(ops)} ops, {n_cuda} with CUDA kernels")
EOF
step "done"
