"""Rules for ``nn.Embedding`` and ``nn.EmbeddingBag``: per-sample segment sums of the output
gradients by id."""

from __future__ import annotations

import weakref

import torch

from fimfast.dtypes import compute_dtype
from fimfast.hooks import Call, Use
from fimfast.rules.base import Rows, Rule, UseKind, front, trainable


class EmbeddingRule(Rule):
    """``nn.Embedding`` (``padding_idx``, ``max_norm``): per-sample segment sum of the output
    gradients by token id; ``padding_idx`` tokens do not count."""

    name = "embedding"
    takes_functions = True  # its terms tell uses apart by position or kind

    def accepts(self, module):
        # scale_grad_by_freq divides by counts over the whole batch: not a per-sample gradient
        return not module.scale_grad_by_freq

    def capture(self, cap, module, x, y):
        uses = [Use(p, UseKind.ROWS) for p in trainable(cap, module.weight)]
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
        return lookup_terms(call, grads, padding_idx(call.module))


def padding_idx(module) -> int | None:
    """``module.padding_idx`` as torch's lookups read it: a negative one counts from the end of
    the table (the constructor normalises it, an attribute set afterwards is not)."""
    p = module.padding_idx
    return p + module.weight.shape[0] if p is not None and p < 0 else p


def lookup_terms(call, grads, padding_idx: int | None) -> list:
    """The one term of a table lookup (``nn.Embedding`` or ``F.embedding``): ``Rows`` of the
    per-sample ids (``call.data["ids"]``, sample axis first, cached in ``call.data["front"]``)
    without the ``padding_idx`` tokens, over the output gradients."""
    G = grads[0]
    if G is None:
        return [None]
    tap = call.taps[0]
    if "front" not in call.data:
        ids = front(call.data["ids"], tap.bdim, tap.lead)  # (N, S)
        call.data["front"] = (ids.long(), None if padding_idx is None else ids != padding_idx)
    ids, keep = call.data["front"]
    return [Rows(ids, keep, front(G, tap.bdim, tap.lead, extra=1))]


class EmbeddingBagRule(Rule):
    """``nn.EmbeddingBag`` (modes ``sum``, ``mean``, ``max``; 2-D ids or flat ids with offsets,
    ``include_last_offset``; ``per_sample_weights``; ``padding_idx``; ``max_norm``), one bag
    per sample: ``Rows`` over the bag's ids (docs/math.md §4, "Bags").

    A bag's gradient is ``c_n (x) G[m, n]`` for ``sum`` and ``mean`` (``c_n`` the bag's weights
    added up by id: its per-sample weights, or ``1/size``), and ``G[m, n, j]`` at row
    ``argmax_j`` of every dimension ``j`` for ``max``. Neither factor of a row depends on the
    column but ``G``: when the table has no other use, the squares summed over the chunk's
    columns are those of one column ``sqrt(sum_m G[m, n]^2)``, and the rows cost no more for
    EXACT's ``C - 1`` columns than for one."""

    name = "embedding_bag"
    takes_functions = True  # its terms tell uses apart by position or kind

    def accepts(self, module):
        # scale_grad_by_freq divides by counts over the whole batch: not a per-sample gradient
        return not module.scale_grad_by_freq

    def inputs(self, args, kwargs):
        """``(input, offsets, per_sample_weights)``, positional or keyword; the last two may be
        ``None``."""
        x = args[0] if args else kwargs.get("input")
        offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
        psw = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
        return (x, offsets, psw) if isinstance(x, torch.Tensor) else None

    def capture(self, cap, module, x, y):
        """``x``: ``(input, offsets, per_sample_weights)`` (:meth:`inputs`)."""
        x, offsets, psw = x
        data = bag_data(cap, module, x, offsets, psw, y)
        if data is None:
            return None
        uses = [Use(p, UseKind.ROWS) for p in trainable(cap, module.weight)]
        tap, out = cap.tap(y, lead=1, key=(id(module), 0), batch_first=True)
        cap.record(Call(module, self, [tap], uses, data))
        return out

    def terms(self, call, grads):
        G = grads[0]
        if G is None or not call.uses or call.data["ids"].shape[1] == 0:
            return [None] * len(call.uses)
        data = call.data
        if G.shape[0] > 1 and _only_use(call):
            # the squares of the chunk's columns at once: one column sqrt(sum_m G^2)
            dt = compute_dtype(G.dtype)
            G = G.to(dt).square().sum(0, keepdim=True).sqrt_()
        if "sel" in data:  # max: G[m, n, j] at the position of the bag's argmax for dim j
            Qe = G.unsqueeze(2) * data["sel"].to(G.dtype)
        else:
            Qe = G.unsqueeze(2) * data["w"].to(G.dtype).unsqueeze(-1)
        return [Rows(data["ids"], data["keep"], Qe)]


def bag_data(cap, module, x, offsets, psw, y) -> dict | None:
    """What :class:`EmbeddingBagRule` needs of one call: the padded bags (``ids``, ``keep``) and
    their weights or max positions; ``None`` for a call it leaves to the generic path. ``module``
    has the bag's ``weight``, ``mode``, ``padding_idx`` and ``include_last_offset``."""
    if y.dim() != 2 or x.dim() not in (1, 2) or (x.dim() == 1) != (offsets is not None):
        return None
    if module.include_last_offset and offsets is not None and (
        offsets.numel() == 0 or int(offsets[-1]) != x.numel()
    ):
        # ids past the last offset: torch's forward leaves them out but its backward sends
        # them the last bag's gradient; the generic path follows the backward
        return None
    ids, keep, w = _padded_bags(module, x, offsets, psw)
    if ids.shape[0] != y.shape[0]:
        return None
    data = {"ids": ids, "keep": keep, "cap": weakref.ref(cap)}
    if ids.shape[1]:  # (every bag empty: no gradient, see terms)
        with torch.no_grad():
            data.update(_bag_factors(module, x, offsets, ids, keep, w, y.dtype))
    return data


def _only_use(call: Call) -> bool:
    """Whether the call's table has no use in another captured call of the step (then its
    squares add per call, and the chunk's columns may be squared together)."""
    cap = call.data["cap"]()
    if cap is None:
        return False
    p = call.uses[0].param
    return sum(u.param is p for c in cap.calls for u in c.uses) == 1


def _padded_bags(module, x, offsets, psw):
    """``(ids, keep, w)``, each ``(B, L)``: the ids of every bag padded to the longest one,
    the entries that count (not padding, not ``padding_idx``; ``None``: all of them), and the
    per-sample weights (``None`` without), all detached."""
    x = x.detach()
    w = None if psw is None else psw.detach()
    if x.dim() == 2:
        ids, keep = x.long(), None
        if w is not None:
            w = w.reshape(ids.shape)
    else:
        n = x.numel()
        off = offsets.detach().long()
        if module.include_last_offset:
            starts, ends = off[:-1], off[1:]
        else:
            starts, ends = off, torch.cat([off[1:], off.new_tensor([n])])
        lengths = (ends.clamp(max=n) - starts).clamp_min(0)
        L = int(lengths.max()) if lengths.numel() else 0
        pos = torch.arange(L, device=x.device)
        keep = pos < lengths.unsqueeze(1)
        at = (starts.unsqueeze(1) + pos).clamp(0, max(n - 1, 0))
        ids = x.long()[at] * keep if n else torch.zeros_like(at)
        if w is not None:
            w = w.reshape(-1)[at] if n else torch.zeros(at.shape, dtype=w.dtype, device=x.device)
    if module.padding_idx is not None:
        pad = ids != padding_idx(module)
        keep = pad if keep is None else keep & pad
    return ids, keep, w


def _bag_factors(module, x, offsets, ids, keep, w, dtype) -> dict:
    """``{"w": (B, L)}``, the weight of every entry of every bag (``sum``, ``mean``), or
    ``{"sel": (B, L, d)}``, the position each dimension's maximum took (``max``)."""
    if keep is None:  # every entry counts (2-D ids, no padding_idx)
        keep = torch.ones_like(ids, dtype=torch.bool)
    if module.mode == "max":
        return {"sel": _max_positions(module, x, offsets, ids, keep)}
    if module.mode == "mean":
        k = keep.to(dtype)
        return {"w": k / k.sum(1, keepdim=True).clamp_min(1)}
    return {"w": keep.to(dtype) if w is None else w * keep}


def _max_positions(module, x, offsets, ids, keep) -> torch.Tensor:
    """``(B, L, d)`` bool: for every bag and dimension ``j``, the position whose row the bag's
    maximum took (the first position holding the row ``torch.embedding_bag`` reports; none for
    an empty bag)."""
    if x.dim() == 2:
        B, L = x.shape
        x, offsets = x.reshape(-1), torch.arange(0, B * L, L, device=x.device, dtype=x.dtype)
    rows = torch.embedding_bag(
        module.weight.detach(), x.detach(), offsets.detach(), False, 2, False, None,
        module.include_last_offset, padding_idx(module),
    )[3]  # (B, d) row index of each maximum
    hit = (ids.unsqueeze(-1) == rows.unsqueeze(1)) & keep.unsqueeze(-1)  # (B, L, d)
    first = hit.int().argmax(1, keepdim=True)  # the first position holding that row
    pos = torch.arange(ids.shape[1], device=ids.device).view(1, -1, 1)
    return (pos == first) & hit.any(1, keepdim=True)
