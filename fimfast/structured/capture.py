"""Layer capture for the Kronecker-factored and quasi-diagonal representations.

Supported layers (docs/structured.md, "KFAC"), each a :class:`Layer` of one ``kind``:

* ``linear``: ``nn.Linear`` (inputs ``(N, ..., I)``: every leading position after the batch
  dimension shares the weight), ``nn.Conv2d`` (``groups=1``, zero padding: every output location
  shares the weight) and the four projections of ``nn.MultiheadAttention`` (query, key and value
  rows of the input projection as three layers, and ``out_proj``), whose forward runs as the
  replay with tapped projections of :mod:`fimfast.rules.attention`;
* ``embedding``: ``nn.Embedding``, a linear map of the one-hot token (its input factor is
  diagonal: the token counts);
* ``layernorm``: ``nn.LayerNorm``'s elementwise affine map ``y_d = gamma_d x_hat_d + beta_d``:
  feature ``d`` has its own input ``(x_hat_d, 1)`` (its KFAC is a Hadamard product, see
  :mod:`fimfast.structured.factors`).

During the forward each call's input is kept (detached) and its output ``y`` tapped, by the
module's capturing instance forward (:mod:`fimfast.structured.forwards`; a forward hook in models
that hold compiled or ``DataParallel`` modules), ahead of the module's own forward hooks: it keeps
``y``'s gradient edge (:class:`Edge`, the output of the autograd node that made ``y``), where the
backward delivers the gradient at the layer output even when later code modifies ``y`` in place
(the in-place operation becomes a new node after it). An output without a node (made without
gradient tracking) is tapped as ``y + z`` instead, ``z`` a zero scalar expanded to ``y``'s shape.

In the factor layout a layer is an ``(O, I')`` matrix: for ``linear`` the weight and bias (``I' =
I + 1`` with the bias as the last column, the input with an appended 1; for a convolution ``I =
C_in * kh * kw`` in the order of ``F.unfold``); for ``embedding`` the transposed weight ``(D, V)``;
for ``layernorm`` one row ``(gamma_d, beta_d)`` per feature.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fimfast.persample import walk as graph_walk
from fimfast.rules.conv import input_padding, ntuple
from fimfast.structured import attention, uses
from fimfast.structured import forwards as fwds
from fimfast.structured.forwards import Edge

SUPPORTED = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.MultiheadAttention)
KINDS = ("linear", "embedding", "layernorm")


@dataclass
class Layer:
    """One Kronecker block: a module (or a projection of an attention module) and its trainable
    parameters. ``calls``: per call, ``(input, tap, output slice)``."""

    name: str
    module: nn.Module
    weight: str
    bias: str | None
    param: torch.Tensor  # the weight tensor (its autograd edges are counted)
    O: int  # noqa: E741 - output size (embedding: D; layernorm: features)
    I: int  # noqa: E741 - input size without the 1 of the bias
    kind: str = "linear"
    row0: int = 0  # first row of the weight the block covers (attention q, k, v)
    bias_row0: int = 0  # first entry of the bias the block covers
    part: str = ""  # attention: "q", "k", "v" or "out"
    calls: list[tuple[torch.Tensor, torch.Tensor | Edge, slice | None]] = field(
        default_factory=list)
    # the capturing instance forward of the module (fimfast.structured.forwards), made on first use
    forward: Any = field(default=None, repr=False, compare=False)

    @property
    def In(self) -> int:
        """``I'``: input size with the appended 1 when there is a bias."""
        return self.I + (1 if self.bias is not None else 0)


def conv_args(m: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``(kernel, dilation, stride)`` of a convolution as its forward uses them on every call:
    the kernel from the weight's shape, ``dilation`` and ``stride`` as set now (an int or a pair,
    also when set after construction: :func:`fimfast.rules.conv.ntuple`)."""
    return tuple(m.weight.shape[-2:]), ntuple(m.dilation, 2), ntuple(m.stride, 2)


def conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    """The zero padding ``(p_h, p_w)`` that ``Conv2d.forward`` applies, read as the layer rule
    reads it (:func:`fimfast.rules.conv.input_padding`: ``m.padding`` as set now, an int, a pair,
    ``'valid'`` or ``'same'``, not the constructor's ``_reversed_padding_repeated_twice``);
    refused where it is asymmetric (``'same'`` with an even effective kernel)."""
    wl, wr, hl, hr = input_padding(m)
    if wl != wr or hl != hr:
        raise ValueError(f"module {m!r}: padding='same' with an even effective kernel is "
                         "asymmetric; not supported by the Kronecker representations")
    return (hl, wl)


def _refuse(representation: str, label: str, m: nn.Module, why: str) -> ValueError:
    return ValueError(f"representation={representation!r}: module {label!r} "
                      f"({type(m).__name__}) {why}")


def _module_layers(representation, label, m, pname) -> list[Layer]:
    """The layers of one supported module whose parameters are all trainable."""
    w, b = m.weight, getattr(m, "bias", None)
    if not isinstance(b, torch.Tensor):
        b = None
    w_ok, b_ok = w is not None and id(w) in pname, b is not None and id(b) in pname
    made = [n for n, t in (("weight", w), ("bias", b))
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)]
    if made:  # torch.nn.utils.prune: weight = weight_orig * weight_mask, set before the forward
        raise _refuse(representation, label, m, f"has a {' and '.join(made)} made from other "
                      "tensors (a pruned or reparametrised module): its factors would be those of "
                      "that tensor, not of the trainable parameters behind it; use the dense, "
                      "block_diag, low_rank or diag representation")
    if not w_ok or (b is not None and not b_ok):
        raise _refuse(representation, label, m, "has a frozen weight or bias next to a trainable "
                      "one; freeze both or neither")
    bname = pname[id(b)] if b_ok else None
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or m.padding_mode != "zeros":
            raise _refuse(representation, label, m, f"has groups={m.groups}, padding_mode="
                          f"{m.padding_mode!r}; only groups=1 with zero padding is supported")
        conv_padding(m)
    if isinstance(m, nn.Embedding):
        return [Layer(label, m, pname[id(w)], None, w, m.embedding_dim, m.num_embeddings,
                      "embedding")]
    if isinstance(m, nn.LayerNorm):
        return [Layer(label, m, pname[id(w)], bname, w, w.numel(), 1, "layernorm")]
    return [Layer(label, m, pname[id(w)], bname, w, int(w.shape[0]), int(w[0].numel()))]


def layers_of(model: nn.Module, names: list[str], params: list[torch.Tensor],
              representation: str) -> list[Layer]:
    """The supported layers holding every trainable parameter (raises, naming the module, for a
    parameter held by an unsupported module)."""
    pname = {id(p): n for n, p in zip(names, params)}
    covered: dict[str, str] = {}
    layers: list[Layer] = []
    done: set[int] = set()
    for mname, m in model.named_modules():
        label = mname or "<root>"
        if id(m) in done:
            continue
        if isinstance(m, nn.MultiheadAttention):
            found = attention.layers(representation, label, m, pname, Layer)
            done.add(id(m.out_proj))
        else:
            own = [p for p in m._parameters.values() if p is not None and id(p) in pname]
            if not own:
                continue
            if not isinstance(m, SUPPORTED):
                raise ValueError(
                    f"representation={representation!r} supports nn.Linear, nn.Conv2d, "
                    "nn.Embedding, nn.LayerNorm and nn.MultiheadAttention layers only; module "
                    f"{label!r} ({type(m).__name__}) holds trainable parameters "
                    f"{[pname[id(p)] for p in own]}. Freeze them (requires_grad=False) or use "
                    "representation='dense', 'block_diag', 'low_rank' or 'diag'"
                )
            found = _module_layers(representation, label, m, pname)
        for layer in found:
            for n in (layer.weight, layer.bias):
                if n is not None and covered.get(n, label) != label:
                    raise ValueError(f"parameter {n!r} is shared by modules {covered[n]!r} and "
                                     f"{label!r}")
                if n is not None:
                    covered[n] = label
        layers.extend(found)
    return layers


def check_batch_statistics(model: nn.Module) -> None:
    """Refuse a BatchNorm that normalises with the batch's statistics (train mode, or no running
    statistics), naming it: it mixes the samples, so the gradient a sample's rows send to a layer
    output below it reaches the other samples' positions too, while a Kronecker factor or a
    quasi-diagonal square takes the gradient at a sample's position as that sample's own."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
                m.training or m.running_mean is None):
            raise ValueError(
                f"module {name or '<root>'!r} "
                f"({type(m).__name__}) normalises with batch statistics (train mode, or "
                "track_running_stats=False), which mixes the samples; the Kronecker and "
                "quasi-diagonal representations take each sample's gradient at a layer output as "
                "its own. Call model.eval() (running statistics), or use representation='dense', "
                "'block_diag', 'low_rank' or 'diag' (the Fisher of the batch-coupled function)")


def grad_input(tap):
    """What ``torch.autograd.grad`` takes for a tap: the edge of an :class:`Edge`, or the
    tensor."""
    return tap.edge if isinstance(tap, Edge) else tap


# per module class, the supported class it is (check_forwards)
_BASE: dict[type, type] = {}


def check_forwards(layers: list[Layer]) -> None:
    """Refuse a captured module whose forward is not its supported class's (set on the instance,
    as wrapping libraries do, or overridden by a subclass), naming it: the capture reads the
    module's input and output as those of its class's map (``y = x W^T + b``, ...), which another
    forward need not compute (checked on every batch: a forward may be set after the start).
    A convolution's ``padding_mode`` and ``groups`` are checked again too (read on every call)."""
    seen: set[int] = set()
    for layer in layers:
        m = layer.module
        if id(m) in seen:
            continue
        seen.add(id(m))
        base = _BASE.get(type(m))
        if base is None:
            base = _BASE[type(m)] = next(c for c in SUPPORTED if isinstance(m, c))
        name = layer.name.rsplit(".", 1)[0] if layer.part else layer.name  # attention: "a.q"
        if "forward" in vars(m) or type(m).forward is not base.forward:
            how = "set on the instance" if "forward" in vars(m) else \
                f"overridden by {type(m).__name__}"
            raise ValueError(
                f"module {name!r} ({type(m).__name__}) runs a forward other than "
                f"{base.__name__}.forward ({how}); the Kronecker and quasi-diagonal "
                f"representations capture {base.__name__}'s own map. Use representation='dense', "
                "'block_diag', 'low_rank' or 'diag' (which differentiate the forward that runs), "
                "or freeze the module's parameters")
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise ValueError(f"module {name!r} ({type(m).__name__}) has groups={m.groups}, "
                             f"padding_mode={m.padding_mode!r}; only groups=1 with zero padding "
                             "is supported by the Kronecker and quasi-diagonal representations")


@contextmanager
def capture(layers: list[Layer], model: nn.Module | None = None,
            modules: list[nn.Module] | None = None) -> Iterator[list[Layer]]:
    """Record ``(input, tap, None)`` of every call of ``layers`` during the forward (attention
    projections: see :func:`finish`); undone on exit. Modules whose forward is not their class's
    are refused first (:func:`check_forwards`). With ``model`` the calls are recorded through
    instance forwards where its modules allow it (:mod:`fimfast.structured.forwards`; a BatchNorm
    normalising with batch statistics is refused in the same walk,
    :func:`check_batch_statistics`), through forward hooks otherwise. ``modules``:
    ``list(model.modules())`` where the caller keeps it (the guards' walk), read instead of
    walking the model again."""
    plain = model is not None and fwds.instance_forwards(model, check_batch_statistics, modules)
    check_forwards(layers)
    handles: list = []
    on: list = []
    try:
        for layer in layers:
            layer.calls = []
        with attention.replayed(layers) as att:
            fwds.install(layers, plain, handles, on)
            yield layers
            att.finish()
    finally:
        fwds.uninstall(handles, on)


def check_calls(layers: list[Layer], flat: torch.Tensor, N: int) -> int:
    """Every layer ran, with the batch first, and its weight reaches the logits only through its
    own calls (a weight also used functionally, e.g. an output head tied to an embedding, is
    refused). Returns the shape of the graph (:func:`fimfast.persample.walk.shape`)."""
    biases = uses.bias_params(layers)
    graph = graph_walk.walk(flat, [layer.param for layer in layers] + biases, None)
    if graph.reentrant:  # its layers' outputs are not in the graph of the logits
        raise ValueError(
            "the model runs a torch.utils.checkpoint segment with use_reentrant=True, whose "
            "layers torch differentiates only through .backward(): the Kronecker and "
            "quasi-diagonal representations need the gradient at each layer's output; pass "
            "use_reentrant=False")
    edges = graph.edges
    for layer in layers:
        if not layer.calls:
            unused = not edges.get(id(layer.param), 0)  # its weight does not reach the logits
            raise ValueError(
                f"module {layer.name!r} ({type(layer.module).__name__}) holds trainable parameters "
                "but its forward was never called"
                + (attention.NOT_REPLAYED if isinstance(layer.module, nn.MultiheadAttention) else
                   " on this batch, nor is its weight used (a branch that skips it): the "
                   "Kronecker representations need every trainable layer called on every batch; "
                   "freeze it, or use representation='dense', 'block_diag', 'low_rank' or 'diag'"
                   if unused else " (its weights are used functionally); the Kronecker "
                   "representations cannot capture it")
            )
        for x, z, _ in layer.calls:
            if x.dim() < (1 if layer.kind == "embedding" else 2) or x.shape[0] != N:
                raise ValueError(f"module {layer.name!r} got an input of shape {tuple(x.shape)}; "
                                 f"the batch (N={N}) must be its first dimension")
            if isinstance(z, torch.Tensor) and not z.requires_grad:  # run under no_grad
                raise ValueError(uses.unreached(layer))
        n_edges = edges.get(id(layer.param), 0)
        if n_edges < len(layer.calls):  # every call that reaches the logits adds an edge
            raise ValueError(uses.unreached(layer))
        if n_edges != len(layer.calls):
            raise ValueError(
                f"the weight of module {layer.name!r} reaches the logits through {n_edges} uses "
                f"but the module was called {len(layer.calls)} time(s): it is also used outside "
                "its forward (tied or functional use), which Kronecker factors cannot represent"
            )
    uses.check_bias_uses(layers, biases, edges)
    return graph_walk.shape(graph)


def _ln_dims(m: nn.LayerNorm) -> int:
    return len(m.normalized_shape)


def inputs_of(layer: Layer, dtype: torch.dtype | None = None, ones: bool = True,
              any_order: bool = False) -> torch.Tensor:
    """The inputs of every call, positions of all calls concatenated (``T``): ``(N, T, I')``
    (linear; ``(N, T, I)`` without the appended 1 of the bias if ``ones=False``), ``(N, T)``
    token ids (embedding), ``(N, T, D)`` normalised inputs ``x_hat`` (layernorm; the 1 of the
    bias is implicit). ``any_order=True``: a convolution's patches in the faster order of
    :func:`unfold` where :func:`channels_last_inputs` says so."""
    cl = any_order and channels_last_inputs(layer)
    m = layer.module
    parts = []
    for x, _, _ in layer.calls:
        N = x.shape[0]
        if layer.kind == "embedding":
            parts.append(x.reshape(N, -1))
            continue
        if layer.kind == "layernorm":
            nd = _ln_dims(m)
            xh = F.layer_norm(x, m.normalized_shape, eps=m.eps)
            parts.append(xh.reshape(N, -1, math.prod(x.shape[x.dim() - nd:])))
            continue
        if isinstance(m, nn.Conv2d):
            a = unfold(x, m, cl)
        else:
            a = x.reshape(N, -1, x.shape[-1])
        if dtype is not None:
            a = a.to(dtype)
        if ones and layer.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1)
        parts.append(a)
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def unfold(x: torch.Tensor, m: nn.Conv2d, channels_last: bool = False) -> torch.Tensor:
    """``(N, L, C k_h k_w)`` patches of a convolution's input, contiguous: ``F.unfold(x, ...)
    .transpose(1, 2)`` (same order of locations ``L`` and of patch entries) as one strided copy
    (``F.unfold`` writes ``(N, C k_h k_w, L)`` and the transpose is a second copy).

    ``channels_last=True``: the entries of a patch in the order ``(k_h, k_w, C)`` instead of
    ``(C, k_h, k_w)`` (:func:`patch_order` maps one to the other), copied from the input in
    ``(N, H, W, C)`` layout in runs of ``k_w C`` values (about 7 times faster for 16 channels
    and a 5 x 5 kernel than runs of ``k_w``)."""
    ph, pw = conv_padding(m)
    (kh, kw), (dh, dw), (sh, sw) = conv_args(m)
    if x.dim() != 4:
        return F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw),
                        stride=(sh, sw)).transpose(-1, -2)
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if channels_last else \
        x.contiguous()
    N, C, H, W = x.shape
    oh, ow = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    sN, sC, sH, sW = x.stride()
    if channels_last:
        v = x.as_strided((N, oh, ow, kh, kw, C), (sN, sH * sh, sW * sw, sH * dh, sW * dw, sC))
    else:
        v = x.as_strided((N, oh, ow, C, kh, kw), (sN, sH * sh, sW * sw, sC, sH * dh, sW * dw))
    return v.reshape(N, oh * ow, C * kh * kw)


def patch_order(m: nn.Conv2d) -> torch.Tensor:
    """``p`` with ``a_cl[..., p] = a``: entry ``(c, i, j)`` of a patch (``F.unfold``'s order) is
    entry ``(i, j, c)`` of :func:`unfold` with ``channels_last=True``."""
    C, (kh, kw) = m.in_channels, conv_args(m)[0]
    return torch.arange(kh * kw * C).reshape(kh, kw, C).permute(2, 0, 1).reshape(-1)


def channels_last_inputs(layer: Layer) -> bool:
    """Whether :func:`inputs_of` with ``any_order=True`` gives this layer's patches in the
    ``(k_h, k_w, C)`` order (a convolution of several input channels, batched 4-D inputs)."""
    m = layer.module
    return isinstance(m, nn.Conv2d) and m.in_channels > 1 and \
        all(x.dim() == 4 for x, _, _ in layer.calls)


def positions_of(layer: Layer, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(N, T)`` 0/1 weights of the input positions (``None``: all count): the positions of a
    call whose input has the ``(N, T)`` shape of the attention mask in front of its features
    (``(N, T, I)`` for a Linear, ``(N, T)`` ids for an Embedding) are weighted by the mask
    (padding left out of the input factor)."""
    if mask is None or isinstance(layer.module, nn.Conv2d):
        return None
    feat = {"embedding": 0, "layernorm": len(getattr(layer.module, "normalized_shape", ()))}
    feat = feat.get(layer.kind, 1)
    ws = []
    for x, _, _ in layer.calls:
        lead = tuple(x.shape[: x.dim() - feat])
        if lead == tuple(mask.shape):
            ws.append((mask != 0).to(torch.float64 if x.dtype == torch.float64
                                     else torch.float32))
        else:
            ws.append(torch.ones(x.shape[0], math.prod(lead[1:]), device=x.device))
    return torch.cat(ws, 1)


def out_grads(layer: Layer, grads: list[torch.Tensor | None]) -> torch.Tensor:
    """``(M, N, T, O)`` gradients at the outputs of every call, from the tap gradients
    (``(M, *output.shape)`` each, ``None`` for a call the cotangents do not reach)."""
    parts = []
    for (_x, z, sl), g in zip(layer.calls, grads):
        if g is None:
            g = torch.zeros((1,) + tuple(z.shape), dtype=z.dtype, device=z.device)
        if sl is not None:
            g = g[..., sl]
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
