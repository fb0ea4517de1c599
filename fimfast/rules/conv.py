"""Rule for ``nn.Conv1d`` and ``nn.Conv2d``: unfold the input, one :class:`Outer` per group."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fimfast.hooks import Call, Use
from fimfast.rules.base import Outer, Rule, Term, UseKind, Vec, trainable


class ConvRule(Rule):
    """``nn.Conv1d``/``nn.Conv2d`` (groups, stride, padding of every mode, dilation): unfold the
    (padded) input; ``Outer`` over output positions, one block per group."""

    name = "conv"

    def capture(self, cap, module, x, y):
        if x.dim() != module.weight.dim():  # unbatched input: no sample dimension
            return None
        ps = trainable(cap, module.weight, module.bias)
        g = module.groups
        uses = [
            Use(p, UseKind.OUTER, groups=g) if p is module.weight else Use(p, UseKind.VEC)
            for p in ps
        ]
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
            if u.kind == UseKind.VEC:
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
