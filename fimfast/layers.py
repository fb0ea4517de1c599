"""Per-layer rules of the fast per-sample engine (design.md §5, math.md §1).

A rule turns what a layer saw in the forward (its input) and the gradient at its output for a
chunk of ``M`` backward columns into *terms*: the per-row gradient of each parameter it uses, in
a form the engine squares and sums without materialising per-row gradients of the model:

* :class:`Outer` — ``grad_u = sum_t P[u, t] (x) Q[n(u), t]`` (Linear and MultiheadAttention
  projections: ``t`` runs over the tokens of a sequence; convolutions after unfold: ``t`` runs over
  output positions). ``Q`` does not depend on the column. Squared and summed with
  :func:`fimfast.ops.shared_sq`, or with :func:`fimfast.ops.sq_matmul` once over all columns when
  every unit has one position (no weight sharing).
* :class:`Rows` — an embedding: ``grad_u = sum_t e_{ids[n, t]} (x) Qe[u, t]``; repeated ids of one
  sample add before the square (segment sum), ``padding_idx`` tokens do not count.
* :class:`Vec` — the per-row gradient itself, for small parameters (biases, norm affines).

A *unit* ``u = (column m, sample n)``: for ``(N, C)`` logits one backward column covers every
sample at once; for ``(N, T, C)`` logits one column is (class, token position) and covers that
position of every sequence. Layer outputs are tapped (see :mod:`fimfast.hooks`); the engine finds
the batch dimension of each tap and passes the gradients as ``(M, *tap.shape)``.

Rules exist for ``nn.Linear`` (2-D and sequence inputs), ``nn.Conv1d``/``nn.Conv2d`` (groups,
stride, padding of every mode, dilation), ``nn.Embedding`` (``padding_idx``, ``max_norm``),
``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d`` (running statistics
in eval mode, batch statistics in train mode) and ``nn.MultiheadAttention`` (packed or separate
input projections, ``batch_first`` either way, every mask; its forward is run by
:func:`_mha_forward` while a capture is active, so the projections can be tapped). A module is
matched only when its class's ``forward`` is the one the rule was written for (a subclass that
overrides ``forward`` goes to the generic path).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fimfast.hooks import Call, Capture, Use, saved_tensor_hooks_active


# --------------------------------------------------------------------------------------------- #
# terms
# --------------------------------------------------------------------------------------------- #
@dataclass
class Outer:
    """Per-unit gradient ``sum_t P[m, n, t] (x) Q[n, t]`` of a 2-D block of a parameter.

    Attributes:
        P: ``(M, N, T, O)`` output gradients, or ``(M, N, T, g, O/g)`` for ``g`` groups.
        Q: ``(N, T, I)`` inputs (the same for every column), or ``(N, T, g, I/g)``.
    """

    P: torch.Tensor
    Q: torch.Tensor


@dataclass
class Rows:
    """Per-unit gradient ``sum_t e_{ids[n, t]} (x) Qe[m, n, t]`` of an embedding table.

    Attributes:
        ids: ``(N, S)`` int64 row indices.
        keep: ``(N, S)`` bool, the tokens that count (``None``: all).
        Qe: ``(M, N, S, d)`` gradients at the embedding output.
    """

    ids: torch.Tensor
    keep: torch.Tensor | None
    Qe: torch.Tensor


@dataclass
class Vec:
    """Per-unit gradient of a small parameter block, given directly: ``V`` ``(M, N, *block)``."""

    V: torch.Tensor


Term = Outer | Rows | Vec


def _front(t: torch.Tensor, b: int, lead: int, extra: int = 0) -> torch.Tensor:
    """Move batch dim ``b`` (of the ``lead`` leading dims, after ``extra`` dims) to the front and
    flatten the other leading dims into one: ``(*extra, *lead, *feat) -> (*extra, N, T, *feat)``."""
    t = t.movedim(extra + b, extra)
    s = t.shape
    T = math.prod(s[extra + 1 : extra + lead])
    return t.reshape(*s[:extra], s[extra], T, *s[extra + lead :])


def _trainable(cap: Capture, *ps: torch.Tensor | None) -> list[torch.Tensor]:
    return [p for p in ps if p is not None and id(p) in cap.param_ids]


def _usable(output: Any) -> bool:
    return isinstance(output, torch.Tensor) and output.grad_fn is not None


# --------------------------------------------------------------------------------------------- #
# rules
# --------------------------------------------------------------------------------------------- #
class Rule:
    """A rule for one kind of module: what to record in the forward, and its terms."""

    name = "rule"

    def accepts(self, module: nn.Module) -> bool:
        """Whether this rule can handle ``module`` as configured."""
        return True

    def install(self, module: nn.Module, cap: Capture) -> Callable[[], None]:
        """Register the forward hook, ahead of the module's own forward hooks (a user's hook that
        rescales or masks the output then acts after the tap, whose gradient stays the gradient at
        the layer's own output); returns the function that removes it."""
        handle = module.register_forward_hook(
            partial(self._hook, cap), with_kwargs=True, prepend=True
        )
        return handle.remove

    def _hook(self, cap: Capture, module, args, kwargs, output):
        if not cap.active or not torch.is_grad_enabled() or not _usable(output):
            return None
        if saved_tensor_hooks_active():
            # inside torch.utils.checkpoint (non-reentrant) or another saved-tensor hook: the
            # backward recomputes this forward without the capture, so it must stay as it is
            # (its parameters are then used outside the captured calls: generic path)
            return None
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return None
        return self.capture(cap, module, x, output)

    def capture(self, cap: Capture, module: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """Record one call; returns the tapped output (or ``None`` to leave it untouched)."""
        raise NotImplementedError

    def terms(self, call: Call, grads: list[torch.Tensor | None]) -> list[Term | None]:
        """One term per use of ``call`` for a chunk of ``M`` columns (``None``: no gradient)."""
        raise NotImplementedError


class LinearRule(Rule):
    """``nn.Linear``: ``W`` gets ``Outer(G, x)``, ``b`` gets ``sum_t G``; sequence inputs share
    the weight over their tokens (``T > 1``)."""

    name = "linear"
    transposed = False  # weight stored (out, in)

    def capture(self, cap, module, x, y):
        ps = _trainable(cap, module.weight, module.bias)
        uses = [Use(p, "outer", transposed=self.transposed) if p is module.weight else Use(p, "vec")
                for p in ps]
        tap, out = cap.tap(y, lead=y.dim() - 1, key=(id(module), 0))
        cap.record(Call(module, self, [tap], uses, {"x": x.detach()}))
        return out

    def terms(self, call, grads):
        return _linear_terms(call, grads[0], call.taps[0], call.data, "x", call.uses)


def _linear_terms(call: Call, G, tap, data: dict, key: str, uses: list[Use]) -> list[Term | None]:
    if G is None:
        return [None] * len(uses)
    b, lead = tap.bdim, tap.lead
    qkey = ("Q", key)
    if qkey not in data:  # the input side does not depend on the column: once per step
        data[qkey] = _front(data[key], b, lead)
    P = _front(G, b, lead, extra=1)
    out: list[Term | None] = []
    for u in uses:
        if u.kind == "outer":
            out.append(Outer(P, data[qkey]))
        else:  # bias: sum over tokens (a view if one)
            out.append(Vec(P[:, :, 0] if P.shape[2] == 1 else P.sum(2)))
    return out


class HFConv1DRule(LinearRule):
    """Hugging Face ``Conv1D`` (GPT-2's projections): a Linear layer whose weight is stored
    ``(in, out)``, ``y = x @ W + b``; its squared products are formed transposed."""

    name = "hf_conv1d"
    transposed = True


class ConvRule(Rule):
    """``nn.Conv1d``/``nn.Conv2d``: unfold the (padded) input; ``Outer`` over output positions,
    one block per group."""

    name = "conv"

    def capture(self, cap, module, x, y):
        if x.dim() != module.weight.dim():  # unbatched input: no sample dimension
            return None
        ps = _trainable(cap, module.weight, module.bias)
        g = module.groups
        uses = [Use(p, "outer", groups=g) if p is module.weight else Use(p, "vec") for p in ps]
        tap, out = cap.tap(y, lead=1, key=(id(module), 0), batch_first=True)
        cap.record(Call(module, self, [tap], uses, {"x": x.detach()}))
        return out

    def _patches(self, module, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, g, I/g * prod(kernel))`` unfolded input patches."""
        pad = module._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pad, mode=mode)
        k, d, s = module.kernel_size, module.dilation, module.stride
        if x.dim() == 3:  # Conv1d as a 2-D convolution of height 1
            x, k, d, s = x.unsqueeze(2), (1, k[0]), (1, d[0]), (1, s[0])
        U = _unfold(x, k, d, s)  # (N, I*kk, L), channel-major like the weight
        N, IK, L = U.shape
        g = module.groups
        return U.view(N, g, IK // g, L).permute(0, 3, 1, 2)  # a view: bmm takes the strides

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None] * len(call.uses)
        m = call.module
        if "Q" not in call.data:
            call.data["Q"] = self._patches(m, call.data["x"])
        Q = call.data["Q"]
        M, N, O = G.shape[:3]
        g = m.groups
        G3 = G.reshape(M, N, O, -1)
        out: list[Term | None] = []
        for u in call.uses:
            if u.kind == "vec":
                out.append(Vec(G3.sum(-1)))
            else:
                P = G3.transpose(2, 3)  # (M, N, L, O)
                if g == 1:
                    out.append(Outer(P, Q[:, :, 0]))
                else:
                    out.append(Outer(P.reshape(M, N, P.shape[2], g, O // g), Q))
        return out


def _unfold(x: torch.Tensor, k, d, s) -> torch.Tensor:
    """``F.unfold(x, k, dilation=d, stride=s)`` of ``(N, I, H, W)``: ``(N, I*kh*kw, L)``.

    Built as a strided view (``Tensor.unfold`` per spatial dim, every ``d``-th tap) copied once
    into that layout: 2-4x faster than ``F.unfold`` on the CPU (64 x 16 x 12 x 12, 5 x 5 kernel:
    2.5 vs 5.3 ms)."""
    N, I = x.shape[:2]
    v = x
    for dim, (kk, dd, ss) in enumerate(zip(k, d, s)):
        v = v.unfold(2 + dim, (kk - 1) * dd + 1, ss)
        if dd > 1:
            v = v[..., ::dd]
    # (N, I, Lh, Lw, kh, kw) -> (N, I, kh, kw, Lh, Lw)
    return v.permute(0, 1, 4, 5, 2, 3).reshape(N, I * k[0] * k[1], -1)


class EmbeddingRule(Rule):
    """``nn.Embedding``: per-sample segment sum of the output gradients by token id."""

    name = "embedding"

    def accepts(self, module):
        # scale_grad_by_freq divides by counts over the whole batch: not a per-sample gradient
        return not module.scale_grad_by_freq

    def capture(self, cap, module, x, y):
        uses = [Use(p, "rows") for p in _trainable(cap, module.weight)]
        N = cap.batch_size
        if cap.expand_broadcast and N is not None and N > 1 and x.dim() >= 2 and x.shape[0] == 1:
            # a lookup shared by the batch (position ids (1, T), as in BERT and GPT-2): the
            # gradient at its (1, T, d) output is summed over the samples. Expanded to the batch
            # (a stride-0 view) it gives every broadcasting consumer the same values, and the tap
            # per-sample gradients; otherwise the table would take the generic path (one
            # backward per row: 40 s instead of 0.3 s for MiniLM, B=32). A forward that fails
            # with the expanded output is run again without (see fimfast.persample.Engine).
            x = x.expand(N, *x.shape[1:])
            y = y.expand(N, *y.shape[1:])
            cap.expanded += 1
        elif (
            cap.expand_flat and N is not None and N > 1 and x.dim() == 1 and y.dim() == 2
            and x.shape[0] != N  # ids (N,): one id per sample, already batched
        ):
            # ids of shape (T,) (nanoGPT's positions): the (T, d) output broadcasts over the
            # batch; expanded to (N, T, d) it gains a dimension, which a consumer indexing or
            # reducing over the first dimension would read differently: the engine checks the
            # logits of the first forward that does this against the model's own
            x = x.unsqueeze(0).expand(N, -1)
            y = y.unsqueeze(0).expand(N, -1, -1)
            cap.expanded += 1
            cap.expanded_flat += 1
        tap, out = cap.tap(y, lead=y.dim() - 1, key=(id(module), 0))
        cap.record(Call(module, self, [tap], uses, {"ids": x.detach()}))
        return out

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None]
        tap = call.taps[0]
        if "front" not in call.data:
            ids = _front(call.data["ids"], tap.bdim, tap.lead)  # (N, S)
            pi = call.module.padding_idx
            call.data["front"] = (ids.long(), None if pi is None else ids != pi)
        ids, keep = call.data["front"]
        Qe = _front(G, tap.bdim, tap.lead, extra=1)
        return [Rows(ids, keep, Qe)]


class _NormRule(Rule):
    """Shared part of the norms: ``weight`` gets ``sum_t G * xhat``, ``bias`` gets ``sum_t G``."""

    batch_first = True  # channel norms: (N, C, *)

    def lead(self, module, y: torch.Tensor) -> int:
        return 1

    def capture(self, cap, module, x, y):
        w, b = getattr(module, "weight", None), getattr(module, "bias", None)
        ps = _trainable(cap, w, b)
        uses = [Use(p, "vec") for p in ps]
        lead = self.lead(module, y)
        if lead < 1:
            return None
        tap, out = cap.tap(y, lead=lead, key=(id(module), 0), batch_first=self.batch_first)
        cap.record(Call(module, self, [tap], uses, {"x": x.detach()}))
        return out

    def xhat(self, module, x: torch.Tensor, data: dict) -> torch.Tensor:
        """Normalised input, shaped like ``x``, in ``x``'s dtype."""
        raise NotImplementedError

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None] * len(call.uses)
        tap = call.taps[0]
        m = call.module
        dt = _acc_dtype(G.dtype)
        if "xhat" not in call.data:
            call.data["xhat"] = self.front(tap, self.xhat(m, call.data["x"].to(dt), call.data))
        xh = call.data["xhat"]
        Gf = self.front(tap, G.to(dt), extra=1)
        return [Vec((Gf * xh).sum(2) if u.param is m.weight else Gf.sum(2)) for u in call.uses]

    def front(self, tap, t: torch.Tensor, extra: int = 0) -> torch.Tensor:
        """``(*extra, N, T, *param_shape)``."""
        return _front(t, tap.bdim, tap.lead, extra)


class LayerNormRule(_NormRule):
    """``nn.LayerNorm`` (affine weight, optional bias) over its trailing ``normalized_shape``."""

    name = "layernorm"
    batch_first = False

    def lead(self, module, y):
        return y.dim() - len(module.normalized_shape)

    def xhat(self, module, x, data):
        # torch's own kernel without the affine: the forward's numerics, and 10x faster than
        # var_mean on short rows
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


class RMSNormRule(_NormRule):
    """``nn.RMSNorm``: ``xhat = x / sqrt(mean(x^2) + eps)`` (``eps=None``: the dtype's eps)."""

    name = "rmsnorm"
    batch_first = False

    def lead(self, module, y):
        return y.dim() - len(module.normalized_shape)

    def capture(self, cap, module, x, y):
        out = super().capture(cap, module, x, y)
        if out is not None:
            cap.calls[-1].data["eps"] = (
                torch.finfo(x.dtype).eps if module.eps is None else module.eps
            )
        return out

    def xhat(self, module, x, data):
        return F.rms_norm(x, module.normalized_shape, None, data["eps"])


class _ChannelNormRule(_NormRule):
    """Norms with a per-channel affine on dim 1 of ``(N, C, *)``: GroupNorm, BatchNorm."""

    def front(self, tap, t, extra=0):
        # (*extra, N, C, *spatial) -> (*extra, N, L, C): channels last so Vec sums over dim 2
        s = t.shape
        return t.reshape(*s[: extra + 2], -1).transpose(-1, -2)


class GroupNormRule(_ChannelNormRule):
    """``nn.GroupNorm`` with ``affine=True``."""

    name = "groupnorm"

    def accepts(self, module):
        return module.affine

    def xhat(self, module, x, data):
        return F.group_norm(x, module.num_groups, None, None, module.eps)


class BatchNormRule(_ChannelNormRule):
    """``nn.BatchNorm1d/2d/3d`` with ``affine=True``: running statistics in eval mode, the batch
    statistics the forward used in train mode (the layers below it are then coupled across
    samples; the engine's probe sends their parameters to the generic path)."""

    name = "batchnorm"

    def accepts(self, module):
        return module.affine

    def capture(self, cap, module, x, y):
        use_batch = module.training or (module.running_mean is None and module.running_var is None)
        out = super().capture(cap, module, x, y)
        if out is not None:
            stats = None
            if not use_batch:  # copies: running statistics may change before the terms run
                stats = (module.running_mean.detach().clone(), module.running_var.detach().clone())
            cap.calls[-1].data["stats"] = stats
        return out

    def xhat(self, module, x, data):
        stats = data["stats"]
        if stats is None:  # batch statistics, running statistics untouched (None)
            return F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
        return F.batch_norm(x, stats[0].to(x.dtype), stats[1].to(x.dtype), None, None, False,
                            0.0, module.eps)


# --------------------------------------------------------------------------------------------- #
# MultiheadAttention
# --------------------------------------------------------------------------------------------- #
class MHARule(Rule):
    """``nn.MultiheadAttention``: its forward runs as :func:`_mha_forward` during a capture, which
    computes the same function with the input projections, the attention and the output projection
    as separate ops, tapping the projections. Configurations it does not reproduce (``bias_k``,
    ``add_zero_attn``, dropout while training, unbatched inputs) run torch's own forward, and the
    parameters then go to the generic path."""

    name = "mha"

    def accepts(self, module):
        return module.bias_k is None and module.bias_v is None and not module.add_zero_attn

    def install(self, module, cap):
        had = "forward" in module.__dict__
        old = module.__dict__.get("forward")
        module.forward = partial(_mha_forward, module, cap)

        def undo() -> None:
            if had:
                module.forward = old
            else:
                del module.forward

        return undo

    def terms(self, call, grads):
        out: list[Term | None] = []
        for u, (ti, key) in zip(call.uses, call.data["src"]):
            out.extend(_linear_terms(call, grads[ti], call.taps[ti], call.data, key, [u]))
        return out


def _mha_forward(
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
    ps = _trainable(
        cap, mod.in_proj_weight, mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight,
        mod.in_proj_bias, mod.out_proj.weight, mod.out_proj.bias,
    )
    plain = (
        not cap.active
        or not torch.is_grad_enabled()
        or saved_tensor_hooks_active()
        or not ps
        or query.dim() != 3
        or (mod.training and mod.dropout > 0.0)
        or query.is_nested
    )
    if plain:
        return type(mod).forward(mod, *args)
    same_kv = key is value
    same_qkv = same_kv and query is key
    if not mod.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    N, L, E = query.shape
    S = key.shape[1]
    H = mod.num_heads
    hd = E // H
    if (
        key.shape[0] != N
        or value.shape[:2] != key.shape[:2]
        or (attn_mask is not None and attn_mask.dim() == 2 and attn_mask.shape != (L, S))
        or (attn_mask is not None and attn_mask.dim() == 3 and attn_mask.shape != (N * H, L, S))
        or (attn_mask is not None and attn_mask.dim() not in (2, 3))
        or (key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S))
        or (is_causal and attn_mask is None)
    ):
        return type(mod).forward(mod, *args)  # torch raises its own error for bad shapes

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

    taps = []
    uses: list[Use] = []
    src: list[tuple[int, str]] = []
    data: dict[str, Any] = {}
    tracked = {id(p) for p in ps}

    def proj(x: torch.Tensor, name: str, w, b, wblock, bblock, wparam, bparam):
        y = F.linear(x, w, b)
        tap, y2 = cap.tap(y, lead=2, key=(id(mod), name), batch_first=True)
        ti = len(taps)
        taps.append(tap)
        data[name] = x.detach()
        if id(wparam) in tracked:
            uses.append(Use(wparam, "outer", wblock))
            src.append((ti, name))
        if bparam is not None and id(bparam) in tracked:
            uses.append(Use(bparam, "vec", bblock))
            src.append((ti, name))
        return y2

    bias = mod.in_proj_bias
    if mod._qkv_same_embed_dim:
        W = mod.in_proj_weight
        if same_qkv:
            qkv = proj(query, "xq", W, bias, None, None, W, bias)
            q, k, v = qkv.unflatten(-1, (3, E)).unbind(-2)
        elif same_kv:
            wq, wkv = W.split([E, 2 * E])
            bq, bkv = (None, None) if bias is None else bias.split([E, 2 * E])
            q = proj(query, "xq", wq, bq, (0, E), (0, E), W, bias)
            kv = proj(key, "xk", wkv, bkv, (E, 3 * E), (E, 3 * E), W, bias)
            k, v = kv.unflatten(-1, (2, E)).unbind(-2)
        else:
            wq, wk, wv = W.chunk(3)
            bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
            q = proj(query, "xq", wq, bq, (0, E), (0, E), W, bias)
            k = proj(key, "xk", wk, bk, (E, 2 * E), (E, 2 * E), W, bias)
            v = proj(value, "xv", wv, bv, (2 * E, 3 * E), (2 * E, 3 * E), W, bias)
    else:
        bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
        q = proj(query, "xq", mod.q_proj_weight, bq, None, (0, E), mod.q_proj_weight, bias)
        k = proj(key, "xk", mod.k_proj_weight, bk, None, (E, 2 * E), mod.k_proj_weight, bias)
        v = proj(value, "xv", mod.v_proj_weight, bv, None, (2 * E, 3 * E), mod.v_proj_weight,
                 bias)

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
    ctx = ctx.transpose(1, 2).reshape(N, L, E)
    op = mod.out_proj
    y = F.linear(ctx, op.weight, op.bias)
    tap, out = cap.tap(y, lead=2, key=(id(mod), "out"), batch_first=True)
    taps.append(tap)
    data["ctx"] = ctx.detach()
    for p, kind in ((op.weight, "outer"), (op.bias, "vec")):
        if p is not None and id(p) in tracked:
            uses.append(Use(p, kind))
            src.append((len(taps) - 1, "ctx"))
    data["src"] = src
    cap.record(Call(mod, _RULES_BY_NAME["mha"], taps, uses, data))
    if not mod.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------- #
# registry
# --------------------------------------------------------------------------------------------- #
_RULES: list[tuple[type, Rule]] = [
    (nn.Linear, LinearRule()),
    (nn.Conv1d, ConvRule()),
    (nn.Conv2d, ConvRule()),
    (nn.Embedding, EmbeddingRule()),
    (nn.LayerNorm, LayerNormRule()),
    (nn.GroupNorm, GroupNormRule()),
    (nn.modules.batchnorm._BatchNorm, BatchNormRule()),
    (nn.MultiheadAttention, MHARule()),
]
if hasattr(nn, "RMSNorm"):
    _RULES.append((nn.RMSNorm, RMSNormRule()))
_RULES_BY_NAME = {r.name: r for _, r in _RULES}


_HF_CONV1D = HFConv1DRule()


def _hf_conv1d_class() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` if transformers is already imported (never
    imported here)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for ``module``, or ``None`` (its parameters then take the generic path)."""
    for cls, rule in _RULES:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return rule if rule.accepts(module) else None
    conv1d = _hf_conv1d_class()
    if conv1d is not None and isinstance(module, conv1d) and type(module).forward is conv1d.forward:
        return _HF_CONV1D
    return None


def known_modules() -> list[str]:
    """Names of the module classes with a rule."""
    return [cls.__name__ for cls, _ in _RULES] + ["transformers Conv1D"]
