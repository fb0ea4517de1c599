"""``nn.MultiheadAttention`` in the Kronecker representations: four linear layers.

The query, key and value rows of the input projection (``in_proj_weight[0:E]``, ``[E:2E]``,
``[2E:3E]`` and the matching entries of ``in_proj_bias``, or ``q_proj_weight``, ``k_proj_weight``,
``v_proj_weight``) are three layers with inputs ``query``, ``key`` and ``value``, and ``out_proj``
a fourth with the attention context as input. The module's forward runs as the replay of
:mod:`fimfast.rules.attention` (the same function, with the projections as separate tapped ops);
a packed projection (self-attention, or key is value) is tapped once and each layer takes its
columns of the tap's gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

NOT_REPLAYED = (
    ": nn.MultiheadAttention is captured through a replay of its forward, which it did not run "
    "(dropout > 0 in training mode, unbatched inputs, or a mask of a layout the replay does not "
    "reproduce); call model.eval() or use representation='dense', 'block_diag', 'low_rank' or "
    "'diag'"
)


def layers(representation: str, label: str, m: nn.MultiheadAttention, pname: dict, Layer):
    """The layers of ``m``'s trainable projections (query, key, value, out)."""
    E = m.embed_dim
    trainable = [p for p in m.parameters() if id(p) in pname]
    if not trainable:
        return []
    if m.bias_k is not None or m.add_zero_attn:
        raise ValueError(f"representation={representation!r}: module {label!r} "
                         "(MultiheadAttention) has add_bias_kv or add_zero_attn, which the "
                         "Kronecker representations do not support; use representation='dense', "
                         "'block_diag', 'low_rank' or 'diag'")

    def check(ws, b, what):
        ok = [id(w) in pname for w in ws] + ([id(b) in pname] if b is not None else [])
        if any(ok) and not all(ok):
            raise ValueError(f"representation={representation!r}: module {label!r} "
                             f"(MultiheadAttention) has a frozen {what} weight or bias next to a "
                             "trainable one; freeze both or neither")
        return all(ok)

    b = m.in_proj_bias
    bname = pname.get(id(b)) if b is not None else None
    packed = m._qkv_same_embed_dim
    ws = [m.in_proj_weight] * 3 if packed else [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
    out: list = []
    if check(list({id(w): w for w in ws}.values()), b, "input projection"):
        for r, (part, W) in enumerate(zip("qkv", ws)):
            out.append(Layer(f"{label}.{part}", m, pname[id(W)], bname, W, E, int(W.shape[1]),
                             row0=r * E if packed else 0, bias_row0=r * E, part=part))
    op = m.out_proj
    if check([op.weight], op.bias, "out_proj"):
        out.append(Layer(f"{label}.out_proj", m, pname[id(op.weight)],
                         pname[id(op.bias)] if op.bias is not None else None, op.weight,
                         int(op.weight.shape[0]), int(op.weight.shape[1]), part="out"))
    return out


class _Replay:
    """The replayed attention modules of one forward; :meth:`finish` hands each layer its
    calls."""

    def __init__(self, by_module: dict[int, list]):
        self.by_module = by_module
        self.cap = None

    def finish(self) -> None:
        if self.cap is None:
            return
        for call in self.cap.calls:
            ls = self.by_module.get(id(call.module), [])
            taps = {t.key[1]: t for t in call.taps}
            E = call.module.embed_dim
            for layer in ls:
                x, tap, sl = _source(layer.part, taps, call.data, E)
                layer.calls.append((x, tap.handle, sl))
        self.cap.calls = []


def _source(part: str, taps: dict, data: dict, E: int):
    """``(input, tap, columns)`` of projection ``part`` in one replayed call."""
    if part == "out":
        return data["ctx"], taps["out"], None
    if part == "q":
        return data["xq"], taps["xq"], slice(0, E)
    if part == "k":
        if "xk" in taps:
            return data["xk"], taps["xk"], slice(0, E)
        return data["xq"], taps["xq"], slice(E, 2 * E)
    if "xv" in taps:
        return data["xv"], taps["xv"], None
    if "xk" in taps:
        return data["xk"], taps["xk"], slice(E, 2 * E)
    return data["xq"], taps["xq"], slice(2 * E, 3 * E)


@contextmanager
def replayed(layers: list) -> Iterator[_Replay]:
    """Run the forward of every attention module among ``layers`` as the tapped replay."""
    from fimfast.hooks import Capture
    from fimfast.rules.attention import MHARule

    by_module: dict[int, list] = {}
    mods = []
    for layer in layers:
        if isinstance(layer.module, nn.MultiheadAttention):
            if id(layer.module) not in by_module:
                mods.append(layer.module)
            by_module.setdefault(id(layer.module), []).append(layer)
    rep = _Replay(by_module)
    if not mods:
        yield rep
        return
    params = [layer.param for ls in by_module.values() for layer in ls]
    params += [p for m in mods for p in (m.in_proj_bias, m.out_proj.bias) if p is not None]
    rep.cap = Capture(None, params, lambda m: None)
    rule = MHARule()
    undo = [rule.install(m, rep.cap) for m in mods]
    rep.cap.active = True
    try:
        yield rep
    finally:
        rep.cap.active = False
        for u in reversed(undo):
            u()

