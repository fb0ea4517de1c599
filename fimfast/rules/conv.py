"""Rules for convolutions: ``nn.Conv1d/2d/3d`` (unfold the input, one :class:`Outer` per group)
and ``nn.ConvTranspose1d/2d/3d`` (by phases of the stride, an ``Outer`` per phase placed into the
weight by index: docs/math.md §4, "Transposed convolutions")."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fimfast import chunks
from fimfast.hooks import Call, Use
from fimfast.rules import conv_node
from fimfast.rules.base import Outer, Patches, Rule, Term, UseKind, Vec, trainable
from fimfast.rules.conv_grouped import grouped_input
from fimfast.rules.windows import HOST_DIMS, _unfold, _unfold_view, host_unfold, windows

# with several chunks of columns, a convolution's unfolded input patches above this many bytes
# are not kept for the step: read as windows of the input (fimfast/rules/windows.py) where they
# apply, else formed a few samples at a time when squared (ConvRule._input_side, input_side);
# at most one piece of a lazy factor (chunks.PATCH_BYTES), kept patches cost no more memory
PATCHES_LAZY_FROM = 2 << 20


class ConvRule(Rule):
    """``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` (groups, stride, padding of every mode,
    dilation): unfold the (padded) input; ``Outer`` over output positions, one block per
    group."""

    name = "conv"
    takes_functions = True  # its terms tell uses apart by position or kind

    def capture(self, cap, module, x, y):
        if x.dim() != module.weight.dim():  # unbatched input: no sample dimension
            return None
        w, b, g = module.weight, module.bias, module.groups

        def build():
            return [Use(p, UseKind.OUTER, groups=g) if p is w else Use(p, UseKind.VEC)
                    for p in trainable(cap, w, b)]

        uses, internal, key = cap.uses_of(module, self, (w, b, g), build)  # anew for new groups
        tap, out = cap.tap(y, lead=1, key=(id(module), 0), batch_first=True)
        cap.record(Call(module, self, [tap], uses, {"x": x.detach()}), internal, key)
        return out

    def _patches(self, module, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, g, I/g * prod(kernel))`` unfolded input patches."""
        pad = input_padding(module)
        zeros = module.padding_mode == "zeros"  # padded with the windows (windows._unfold)
        if any(pad) and not zeros:
            x = F.pad(x, pad, mode=module.padding_mode)
        k = len(module.kernel_size)
        d, s = ntuple(module.dilation, k), ntuple(module.stride, k)
        U = _unfold(x, module.kernel_size, d, s, pad=pad if zeros and any(pad) else None)
        N, IK, L = U.shape
        g = module.groups
        return U.view(N, g, IK // g, L).permute(0, 3, 1, 2)  # a view: bmm takes the strides

    def _input_side(self, module, x: torch.Tensor, L: int, chunks_: int):
        """The input side of the weight's ``Outer``: with several chunks of columns and one
        group, the :class:`~fimfast.rules.windows.Windows` of the input where they apply (kept
        for the step at a fraction of the patches, never unfolded); with several groups, the
        patches kept up to ``2 PATCHES_LAZY_FROM``; else :func:`input_side`."""
        IK = x.shape[1] * math.prod(module.kernel_size)
        per_sample = IK * L * x.element_size()
        whole = x.shape[0] * per_sample
        if chunks_ > 1 and module.groups == 1 and whole > PATCHES_LAZY_FROM:
            w = windows(module, x, L, chunks.patch_samples(per_sample))
            if w is not None:
                return w
        elif chunks_ > 1 and module.groups > 1 and whole <= 2 * PATCHES_LAZY_FROM:
            # no windows for groups: unfolded once, not per chunk (depthwise Conv2d(16, 16, 3,
            # groups=16), 16 x 16 inputs, 16 samples, 2.4 MB: 11% of an EXACT step of 3 chunks)
            return self._patches(module, x)
        return input_side(functools.partial(self._patches, module), x, IK, L, module.groups,
                          chunks_)

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None] * len(call.uses)
        m = call.module
        if "Q" not in call.data:
            L, x = math.prod(G.shape[3:]), call.data["x"]
            patches = functools.partial(self._patches, m)
            call.data["Q"] = (grouped_input(m, x, patches, L, G.shape[0] * max(1, call.chunks))
                              or self._input_side(m, x, L, call.chunks))
        Q = call.data["Q"]
        M, N, O = G.shape[:3]
        G3 = G.reshape(M, N, O, -1)
        return _conv_terms(call, G3, G3.transpose(2, 3), Q, m.groups)


class ConvTransposeRule(Rule):
    """``nn.ConvTranspose1d/2d/3d`` (groups, stride, padding, output padding or ``output_size``,
    dilation), by phases (docs/math.md §4, "Transposed convolutions"): the output positions of
    one residue modulo the stride (per spatial dim) receive, from each input, the kernel taps of
    one residue class, so that each phase is an ordinary stride-1 convolution of the input, an
    ``Outer`` over its output positions of the output gradient (a strided view, no unfolding per
    chunk) against the input unfolded once per step, placed into the weight by an index. One use
    of the weight per phase that holds a tap, one block per group."""

    name = "conv_transpose"
    takes_functions = True  # its terms tell uses apart by position or kind

    def capture(self, cap, module, x, y):
        if x.dim() != module.weight.dim():  # unbatched input: no sample dimension
            return None
        w, b, g = module.weight, module.bias, module.groups
        seen = (id(module), "columns")  # most columns of a chunk, this estimator's last step
        if cap.memo.get(seen, 2) > 1 or conv_node.single_gain(w, g):
            y = conv_node.fold(x, y, b)  # the columns' input gradient, one convolution

        def build():  # one use of the weight per phase
            n = len(_phases(module, w.device))
            return [u for p in trainable(cap, w, b) for u in (
                [Use(p, UseKind.OUTER, groups=g) for _ in range(n)] if p is w
                else [Use(p, UseKind.VEC)])]

        # built anew when the weight, bias or a setting the phases depend on is another object
        conf = (w, b, g, module.kernel_size, module.stride, module.padding, module.dilation)
        uses, internal, key = cap.uses_of(module, self, conf, build)
        tap, out = cap.tap(y, lead=1, key=(id(module), 0), batch_first=True)
        data = {"x": x.detach(), "memo": (cap.memo, seen)}
        cap.record(Call(module, self, [tap], uses, data), internal, key)
        return out

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None] * len(call.uses)
        m = call.module
        x = call.data["x"]
        g = m.groups
        M, N, O = G.shape[:3]
        if "memo" in call.data:  # one column per chunk: no node in the next step (its cost)
            memo, seen = call.data["memo"]
            memo[seen] = call.data["M"] = max(M, call.data.get("M", 0))
        if "Q" not in call.data and _unfold_cheaper(m, M, call.chunks, x.shape[2:], G.shape[3:]):
            # few columns: the output gradient unfolded, one term for the whole weight
            P = _unfold_output_grad(m, G, x.shape[2:])  # (M, N, L_in, g, O/g * kk)
            Q = x.reshape(N, g, x.shape[1] // g, -1).permute(0, 3, 1, 2)
            whole = Outer(P, Q, _unfolded_index(m, m.weight.device))
            if g == 1:
                whole = Outer(P[:, :, :, 0], Q[:, :, 0], whole.index)
            terms: list[Term | None] = [whole]
        else:
            terms = _phase_terms(call, G)
        out: list[Term | None] = []
        k = 0
        for u in call.uses:  # the weight's uses in order, then the bias (no term: None)
            if u.kind == UseKind.VEC:
                out.append(Vec(G.reshape(M, N, O, -1).sum(-1)))
            else:
                out.append(terms[k] if k < len(terms) else None)
                k += 1
        return out


def _phase_terms(call: Call, G: torch.Tensor) -> list[Term | None]:
    """The phases' ``Outer`` terms: one per phase, or, when every phase has as many taps and
    output positions (kernel and output multiples of the stride), one term for all, the phases
    side by side as groups (``R g`` blocks of ``(O/g, I/g * taps)``: one batched product, and
    the output gradient rearranged by one copy, or none for stride 1)."""
    m, x = call.module, call.data["x"]
    g, s = m.groups, tuple(m.stride)
    phases = _phases(m, m.weight.device)
    out_size = G.shape[3:]
    if "Q" not in call.data:  # the input side of every phase, once per step
        uniform = len(phases) == math.prod(s) and all(
            ph.n == phases[0].n for ph in phases
        ) and all(L % st == 0 for L, st in zip(out_size, s))
        if uniform and len(phases) > 1:  # (N, T, R g, I/g * taps), stored (N, R g, ..., T)
            N, I = x.shape[:2]
            T = math.prod(L // st for L, st in zip(out_size, s))
            buf = x.new_empty(N, len(phases), g, I // g * math.prod(phases[0].n), T)
            for r, ph in enumerate(phases):
                _phase_input(m, x, ph, out_size, buf[:, r])
            Qs = [buf.flatten(1, 2).permute(0, 3, 1, 2)]
        else:
            Qs = [_phase_input(m, x, ph, out_size) for ph in phases]
        call.data["Q"] = Qs
    Qs = call.data["Q"]
    if len(Qs) == 1 and len(phases) > 1:
        M, N, O = G.shape[:3]
        dims = len(s)
        shape = [M, N, g, O // g]
        for L, st in zip(out_size, s):
            shape += [L // st, st]
        # (M, N, g, O/g, T_0, s_0, ...) stored (N, s_0, ..., g, M, O/g, T_0, ...): each
        # (sample, block)'s (M O/g, T) matrix of the batched product a contiguous view
        perm = [1, *(5 + 2 * d for d in range(dims)), 2, 0, 3, *(4 + 2 * d for d in range(dims))]
        P = G.reshape(shape).permute(perm).reshape(N, -1, M, O // g, Qs[0].shape[1])
        return [Outer(P.permute(2, 0, 4, 1, 3), Qs[0], _phases_index(m, m.weight.device))]
    terms: list[Term | None] = []
    for ph, Q in zip(phases, Qs):
        P = _phase_output_grad(G, ph, s, g)
        terms.append(Outer(P, Q, ph.index) if g > 1 else Outer(P[:, :, :, 0], Q[:, :, 0], ph.index))
    return terms


def _phases_index(m, device) -> torch.Tensor:
    """The weight positions of the phases side by side (:func:`_phase_terms`)."""
    return _phases_index_of(
        tuple(m.kernel_size), tuple(m.stride), tuple(m.padding), tuple(m.dilation),
        m.in_channels, m.out_channels, m.groups, device,
    )


@functools.lru_cache(maxsize=256)
def _phases_index_of(*key) -> torch.Tensor:
    return torch.cat([ph.index for ph in _phases_of(*key)])


class _Phase(NamedTuple):
    """One phase of a transposed convolution (see :class:`ConvTransposeRule`), per spatial dim:
    the residue ``r`` of its output positions, the offset ``c`` of its first window into the
    input, its taps' count ``n`` and step ``e`` in the input (its window's dilation); and the
    positions of its product's entries in the weight."""

    r: tuple[int, ...]
    c: tuple[int, ...]
    n: tuple[int, ...]
    e: tuple[int, ...]
    index: torch.Tensor


def _phases(m, device) -> list[_Phase]:
    """The phases of ``m`` that hold a kernel tap (cached per configuration)."""
    return _phases_of(
        tuple(m.kernel_size), tuple(m.stride), tuple(m.padding), tuple(m.dilation),
        m.in_channels, m.out_channels, m.groups, device,
    )


@functools.lru_cache(maxsize=256)
def _phases_of(K, s, p, d, I, O, g, device) -> list[_Phase]:
    """Output position ``q = j s - p + k d`` (one spatial dim) lies in phase ``r = q mod s``
    when ``(r + p - k d)`` is a multiple of ``s``; then ``j = q' + (r + p - k d) / s`` with
    ``q = q' s + r``. The taps of phase ``r``, ``k_0 < k_1 < ...``, step by ``s / gcd(s, d)``,
    their input offsets down by ``e = d / gcd(s, d)``: window element ``t`` (offset ``c + t e``)
    is tap ``k_last - t s / gcd(s, d)``. The product of a phase is laid out ``(g, O/g, I/g,
    *n)``; the weight ``(I, O/g, *K)``."""
    per_dim = []
    for K_, s_, p_, d_ in zip(K, s, p, d):
        opts = []
        for r in range(s_):
            taps = [k for k in range(K_) if (r + p_ - k * d_) % s_ == 0]
            if taps:
                opts.append((r, (r + p_ - taps[-1] * d_) // s_, len(taps), d_ // math.gcd(s_, d_),
                             torch.tensor(taps[::-1])))
        per_dim.append(opts)
    Ig, Og = I // g, O // g
    kstr = [math.prod(K[i + 1 :]) for i in range(len(K))]
    out = []
    for combo in itertools.product(*per_dim):
        kflat = torch.zeros((), dtype=torch.int64)
        for i, dim in enumerate(combo):  # window element -> flat tap, row-major over dims
            shape = [1] * len(combo)
            shape[i] = dim[2]
            kflat = kflat + (dim[4] * kstr[i]).view(shape)
        kflat = kflat.reshape(-1)
        gi = torch.arange(g).view(g, 1, 1, 1)
        oi = torch.arange(Og).view(1, Og, 1, 1)
        ii = torch.arange(Ig).view(1, 1, Ig, 1)
        index = ((gi * Ig + ii) * Og + oi) * math.prod(K) + kflat.view(1, 1, 1, -1)
        out.append(_Phase(
            tuple(c[0] for c in combo), tuple(c[1] for c in combo), tuple(c[2] for c in combo),
            tuple(c[3] for c in combo), index.reshape(-1).to(device),
        ))
    return out


def _unfold_cheaper(m, M: int, chunks_: int, in_size, out_size) -> bool:
    """Whether unfolding the output gradient (``M O prod(kernel) L_in`` elements in each of the
    step's ``chunks_`` chunks of ``M`` columns) costs less than the phases (their input windows,
    ``I prod(kernel) L_in`` once per step, and where a stride exceeds 1, a copy of the output
    gradient per chunk, ``M O L_out``)."""
    kk, L_in, L_out = math.prod(m.kernel_size), math.prod(in_size), math.prod(out_size)
    copy = M * m.out_channels * L_out if any(s > 1 for s in m.stride) else 0
    c = max(1, chunks_)
    return c * M * m.out_channels * kk * L_in < m.in_channels * kk * L_in + c * copy


def _unfolded_index(m, device) -> torch.Tensor:
    """The weight positions of the product of the unfolded form (:func:`_unfold_output_grad`),
    laid out ``(g, O/g * prod(kernel), I/g)``."""
    return _unfolded_index_of(m.in_channels, m.out_channels, m.groups,
                              math.prod(m.kernel_size), device)


@functools.lru_cache(maxsize=256)
def _unfolded_index_of(I, O, g, kk, device) -> torch.Tensor:
    Ig, Og = I // g, O // g
    gi = torch.arange(g).view(g, 1, 1, 1)
    oi = torch.arange(Og).view(1, Og, 1, 1)
    ki = torch.arange(kk).view(1, 1, kk, 1)
    ii = torch.arange(Ig).view(1, 1, 1, Ig)
    return (((gi * Ig + ii) * Og + oi) * kk + ki).reshape(-1).to(device)


def _phase_input(m, x: torch.Tensor, ph: _Phase, out_size, out=None) -> torch.Tensor:
    """``(N, L_r, g, I/g * prod(n))``: the input windows of phase ``ph``, one per output position
    of the phase (``L_r`` of them), zero outside the input; copied into ``out`` (``(N, g, I/g *
    prod(n), L_r)``, any strides that split into those dims) when given."""
    s = m.stride
    pad, starts, lens = [], [], []
    for dim in range(len(s)):
        Lr = -(-(out_size[dim] - ph.r[dim]) // s[dim])  # positions q = q' s + r < L_out
        span = (ph.n[dim] - 1) * ph.e[dim] + 1
        lo = max(0, -ph.c[dim])
        hi = max(0, ph.c[dim] + Lr - 1 + span - x.shape[2 + dim])
        pad.append((lo, hi))
        starts.append(ph.c[dim] + lo)
        lens.append(max(Lr, 0))
    flat = [q for lo_hi in reversed(pad) for q in lo_hi]
    xp = F.pad(x, flat) if any(flat) else x
    for dim in range(len(s)):
        xp = xp.narrow(2 + dim, starts[dim], xp.shape[2 + dim] - starts[dim])
    g = m.groups
    if out is not None:
        v = _unfold_view(xp, ph.n, ph.e, (1,) * len(s), lens)  # (N, I, *n, *L_r)
        out.view(v.shape).copy_(v)
        return out.permute(0, 3, 1, 2)
    U = _unfold(xp, ph.n, ph.e, (1,) * len(s), lens)  # (N, I * prod(n), L_r)
    N, IK, L = U.shape
    return U.view(N, g, IK // g, L).permute(0, 3, 1, 2)


def _phase_output_grad(G: torch.Tensor, ph: _Phase, s, g: int) -> torch.Tensor:
    """``(M, N, L_r, g, O/g)``: the output gradient ``(M, N, O, *out_size)`` at the positions of
    phase ``ph`` (a view where the stride is 1 in every dim, else one copy of that phase)."""
    M, N, O = G.shape[:3]
    idx = tuple(slice(r, None, st) for r, st in zip(ph.r, s))
    Gr = G[(slice(None),) * 3 + idx]
    return Gr.reshape(M, N, g, O // g, -1).permute(0, 1, 4, 2, 3)


def input_side(patches: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, IK: int,
               L: int, g: int, chunks_: int) -> torch.Tensor | Patches:
    """The input side of a convolution's weight ``Outer`` (``patches(x)``: ``(N, L, g, IK/g)``
    unfolded patches of the input ``x``, ``L`` output positions; ``chunks_`` chunks of columns
    in the step): a :class:`~fimfast.rules.base.Patches` that unfolds a few samples at a time
    when the squares read them, so that the patches (about ``prod(kernel) / prod(stride)`` times
    the input, which the step holds anyway) are never held for the whole batch. With several
    chunks of columns that unfolds once per chunk; then patches of at most
    ``PATCHES_LAZY_FROM`` bytes (no more than one piece) are unfolded once and kept for the step
    instead (docs/estimators.md, "Memory")."""
    N = x.shape[0]
    per_sample = IK * L * x.element_size()
    if chunks_ > 1 and N * per_sample <= PATCHES_LAZY_FROM:
        return patches(x)

    def make(a: int, b: int) -> torch.Tensor:
        U = patches(x[a:b])
        return U[:, :, 0] if g == 1 else U

    shape = (N, L, IK) if g == 1 else (N, L, g, IK // g)
    return Patches(make, shape, x.dtype, chunks.patch_samples(per_sample))


def _conv_terms(call: Call, G3, P, Q, g: int) -> list[Term | None]:
    """A weight ``Outer(P, Q)`` over positions (``P`` ``(M, N, L, O')`` or ``(M, N, L, g,
    O'/g)``, ``Q`` ``(N, L, g, I'/g)``, or a :class:`Patches` of that shape, 3-D for one group),
    one block per group; the bias ``Vec`` sums ``G3``
    ``(M, N, O, L_out)`` over positions."""
    out: list[Term | None] = []
    for u in call.uses:
        if u.kind == UseKind.VEC:
            out.append(Vec(G3.sum(-1)))
        elif g == 1:  # a Patches factor of one group comes 3-D
            Q1 = Q if Q.dim() == 3 else Q[:, :, 0]
            out.append(Outer(P if P.dim() == 4 else P[:, :, :, 0], Q1))
        else:
            M, N, L, Op = P.shape[:4]
            out.append(Outer(P if P.dim() == 5 else P.reshape(M, N, L, g, Op // g), Q))
    return out


def _unfold_output_grad(m, G: torch.Tensor, in_size) -> torch.Tensor:
    """``(M, N, L_in, g, O/g * prod(kernel))``: the output gradient ``G`` ``(M, N, O,
    *out_size)`` of a transposed convolution, padded by ``padding`` and unfolded with its kernel,
    dilation and stride: window ``j`` holds ``G[..., j*s - p + k*d]`` for every kernel tap ``k``,
    the positions input ``j`` was scattered to (docs/math.md §4). An output padding can leave
    more windows than inputs: the extra ones are dropped.

    Laid out ``(N, g, M, O/g * kk, L_in)`` in memory: the squares' per-group products batch over
    ``(N, g)`` and read each sample's columns as one matrix, with no copy (2 groups of 18 x 4, 9
    columns, 16 samples x 784 positions, 1 thread: 2.6 ms against 28 ms for the layout
    ``(M, N, ...)``, best of 31 interleaved calls)."""
    M, N, O = G.shape[:3]
    g, S = m.groups, G.shape[3:]
    Gf = G.reshape(M, N, g, O // g, *S).transpose(0, 1).transpose(1, 2)  # (N, g, M, O/g, *S)
    U = None
    if len(S) in HOST_DIMS:
        U = host_unfold(Gf, m.kernel_size, m.dilation, m.stride, m.padding, in_size)
    if U is not None:  # (N, g, M, O/g, *k, *L_in), padded in the same pass
        return U.view(N, g, M, -1, math.prod(in_size)).permute(2, 0, 4, 1, 3)
    pad = [q for p in reversed(m.padding) for q in (p, p)]
    if any(pad):  # one copy, into that layout
        Gf = F.pad(Gf, pad)
    Gf = Gf.reshape(N * g * M, O // g, *Gf.shape[4:])
    U = _unfold(Gf, m.kernel_size, m.dilation, m.stride, in_size)  # (N*g*M, O/g*kk, L_in)
    return U.view(N, g, M, U.shape[1], U.shape[2]).permute(2, 0, 4, 1, 3)


def ntuple(v, k: int) -> tuple[int, ...]:
    """An int or tuple attribute of a convolution as a ``k``-tuple (an attribute set after
    construction may be an int: torch's forward passes it to ``F.conv*`` as it is)."""
    return (v,) * k if isinstance(v, int) else tuple(v)


def input_padding(m) -> list[int]:
    """The padding of ``m``'s input, as ``F.pad`` takes it (last dim first), from what torch's
    forward reads on every call: ``m.padding`` for zero padding (also when set after
    construction; ``"same"`` puts the odd element last, as torch does), the constructor's
    ``_reversed_padding_repeated_twice`` for the other padding modes."""
    if m.padding_mode != "zeros":
        return list(m._reversed_padding_repeated_twice)
    k, p = len(m.kernel_size), m.padding
    if p == "valid":
        return [0] * (2 * k)
    if p == "same":
        out = []
        for d, ks in zip(reversed(ntuple(m.dilation, k)), reversed(m.kernel_size)):
            total = d * (ks - 1)
            out += [total // 2, total - total // 2]
        return out
    return [q for v in reversed(ntuple(p, k)) for q in (v, v)]
