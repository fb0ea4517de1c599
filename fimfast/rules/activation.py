"""Rule for the learnable activation ``nn.PReLU``: ``y = max(0, x) + a * min(0, x)``.

The weight ``a`` has one entry (``num_parameters=1``, shared by every element of the input) or one
per channel (``num_parameters=C``, channel dim 1 of an input of two dims or more; an input of
fewer dims has one channel). Its per-unit gradient is ``sum`` over the sample's elements of
``G * min(x, 0)`` (per channel for ``C`` entries), a :class:`Vec`: the value of
``F.prelu``'s weight gradient, which is ``x * G`` where ``x <= 0`` and ``0`` elsewhere (at
``x == 0`` both are zero).
"""

from __future__ import annotations

import torch

from fimfast.dtypes import compute_dtype
from fimfast.hooks import Call, Use
from fimfast.rules.base import Rule, UseKind, Vec, front, trainable


class PReLURule(Rule):
    """``nn.PReLU`` (``num_parameters`` 1 or ``C``).

    One shared entry: every dim of the output is a leading dim (the engine finds the batch among
    them: ``(N, *)``, ``(T, N, d)`` ...). One entry per channel: the output is ``(N, C, *)`` with
    the batch first, as torch's channel dim 1 implies."""

    name = "prelu"
    takes_functions = True  # one use: told apart by position

    def capture(self, cap, module, x, y):
        uses = [Use(p, UseKind.VEC) for p in trainable(cap, module.weight)]
        shared = module.weight.numel() == 1
        if not uses or y.dim() == 0 or (not shared and y.dim() < 2):
            return None  # a frozen weight (nothing to tap), or no batch dimension
        lead = y.dim() if shared else 1
        tap, out = cap.tap(y, lead=lead, key=(id(module), 0), batch_first=not shared)
        cap.record(Call(module, self, [tap], uses, {"x": x.detach(), "shared": shared}))
        return out

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None] * len(call.uses)
        tap, data = call.taps[0], call.data
        dt = compute_dtype(G.dtype)
        if "neg" not in data:  # min(x, 0), once per step: (N, T) shared, (N, C, L) or (N, C)
            neg = data["x"].to(dt).clamp(max=0)
            if data["shared"]:
                neg = front(neg, tap.bdim, tap.lead)
            elif neg.dim() > 2:
                neg = neg.reshape(neg.shape[0], neg.shape[1], -1)
            data["neg"] = neg
        neg, G = data["neg"], G.to(dt)
        if data["shared"]:  # (M, N, T) . (N, T) -> (M, N, 1)
            V = torch.linalg.vecdot(front(G, tap.bdim, tap.lead, extra=1), neg).unsqueeze(-1)
        elif neg.dim() == 2:  # one position per channel: (M, N, C) * (N, C)
            V = G * neg
        else:  # (M, N, C, L) . (N, C, L) -> (M, N, C)
            V = torch.linalg.vecdot(G.reshape(*G.shape[:3], -1), neg)
        return [Vec(V) for _ in call.uses]
