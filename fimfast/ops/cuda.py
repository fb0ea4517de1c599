"""The ``cuda`` backend: CUDA kernels of ``fimfast._C`` (``csrc/cuda/<op>.cu``) behind the contracts
of :mod:`fimfast.ops.torch_ref`.

The ops are the ``torch.ops.fimfast.*`` of the ``cpp`` backend; torch dispatches a CUDA tensor to
the CUDA kernels (``TORCH_LIBRARY_IMPL(fimfast, CUDA, ...)`` in ``csrc/cuda/*_binding.cpp``), which
exist only when the extension was built against a CUDA torch. Importing this module raises
ImportError otherwise.
"""

from __future__ import annotations

from fimfast import _ext

_ok, _why = _ext.load()
if not _ok:
    raise ImportError(_why)
if not _ext.has_cuda():
    raise ImportError("fimfast._C was built without CUDA kernels (no CUDA toolkit or CPU torch)")

# the same torch.ops.fimfast.* wrappers as the cpp backend: torch picks the kernel by device
from fimfast.ops import cpp  # noqa: E402  (after the extension check)

probe_logit_grad_cuda = cpp.probe_logit_grad_cpp
core_topk_cuda = cpp.core_topk_cpp
sq_matmul_cuda = cpp.sq_matmul_cpp
shared_sq_cuda = cpp.shared_sq_cpp
accumulate_cuda_ = cpp.accumulate_cpp_

__all__ = [
    "accumulate_cuda_",
    "core_topk_cuda",
    "probe_logit_grad_cuda",
    "shared_sq_cuda",
    "sq_matmul_cuda",
]
