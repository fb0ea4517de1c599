"""What the GPU a launcher runs on can compile: Triton's float64 ``tl.dot`` needs sm_90.

Triton lowers a float64 ``tl.dot`` to the ``mma.m16n8k16`` instruction with double operands,
which ``ptxas`` accepts only for sm_90 and newer; on sm_80/sm_86/sm_89 such a kernel does not
compile (found by :mod:`fimfast.ops.triton.aot`). The launchers whose kernels use ``tl.dot``
(``sq_matmul``, ``shared_sq``) therefore run float64 inputs on an older GPU through the torch
reference (cuBLAS, whose float64 GEMM uses the sm_80 double tensor cores), and keep the Triton
kernel for float32 and lower everywhere and float64 on sm_90+. (``lm_head_probe`` runs float64
through its composite on every GPU.)

:data:`TARGET_CC` pins the capability the launchers see; the AOT recorder sets it per target so
the specialisations it compiles are those each GPU would run.
"""

from __future__ import annotations

import torch

TARGET_CC: tuple[int, int] | None = None


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """``(major, minor)`` of ``device`` (or :data:`TARGET_CC`); None for a CPU (interpreter)."""
    if TARGET_CC is not None:
        return TARGET_CC
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return None


def fp64_dot(device: torch.device) -> bool:
    """Whether a float64 ``tl.dot`` compiles for ``device`` (sm_90+, or the interpreter)."""
    cc = cuda_capability(device)
    return cc is None or cc >= (9, 0)
