"""Layer capture for the Kronecker-factored and quasi-diagonal representations.

Supported layers: ``nn.Linear`` (inputs ``(N, ..., I)``: every leading position after the batch
dimension shares the weight) and ``nn.Conv2d`` (``groups=1``, zero padding: every output location
shares the weight). During the forward a hook keeps each call's input (detached) and taps its
output: it returns ``y + z`` with ``z`` a zero scalar expanded to ``y``'s shape, whose gradient is
the gradient at the layer output even when later code modifies ``y`` in place.

In the factor layout a layer's weight and bias form one ``(O, I')`` matrix: ``I' = I + 1`` with the
bias as the last column (the input with an appended 1), ``I' = I`` without bias. For a
convolution ``I = C_in * kh * kw`` in the order of ``F.unfold`` (the weight flattened row-major).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (nn.Linear, nn.Conv2d)


@dataclass
class Layer:
    """One supported module and its trainable parameters."""

    name: str
    module: nn.Module
    weight: str
    bias: str | None
    calls: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def O(self) -> int:  # noqa: E743 - the output size, as in the formulas
        return int(self.module.weight.shape[0])

    @property
    def I(self) -> int:  # noqa: E743
        w = self.module.weight
        return int(w[0].numel())

    @property
    def In(self) -> int:
        """``I'``: input size with the appended 1 when there is a bias."""
        return self.I + (1 if self.bias is not None else 0)


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(m.kernel_size, m.dilation):
            if (d * (k - 1)) % 2:
                raise ValueError(f"module {m!r}: padding='same' with an even effective kernel is "
                                 "asymmetric; not supported by the Kronecker representations")
            pads.append(d * (k - 1) // 2)
        return tuple(pads)
    return tuple(m.padding)


def layers_of(model: nn.Module, names: list[str], params: list[torch.Tensor],
              representation: str) -> list[Layer]:
    """The supported layers holding every trainable parameter (raises, naming the module, for a
    parameter held by an unsupported module)."""
    pname = {id(p): n for n, p in zip(names, params)}
    covered: dict[str, str] = {}
    layers = []
    for mname, m in model.named_modules():
        own = [(k, p) for k, p in m.named_parameters(recurse=False) if id(p) in pname]
        if not own:
            continue
        label = mname or "<root>"
        if not isinstance(m, SUPPORTED):
            raise ValueError(
                f"representation={representation!r} supports nn.Linear and nn.Conv2d layers only; "
                f"module {label!r} ({type(m).__name__}) holds trainable parameters "
                f"{[pname[id(p)] for _, p in own]}. Freeze them (requires_grad=False) or use "
                "representation='dense', 'block_diag', 'low_rank' or 'diag'"
            )
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros":
                raise ValueError(f"representation={representation!r}: module {label!r} is a "
                                 f"Conv2d with groups={m.groups}, padding_mode={m.padding_mode!r};"
                                 " only groups=1 with zero padding is supported")
            _conv_padding(m)
        w_ok = id(m.weight) in pname
        b_ok = m.bias is not None and id(m.bias) in pname
        if not w_ok or (m.bias is not None and not b_ok):
            raise ValueError(f"representation={representation!r}: module {label!r} has a frozen "
                             "weight or bias next to a trainable one; freeze both or neither")
        for _, p in own:
            if pname[id(p)] in covered:
                raise ValueError(f"parameter {pname[id(p)]!r} is shared by modules "
                                 f"{covered[pname[id(p)]]!r} and {label!r}")
            covered[pname[id(p)]] = label
        layers.append(Layer(label, m, pname[id(m.weight)], pname[id(m.bias)] if b_ok else None))
    return layers


@contextmanager
def capture(layers: list[Layer]) -> Iterator[list[Layer]]:
    """Record ``(input, tap)`` of every call of ``layers`` during the forward; hooks removed on
    exit."""
    handles = []

    def hook_for(layer: Layer):
        def hook(mod, inputs, out):
            z = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
            z = z.expand(out.shape)
            layer.calls.append((inputs[0].detach(), z))
            return out + z

        return hook

    try:
        for layer in layers:
            layer.calls = []
            handles.append(layer.module.register_forward_hook(hook_for(layer)))
        yield layers
    finally:
        for h in handles:
            h.remove()


def check_calls(layers: list[Layer], flat: torch.Tensor, N: int) -> None:
    """Every layer ran, with the batch first, and its weight reaches the logits only through its
    own calls (a weight also used functionally, e.g. an output head tied to an embedding, or
    ``nn.MultiheadAttention.out_proj``, whose weight the attention uses without calling it)."""
    edges = _parameter_edges(flat, [layer.module.weight for layer in layers])
    for layer in layers:
        if not layer.calls:
            raise ValueError(
                f"module {layer.name!r} ({type(layer.module).__name__}) holds trainable parameters "
                "but its forward was never called (its weights are used functionally, as in "
                "nn.MultiheadAttention.out_proj); the Kronecker representations cannot capture it"
            )
        for x, _ in layer.calls:
            if x.dim() < 2 or x.shape[0] != N:
                raise ValueError(f"module {layer.name!r} got an input of shape {tuple(x.shape)}; "
                                 f"the batch (N={N}) must be its first dimension")
        n_edges = edges.get(id(layer.module.weight), 0)
        if n_edges != len(layer.calls):
            raise ValueError(
                f"the weight of module {layer.name!r} reaches the logits through {n_edges} uses "
                f"but the module was called {len(layer.calls)} time(s): it is also used outside "
                "its forward (tied or functional use), which Kronecker factors cannot represent"
            )


def _parameter_edges(flat: torch.Tensor, params: list[torch.Tensor]) -> dict[int, int]:
    """Number of autograd edges into each parameter's AccumulateGrad node from ``flat``."""
    wanted = {id(p) for p in params}
    counts: dict[int, int] = {}
    seen = set()
    stack = [flat.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                if id(var) in wanted:
                    counts[id(var)] = counts.get(id(var), 0) + 1
                continue
            stack.append(nxt)
    return counts


def inputs_of(layer: Layer) -> torch.Tensor:
    """``(N, T, I')`` inputs of every call, positions of all calls concatenated (``T``)."""
    m = layer.module
    parts = []
    for x, _ in layer.calls:
        N = x.shape[0]
        if isinstance(m, nn.Conv2d):
            a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=_conv_padding(m),
                         stride=m.stride).transpose(1, 2)
        else:
            a = x.reshape(N, -1, x.shape[-1])
        if layer.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1)
        parts.append(a)
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def positions_of(layer: Layer, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(N, T)`` 0/1 weights of the input positions (``None``: all count): the positions of a
    Linear whose input is ``(N, T, I)`` with the ``(N, T)`` shape of the attention mask are
    weighted by the mask (padding left out of the input factor)."""
    if mask is None or isinstance(layer.module, nn.Conv2d):
        return None
    ws = []
    for x, _ in layer.calls:
        if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            ws.append((mask != 0).to(x.dtype))
        else:
            ws.append(x.new_ones(x.shape[0], x[0, ..., 0].numel()))
    return torch.cat(ws, 1)


def out_grads(layer: Layer, grads: list[torch.Tensor | None]) -> torch.Tensor:
    """``(M, N, T, O)`` gradients at the outputs of every call, from the tap gradients
    (``(M, *output.shape)`` each, ``None`` for a call the cotangents do not reach)."""
    parts = []
    for (_x, z), g in zip(layer.calls, grads):
        if g is None:
            g = torch.zeros((1,) + tuple(z.shape), dtype=z.dtype, device=z.device)
        M, N = g.shape[0], g.shape[1]
        if isinstance(layer.module, nn.Conv2d):
            g = g.reshape(M, N, layer.O, -1).transpose(2, 3)
        else:
            g = g.reshape(M, N, -1, layer.O)
        parts.append(g)
    if len(parts) == 1:
        return parts[0]
    M = max(p.shape[0] for p in parts)
    return torch.cat([p.expand(M, *p.shape[1:]) for p in parts], 2)
