"""Rule for ``nn.MultiheadAttention``: its forward, rewritten with tapped projections.

During a capture the module's forward is replaced by :func:`_mha_forward`, which computes the same
function with the input projections, the attention and the output projection as separate ops and
taps the output of each projection; each projection's weight and bias then get the terms of a
linear map (:func:`fimfast.rules.base._linear_terms`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fimfast import recompute
from fimfast.hooks import Call, Capture, Tap, Use, saved_tensor_hooks_active
from fimfast.rules import attention_node
from fimfast.rules.base import Rule, Term, UseKind, _linear_terms, patch_forward, trainable


class MHARule(Rule):
    """``nn.MultiheadAttention`` (packed or separate input projections, ``batch_first`` either
    way, every mask, ``add_bias_kv``, ``add_zero_attn``): its forward runs as
    :func:`_mha_forward` during a capture. ``bias_k``/``bias_v`` are appended to every sample's
    keys and values as a tapped ``(N, 1, E)`` expansion, whose gradient per sample is the
    parameter's (a :class:`~fimfast.rules.Vec` term). Configurations it does not reproduce
    (dropout while training, unbatched inputs) run torch's own forward, and the parameters then
    go to the generic path."""

    name = "mha"
    takes_functions = True  # its terms tell uses apart by position or kind

    def install(self, module, cap):
        return patch_forward(module, partial(_mha_forward, self, module, cap))

    def terms(self, call, grads):
        memo, seen = call.data["memo"]  # most columns of a chunk: fold the next step's attention
        M = max((g.shape[0] for g in grads if g is not None), default=0)
        memo[seen] = call.data["M"] = max(M, call.data.get("M", 0))
        out: list[Term | None] = []
        for u, (ti, key) in zip(call.uses, call.data["src"]):
            out.extend(_linear_terms(call, grads[ti], call.taps[ti], call.data, key, [u]))
        return out


def _mha_forward(
    rule: MHARule,
    mod: nn.MultiheadAttention,
    cap: Capture,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
):
    """``nn.MultiheadAttention.forward`` with tapped projections (batched inputs, no dropout)."""
    args = (query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
            is_causal)
    ps = trainable(
        cap, mod.in_proj_weight, mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight,
        mod.in_proj_bias, mod.out_proj.weight, mod.out_proj.bias, mod.bias_k, mod.bias_v,
    )
    # a recomputation (fimfast.recompute) runs the forward its first run ran, capture or not
    plain = (
        not torch.is_grad_enabled()
        or query.dim() != 3
        or (mod.training and mod.dropout > 0.0)
        or query.is_nested
        or (not recompute.replaying(cap) and (not cap.active or not ps))
    )
    if plain:
        return type(mod).forward(mod, *args)
    same_kv = key is value
    same_qkv = same_kv and query is key
    if not mod.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    if not _reproducible(mod, query, key, value, key_padding_mask, attn_mask, is_causal):
        return type(mod).forward(mod, *args)  # torch raises its own error for bad shapes
    # inside a non-reentrant checkpoint: its recomputations run this forward again
    hooked = saved_tensor_hooks_active()
    if hooked and not recompute.follow(mod, cap, lambda c: partial(_mha_forward, rule, mod, c)):
        return type(mod).forward(mod, *args)
    kpm, am, is_causal = _masks(query, key_padding_mask, attn_mask, is_causal, need_weights)

    rec = _Recorder(mod, cap, {id(p) for p in ps})
    seen = (id(mod), "columns")  # most columns of a chunk, this estimator's last step
    rec.data["memo"] = (cap.memo, seen)
    q, k, v, src = _in_projections(mod, rec, query, key, value, same_kv, same_qkv)
    if mod.bias_k is not None or mod.add_zero_attn:
        k, v, kpm, am, src = _extend(mod, rec, k, v, kpm, am, src)
    # (the folded node reads the attention's saved tensors, which a checkpoint recomputes)
    fold = src if not hooked and cap.memo.get(seen, 2) > 1 else None
    ctx, weights = _attend(mod, q, k, v, am, kpm, need_weights, average_attn_weights, is_causal,
                           fold)
    out = rec.out_projection(ctx)
    cap.record(Call(mod, rule, rec.taps, rec.uses, rec.data))
    # torch's layout: a contiguous sequence-first output (batch-first: a transposed view of it),
    # so that what follows and depends on the layout (a dropout's mask) draws what it would draw
    out = out.transpose(0, 1).contiguous()
    return (out.transpose(0, 1) if mod.batch_first else out), weights


def _reproducible(mod, query, key, value, key_padding_mask, attn_mask, is_causal) -> bool:
    """Whether the batch-first inputs and masks have the shapes :func:`_mha_forward` handles."""
    N, L = query.shape[:2]
    S = key.shape[1]
    NH = N * mod.num_heads
    return not (
        key.shape[0] != N
        or value.shape[:2] != key.shape[:2]
        or (attn_mask is not None and attn_mask.dim() == 2 and attn_mask.shape != (L, S))
        or (attn_mask is not None and attn_mask.dim() == 3 and attn_mask.shape != (NH, L, S))
        or (attn_mask is not None and attn_mask.dim() not in (2, 3))
        or (key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S))
        or (is_causal and attn_mask is None)
    )


def _masks(query, key_padding_mask, attn_mask, is_causal: bool, need_weights: bool):
    """``(key padding mask, attention mask, is_causal)`` as torch's forward canonicalises them
    (float masks in the query's dtype)."""
    kpm = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    if is_causal and kpm is None and not need_weights:
        am = None
    else:
        am = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
            target_type=query.dtype, check_other=False,
        )
        if kpm is not None:
            is_causal = False
    return kpm, am, is_causal


class _Recorder:
    """The taps, uses and data of one :func:`_mha_forward` call, built projection by
    projection; ``data["src"]`` gives each use its ``(tap index, input key)``."""

    def __init__(self, mod: nn.MultiheadAttention, cap: Capture, tracked: set[int]):
        self.mod, self.cap, self.tracked = mod, cap, tracked
        self.taps: list[Tap] = []
        self.uses: list[Use] = []
        self.src: list[tuple[int, str]] = []
        self.data: dict[str, Any] = {"src": self.src}

    def _add(self, y: torch.Tensor, name: str, x: torch.Tensor, params) -> torch.Tensor:
        """Tap ``y`` (the projection of ``x`` kept as ``data[name]``) and declare ``params``,
        ``(param, kind, block)`` each."""
        tap, y2 = self.cap.tap(y, lead=2, key=(id(self.mod), name), batch_first=True)
        ti = len(self.taps)
        self.taps.append(tap)
        self.data[name] = x.detach()
        for p, kind, block in params:
            if p is not None and id(p) in self.tracked:
                self.uses.append(Use(p, kind, block))
                self.src.append((ti, name))
        return y2

    def proj(self, x: torch.Tensor, name: str, w, b, wblock, bblock, wparam, bparam):
        """``F.linear(x, w, b)``, tapped; ``w``/``b`` are the blocks ``wblock``/``bblock`` of
        the parameters ``wparam``/``bparam``."""
        y = F.linear(x, w, b)
        return self._add(y, name, x, ((wparam, UseKind.OUTER, wblock),
                                      (bparam, UseKind.VEC, bblock)))

    def appended(self, p: torch.Tensor, N: int, name: str) -> torch.Tensor:
        """``bias_k`` or ``bias_v`` ``(1, 1, E)`` expanded to every sample, tapped: the gradient
        of sample ``n``'s row is that sample's gradient of the parameter."""
        y = p.expand(N, 1, p.shape[-1])
        return self._add(y, name, y, ((p, UseKind.VEC, None),))

    def out_projection(self, ctx: torch.Tensor) -> torch.Tensor:
        """The output projection of the attention context ``(N, L, E)``, tapped."""
        op = self.mod.out_proj
        y = F.linear(ctx, op.weight, op.bias)
        key = (id(self.mod), "out")
        tap, out = self.cap.tap(y, lead=2, key=key, batch_first=True)
        self.taps.append(tap)
        self.data["ctx"] = ctx.detach()
        for p, kind in ((op.weight, UseKind.OUTER), (op.bias, UseKind.VEC)):
            if p is not None and id(p) in self.tracked:
                self.uses.append(Use(p, kind))
                self.src.append((len(self.taps) - 1, "ctx"))
        return out


def _extend(mod, rec: _Recorder, k, v, kpm, am, src: attention_node.Sources):
    """Keys and values ``(N, S, E)`` with ``bias_k``/``bias_v`` appended (tapped), then a zero
    position for ``add_zero_attn``, as torch's forward appends them; the masks gain a column
    that lets every query attend each appended position; ``src`` with the appended rows."""
    N, E, S = k.shape[0], mod.embed_dim, k.shape[1]
    if mod.bias_k is not None:
        bk, bv = rec.appended(mod.bias_k, N, "bk"), rec.appended(mod.bias_v, N, "bv")
        k, v = torch.cat([k, bk], 1), torch.cat([v, bv], 1)
        n = len(src.tensors)
        src = src._replace(tensors=[*src.tensors, bk, bv], appended=(n, n + 1), keys=S)
        kpm, am = _pad(kpm), _pad(am)
    if mod.add_zero_attn:
        zero = k.new_zeros(N, 1, E)
        k, v = torch.cat([k, zero], 1), torch.cat([v, zero], 1)
        kpm, am = _pad(kpm), _pad(am)
    return k, v, kpm, am, src


def _pad(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else F.pad(mask, (0, 1))


def _in_projections(mod, rec: _Recorder, query, key, value, same_kv: bool, same_qkv: bool):
    """``q, k, v`` ``(N, *, E)`` and their :class:`~fimfast.rules.attention_node.Sources`: one
    packed projection for self-attention, a query and a packed key-value projection when key is
    value, three otherwise."""
    E = mod.embed_dim
    bias = mod.in_proj_bias
    if not mod._qkv_same_embed_dim:
        bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
        q = rec.proj(query, "xq", mod.q_proj_weight, bq, None, (0, E), mod.q_proj_weight, bias)
        k = rec.proj(key, "xk", mod.k_proj_weight, bk, None, (E, 2 * E), mod.k_proj_weight, bias)
        v = rec.proj(value, "xv", mod.v_proj_weight, bv, None, (2 * E, 3 * E), mod.v_proj_weight,
                     bias)
        return q, k, v, attention_node.Sources.of(q, k, v)
    W = mod.in_proj_weight
    if same_qkv:
        qkv = rec.proj(query, "xq", W, bias, None, None, W, bias)
        return *qkv.unflatten(-1, (3, E)).unbind(-2), attention_node.Sources(
            [qkv], ((0, 0), (0, E), (0, 2 * E)))
    if same_kv:
        wq, wkv = W.split([E, 2 * E])
        bq, bkv = (None, None) if bias is None else bias.split([E, 2 * E])
        q = rec.proj(query, "xq", wq, bq, (0, E), (0, E), W, bias)
        kv = rec.proj(key, "xk", wkv, bkv, (E, 3 * E), (E, 3 * E), W, bias)
        k, v = kv.unflatten(-1, (2, E)).unbind(-2)
        return q, k, v, attention_node.Sources([q, kv], ((0, 0), (1, 0), (1, E)))
    wq, wk, wv = W.chunk(3)
    bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
    q = rec.proj(query, "xq", wq, bq, (0, E), (0, E), W, bias)
    k = rec.proj(key, "xk", wk, bk, (E, 2 * E), (E, 2 * E), W, bias)
    v = rec.proj(value, "xv", wv, bv, (2 * E, 3 * E), (2 * E, 3 * E), W, bias)
    return q, k, v, attention_node.Sources.of(q, k, v)


def _attend(mod, q, k, v, am, kpm, need_weights: bool, average_attn_weights: bool,
            is_causal: bool, fold: attention_node.Sources | None = None):
    """Scaled dot-product attention of the projected ``q`` ``(N, L, E)``, ``k``, ``v``
    ``(N, S, E)`` over ``num_heads`` heads: ``(context (N, L, E), weights or None)``; ``fold``
    (where ``q``, ``k``, ``v`` come from): the attention as a node whose backward batches the
    columns (:mod:`fimfast.rules.attention_node`)."""
    N, L, E = q.shape
    S = k.shape[1]
    H = mod.num_heads
    hd = E // H
    q = q.reshape(N, L, H, hd).transpose(1, 2)  # (N, H, L, hd)
    k = k.reshape(N, S, H, hd).transpose(1, 2)
    v = v.reshape(N, S, H, hd).transpose(1, 2)
    if am is not None:
        am = am.reshape(1, 1, L, S) if am.dim() == 2 else am.reshape(N, H, L, S)
    if kpm is not None:
        kpm = kpm.reshape(N, 1, 1, S)
        am = kpm if am is None else am + kpm
    weights = None
    if need_weights:
        scores = torch.matmul(q * math.sqrt(1.0 / hd), k.transpose(-2, -1))
        if am is not None:
            scores = scores + am
        attn = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(attn, v)
        weights = attn.mean(dim=1) if average_attn_weights else attn
    else:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=am, is_causal=is_causal)
        if fold is not None:
            ctx = attention_node.fold(q, k, v, ctx, fold)
    return ctx.transpose(1, 2).reshape(N, L, E), weights
