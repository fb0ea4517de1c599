"""Scaled dot-product attention as one autograd node whose backward takes a batch of backward
columns in a few batched products.

The engine's batched backward (``autograd.grad(..., is_grads_batched=True)``, batched by
``torch._vmap_internals``) has no batching rule for the CPU attention's backward
(``_scaled_dot_product_flash_attention_for_cpu_backward``): it runs the op once per column and
stacks the results. With the attention probabilities ``P = softmax(s q k^T + mask)`` of the
forward, the gradients of one column ``g`` of the output ``o = P v`` are products that batch
over the columns as they are (docs/math.md §4, "Attention"):

    dv = P^T g,   dS = P * (g v^T - rowsum(P * g v^T)),   dq = s dS k,   dk = s dS^T q.

``P`` is formed once per step from the forward's log-sum-exp (``exp(s q k^T + mask - lse)``, the
probabilities the forward normalised), and each product runs once over the ``N H`` heads with
the columns side by side. The node's inputs are the projections' outputs the query, key and
value are cut from (a packed ``(N, L, 3 E)`` one for self-attention) and the ``bias_k``/``bias_v``
rows appended to the keys and values (:class:`Sources`): each gets its gradient written once,
where torch's graph would copy the query's, key's and value's gradients out of the heads' layout
and then stack them. Measured on the CPU (1 thread, 9 columns in chunks of 5 and 4, 16
sequences of 20 tokens, ``MultiheadAttention(64, 4, add_bias_kv=True)``: the ``mha_bias_kv``
workload of benchmarks/bench_recurrent.py, median CPU time of 31 interleaved steps on a loaded
machine): the EXACT step's backward 7.4 ms with torch's loop, 5.6 ms with the node; the step
4.84x a training step, 4.21x (benchmarks/results/mha_exact_cpu_2026-12-06.md).

:func:`fold` replaces the output of a call (torch's CPU flash attention node: the query, key,
value, output, log-sum-exp, mask, causality and scale are read from it, so the node computes
what the call did) by :class:`Node`, with the same values. Its backward is torch's own op for a
gradient that is not batched (a training backward, one column).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fimfast import chunks
from fimfast.rules.node_edges import batch_level, input_wanted

_is_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
_FLASH_CPU = "ScaledDotProductFlashAttentionForCpuBackward0"


class Sources(NamedTuple):
    """Where the attention's query, key and value ``(N, *, H hd)`` come from: ``tensors``, the
    projections' outputs ``(N, T, W)`` (then ``bias_k``, ``bias_v`` expanded, ``(N, 1, H hd)``,
    if ``appended``); ``parts``, ``(tensor index, first feature)`` of the query, key and value;
    ``appended``: the indices of ``bias_k``'s and ``bias_v``'s rows, appended to the keys and
    values after their ``keys`` positions (then a zero position for ``add_zero_attn``, which
    has no gradient), or ``None``."""

    tensors: list
    parts: tuple
    appended: tuple | None = None
    keys: int | None = None

    @staticmethod
    def of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Sources:
        """Query, key and value that are tensors of their own."""
        return Sources([q, k, v], ((0, 0), (1, 0), (2, 0)))


def fold(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
         src: Sources) -> torch.Tensor:
    """``out`` (``F.scaled_dot_product_attention(q, k, v, ...)``, ``(N, H, L, hd)``, ``q``,
    ``k``, ``v`` made of ``src``) as the output of a :class:`Node` whose inputs are
    ``src.tensors``, or ``out`` itself where that does not apply: no batching in this torch,
    another backend than the CPU's flash attention (the CUDA kernels, torch's math fallback),
    dropout, a mask with a gradient, inputs that are not ``q``, ``k``, ``v`` themselves,
    autocast."""
    node = out.grad_fn
    if (
        _is_batched is None or node is None or node.name() != _FLASH_CPU
        or node._saved_dropout_p != 0.0 or node._saved_query is not q
        or node._saved_key is not k or node._saved_value is not v
        or torch.is_autocast_enabled(out.device.type)
    ):
        return out
    mask = node._saved_attn_mask
    if mask is not None and mask.requires_grad:
        return out
    spec = (node._saved_logsumexp, mask, bool(node._saved_is_causal), node._saved_scale,
            src._replace(tensors=[t.shape for t in src.tensors]))
    return Node.apply([out.detach()], spec, [t.detach() for t in (q, k, v)], *src.tensors)


class Node(torch.autograd.Function):
    """``apply([o], (lse, mask, is_causal, scale, layout), [q, k, v], *sources)``: ``o`` (the
    CPU flash attention of ``q``, ``k``, ``v`` ``(N, H, *, hd)``, made of ``sources`` as
    ``layout`` (a :class:`Sources` holding their shapes) tells, computed already, with its
    log-sum-exp ``lse`` ``(N, H, L)``) as a node whose backward batches the columns (see the
    module docstring) and writes each source's gradient at once. ``o`` comes in a list, not as
    an input: an output that is an input is a view."""

    @staticmethod
    def forward(ctx, box, spec, qkv, *sources):
        ctx.spec = spec
        ctx.save_for_backward(*qkv, box[0])
        return box[0]

    @staticmethod
    def backward(ctx, g):
        q, k, v, o = ctx.saved_tensors
        lse, mask, causal, scale, layout = ctx.spec
        wanted = [input_wanted(ctx, 3 + i, 3) for i in range(len(layout.tensors))]
        want = _wanted(layout, wanted)
        level = batch_level(g) if any(want) else None
        if not any(want):
            grads = [None, None, None]
        elif level is None:  # a training backward, one column: torch's own
            grads = [t.unsqueeze(0) for t in _torch_backward(g, q, k, v, o, lse, causal, mask,
                                                             scale)]
        else:
            if not hasattr(ctx, "flat"):  # formed once for the step's chunks
                ctx.flat = _flat(q, k, v, lse, mask, causal, scale)
            G = torch._remove_batch_dim(g, level, 1, 0)  # (M, N, H, L, hd)
            step = _at_once(G, ctx.flat[3])
            parts = [_batched(G[i : i + step], ctx.flat, want)
                     for i in range(0, G.shape[0], step)]
            grads = [None if p[0] is None else p[0] if len(p) == 1 else torch.cat(p)
                     for p in zip(*parts)]
        out = _to_sources(grads, layout, wanted)
        if level is None:
            return None, None, None, *(None if t is None else t[0] for t in out)
        return None, None, None, *(None if t is None else torch._add_batch_dim(t, 0, level)
                                   for t in out)


def _wanted(layout: Sources, wanted: list[bool]) -> list[bool]:
    """Which of the query, key and value gradients the wanted sources need."""
    want = [wanted[i] for i, _ in layout.parts]
    if layout.appended is not None:
        want[1] = want[1] or wanted[layout.appended[0]]
        want[2] = want[2] or wanted[layout.appended[1]]
    return want


def _to_sources(grads, layout: Sources, wanted: list[bool]) -> list:
    """The ``(M, *shape)`` gradients of the wanted sources from those of the query, key and value
    ``(M, N, H, *, hd)``: a source's parts (which tile its features) side by side, one copy, an
    appended row's gradient the key's or value's at its position. Functional, so that it runs
    on gradients batched at a level the node does not unwrap too."""
    out: list = [None] * len(layout.tensors)
    for i, shape in enumerate(layout.tensors):
        js = sorted((j for j, (src, _) in enumerate(layout.parts) if src == i),
                    key=lambda j: layout.parts[j][1])
        if not wanted[i] or not js:
            continue
        pieces = [grads[j].narrow(3, 0, shape[1]).transpose(2, 3) for j in js]  # (M, N, T, H, hd)
        g = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 3)
        out[i] = g.reshape(g.shape[0], *shape)
    if layout.appended is not None:
        for j, i in zip((1, 2), layout.appended):
            if wanted[i]:
                g = grads[j].select(3, layout.keys)  # (M, N, H, hd)
                out[i] = g.reshape(*g.shape[:2], 1, -1)
    return out


def _torch_backward(g, q, k, v, o, lse, causal: bool, mask, scale):
    """torch's own backward of the CPU flash attention, for one column."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g, q, k, v, o, lse, 0.0, causal, attn_mask=mask, scale=scale)


def _at_once(G: torch.Tensor, P: torch.Tensor) -> int:
    """Columns of ``G`` whose products run together: as many as keep their ``(N H, L, M, S)``
    score gradient within the columns' own gradient ``G`` or ``chunks.SMALL_BYTES``, whichever
    is larger (the engine's bound of the columns counts what a column holds at a tap, not the
    attention's scores, ``S / hd`` times larger), spread evenly (:func:`chunks.balanced`)."""
    most = max(chunks.SMALL_BYTES, G.numel() * G.element_size()) // (P.numel() * G.element_size())
    return chunks.balanced(G.shape[0], most)


def _flat(q, k, v, lse, mask, causal: bool, scale: float | None):
    """``(s q, s k, v, P)`` as contiguous ``(N H, *, *)`` batches of matrices, ``s`` the scale
    and ``P = exp(s q k^T + mask - lse)`` the attention probabilities that the forward
    normalised by ``lse`` (zero on a row it masked entirely: torch's ``lse`` is 0 there, or
    ``-inf``, taken as 0)."""
    N, H, L, hd = q.shape
    s = hd**-0.5 if scale is None else scale
    qs, ks, vf = (t.reshape(N * H, -1, hd).contiguous() for t in (q * s, k * s, v))
    P = torch.bmm(qs, ks.transpose(1, 2)).div_(s)  # s q k^T: (N H, L, S)
    Pv = P.view(N, H, L, -1)
    if mask is not None:
        Pv.add_(mask)
    if causal:  # top-left aligned, as torch's kernel
        Pv.masked_fill_(torch.ones(Pv.shape[-2:], dtype=torch.bool, device=q.device).triu(1),
                        -math.inf)
    lse = lse.to(P.dtype).clamp(min=torch.finfo(P.dtype).min)  # -inf: exp(-inf - min) = 0
    Pv.sub_(lse.unsqueeze(-1))
    return qs, ks, vf, P.exp_()


def _batched(G, flat, want):
    """The gradients (``None`` where not ``want``-ed) of ``M`` columns ``G`` ``(M, N, H, L,
    hd)`` of the output, ``(M, N, H, *, hd)`` each. ``G`` is copied once, to ``(N H, L, M,
    hd)``; each product is then one ``bmm`` over the ``N H`` heads with the columns side by side
    in its rows or columns (a ``bmm`` of ``M N H`` smaller matrices costs more on the CPU), the
    score gradient ``dS`` laid out ``(N H, L, M, S)``, read by ``dq`` and (transposed) ``dk``
    without a copy."""
    qs, ks, vf, P = flat
    M, N, H, L, hd = G.shape
    B, S = N * H, ks.shape[1]
    Gl = G.permute(1, 2, 3, 0, 4).reshape(B, L, M * hd)
    grads = [None, None, None]
    if want[2]:  # dv = P^T g: (B, S, L) @ (B, L, M hd)
        gv = torch.bmm(P.transpose(1, 2), Gl)
        grads[2] = gv.view(N, H, S, M, hd).permute(3, 0, 1, 2, 4)
    if want[0] or want[1]:
        Pm = P.view(B, L, 1, S)
        dS = torch.bmm(Gl.view(B, L * M, hd), vf.transpose(1, 2)).view(B, L, M, S).mul_(Pm)
        dS = dS.addcmul_(Pm, dS.sum(-1, keepdim=True), value=-1)  # rowsum(P g v^T) = g . o
        if want[0]:  # dq = s dS k: (B, L M, S) @ (B, S, hd)
            gq = torch.bmm(dS.view(B, L * M, S), ks)
            grads[0] = gq.view(N, H, L, M, hd).permute(3, 0, 1, 2, 4)
        if want[1]:  # dk = s dS^T q: (B, M S, L) @ (B, L, hd)
            gk = torch.bmm(dS.view(B, L, M * S).transpose(1, 2), qs)
            grads[1] = gk.view(N, H, M, S, hd).permute(2, 0, 1, 3, 4)
    return grads
