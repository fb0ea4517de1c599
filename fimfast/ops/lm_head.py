"""``lm_head_probe``: the HUTCHINSON output factor fused with a Linear output head.

For an LM head ``z = h W^T + b`` with ``V`` classes, one probe of the HUTCHINSON family needs the
cotangent ``u = dh/dz`` only through ``u W`` (the gradient at the head's input) and ``u^T h``,
``sum_r u_r`` (the head's own gradients). The rows are processed in chunks: each chunk forms its
logits, its probe factor and its three products, and is dropped, so that no ``(R, V)`` tensor
(neither the logits nor the cotangent) exists at any time (the idea of Cut Cross-Entropy,
Wijmans et al. 2024, applied to the probe instead of the loss).

The implementations here are composites: the logits and products are ``torch`` matmuls, the probe
factor of each chunk comes from :func:`fimfast.ops.probe_logit_grad` of the backend named in the
registry entry (``torch``, ``cpp``, ``cuda`` or ``triton``).
"""

from __future__ import annotations

import torch

from fimfast import chunks
from fimfast.dtypes import compute_dtype
from fimfast.ops.softmax_rest import mix_at

# float32 logits per row chunk: 2M entries (8 MiB). The chunk's logits, probabilities, signs and
# factor (four such buffers) stay far below the (R, V) cotangent of the unfused path, and chunks of
# >= 64 rows (V = 32k) keep the rank-``rows`` update of the (V, d) weight gradient efficient
CHUNK_ELEMS = 1 << 21


def default_row_chunk(V: int) -> int:
    """Rows per chunk for ``V`` classes (at least 1)."""
    return chunks.rows_per_chunk(V, CHUNK_ELEMS)


def _factor(z: torch.Tensor, mode: str, seed: int, offset: int, probe_backend: str) -> torch.Tensor:
    """``(rows, V)`` factor ``u = dh/dz`` of one probe, as the unfused HUTCHINSON step forms it."""
    from fimfast import ops

    u = ops.probe_logit_grad(z, mode, seed, offset, 1, backend=probe_backend)[0]
    if mode == "sqrt":
        # h = sum_c w_c log p_c(z): its gradient w - p sum(w), as fimfast.hutchinson forms it
        u = mix_at(u, z)
    return u


def lm_head_probe_composite(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mode: str,
    seed: int,
    offset: int,
    row_chunk: int | None,
    probe_backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Chunked ``lm_head_probe`` (see :func:`fimfast.ops.lm_head_probe`), probes from
    ``probe_backend``."""
    R, _ = hidden.shape
    V = weight.shape[0]
    dt = compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
    chunk = default_row_chunk(V) if row_chunk is None else int(row_chunk)
    with torch.no_grad():
        W = weight.detach().to(dt)  # a view when the weight already has the compute dtype
        b = None if bias is None else bias.detach().to(dt)
        h = hidden.detach()
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_w = torch.zeros((V, W.shape[1]), dtype=dt, device=W.device)
        grad_b = None if bias is None else torch.zeros((V,), dtype=dt, device=W.device)
        for r0 in range(0, R, chunk):
            r1 = min(R, r0 + chunk)
            hc = h[r0:r1].to(dt)
            z = hc @ W.t() if b is None else torch.addmm(b, hc, W.t())
            u = _factor(z, mode, seed, offset + r0 * V, probe_backend)
            del z
            grad_hidden[r0:r1] = u @ W
            grad_w.addmm_(u.t(), hc)
            if grad_b is not None:
                grad_b += u.sum(0)
            del u
    return grad_hidden, grad_w, grad_b


def lm_head_probe_torch(hidden, weight, bias, mode, seed, offset, row_chunk):
    """Reference: chunked matmuls and the torch reference of ``probe_logit_grad``."""
    return lm_head_probe_composite(hidden, weight, bias, mode, seed, offset, row_chunk, "torch")


def lm_head_probe_cpp(hidden, weight, bias, mode, seed, offset, row_chunk):
    """Chunked matmuls and the cpp kernel of ``probe_logit_grad`` (CPU tensors)."""
    return lm_head_probe_composite(hidden, weight, bias, mode, seed, offset, row_chunk, "cpp")


def lm_head_probe_cuda(hidden, weight, bias, mode, seed, offset, row_chunk):
    """Chunked matmuls and the CUDA kernel of ``probe_logit_grad`` (CUDA tensors)."""
    return lm_head_probe_composite(hidden, weight, bias, mode, seed, offset, row_chunk, "cuda")


def lm_head_probe_triton(hidden, weight, bias, mode, seed, offset, row_chunk):
    """Chunked matmuls and the Triton kernel of ``probe_logit_grad``."""
    return lm_head_probe_composite(hidden, weight, bias, mode, seed, offset, row_chunk, "triton")
