"""``nn.MultiheadAttention``'s self-attention in fewer copies, for the one-backward estimators.

A HUTCHINSON-family step differentiates the model's own forward. In a training-mode forward with
gradients, torch's ``nn.MultiheadAttention`` runs ``F.multi_head_attention_forward``: on a
sequence-first view of the input, the packed input projection is copied into a ``(3, L, N, E)``
tensor and selected into q, k and v, whose backward writes each gradient into a zeroed
``(3, L, N, E)`` tensor and adds the three. :func:`forward` computes the same function for
self-attention without masks, weights or dropout (``nn.TransformerEncoderLayer``'s call): one
``linear`` for q, k and v on the input as it is, viewed per head and unbound (their gradients
stacked into place), ``scaled_dot_product_attention``, the context copied once into torch's
sequence-first layout and the output projection on it. The output has torch's values to
rounding (bit for bit with the CPU's AVX-512 kernels; 1.7e-16 apart in float64 with AVX2 ones,
whose GEMM rounds the projection of the two layouts differently; tests/test_lean_mha.py) and
torch's layout (a contiguous sequence-first tensor, batch-first a transposed view of it); the
parameters' gradients are the same sums formed on other layouts, equal up to rounding (a relative
5e-7 in float32 on workload (e) of ``benchmarks/workloads.py``). On that workload a training step
runs 1.0-1.5 ms (9-13%) faster this way (``benchmarks/results/hutch_e_cpu_2026-12-07.md``).

Any other call (masks, ``need_weights``, ``is_causal``, separate key or value, separate
projection weights, parametrized projection weights (``spectral_norm`` on ``out_proj``: computed
as often as torch's forward computes it), ``bias_k``, ``add_zero_attn``, dropout while training,
unbatched or nested inputs, gradients disabled, saved-tensor hooks active (a non-reentrant
checkpoint segment, whose recomputation runs torch's forward and must save the same tensors), a
``__torch_function__`` argument, a class ``forward`` that is not torch's) runs torch's forward,
which also raises torch's errors. :class:`fimfast.nograd.NogradWatch` calls :func:`forward` for
a watched ``nn.MultiheadAttention`` (the class itself, not a subclass) without an instance
``forward`` of its own, where its caller asks (``lean``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fimfast.hooks import saved_tensor_hooks_active

__all__ = ["forward"]

_TORCH = nn.MultiheadAttention.forward


def forward(mod: nn.MultiheadAttention, *args: Any, **kwargs: Any) -> Any:
    """``mod(*args, **kwargs)``: the lean self-attention where it applies (module docstring),
    ``type(mod).forward`` otherwise."""
    if type(mod).forward is not _TORCH or not _plain(mod, args, kwargs):
        return type(mod).forward(mod, *args, **kwargs)
    x = args[0]
    q = x if mod.batch_first else x.transpose(0, 1)
    N, L, E = q.shape
    H = mod.num_heads
    qkv = F.linear(q, mod.in_proj_weight, mod.in_proj_bias)
    qq, kk, vv = qkv.view(N, L, 3, H, E // H).permute(2, 0, 3, 1, 4).unbind(0)
    ctx = F.scaled_dot_product_attention(qq, kk, vv)  # (N, H, L, hd)
    ctx = ctx.permute(2, 0, 1, 3).reshape(L, N, E)  # torch's layout: sequence-first, contiguous
    out = F.linear(ctx, mod.out_proj.weight, mod.out_proj.bias)
    return (out.transpose(0, 1) if mod.batch_first else out), None


_NAMES = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
          "average_attn_weights", "is_causal")
_DEFAULTS = (None, None, None, None, True, None, True, False)


def _plain(mod: nn.MultiheadAttention, args: tuple, kwargs: dict) -> bool:
    """Whether the call is self-attention the lean forward computes (see the module docstring)."""
    if len(args) > len(_NAMES) or any(k not in _NAMES for k in kwargs):
        return False
    a = dict(zip(_NAMES, _DEFAULTS))
    a.update(zip(_NAMES, args))
    a.update(kwargs)
    x = a["query"]
    return (
        type(x) is torch.Tensor
        and x is a["key"]
        and x is a["value"]
        and a["key_padding_mask"] is None
        and a["attn_mask"] is None
        and a["need_weights"] is False
        and a["is_causal"] is False
        and x.dim() == 3
        and not x.is_nested
        and torch.is_grad_enabled()
        and not saved_tensor_hooks_active()  # a checkpoint's recomputation runs torch's forward
        and mod._qkv_same_embed_dim
        # a parametrized projection weight: read as torch's forward reads it (a parametrization
        # computed once more changes it where it changes at each computation: spectral_norm)
        and not parametrize.is_parametrized(mod)
        and not parametrize.is_parametrized(mod.out_proj)
        and mod.in_proj_weight is not None
        and mod.bias_k is None
        and mod.bias_v is None
        and not mod.add_zero_attn
        and (mod.dropout == 0.0 or not mod.training)
        and x.shape[-1] == mod.embed_dim
        and not torch._C._has_torch_function(
            (mod.in_proj_weight, mod.out_proj.weight, *_set(mod.in_proj_bias, mod.out_proj.bias))
        )
    )


def _set(*ts: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in ts if t is not None)
