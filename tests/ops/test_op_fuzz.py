"""Randomised op inputs, every backend that runs here against the float64 definitions of
tests/ops/spec.py, on what the other op tests do not use: odd and prime sizes, sizes 0 and 1,
sizes next to the kernels' block sizes, transposed / sliced / offset / expanded (stride 0) views,
every input dtype, large and tiny magnitudes, saturated logits, all-equal rows, edge labels,
seeds and counter offsets.

Each case is drawn from its own fixed seed (its id names it): ``FIMFAST_OP_FUZZ=K`` multiplies the
number of cases by ``K`` for a longer run; ``FIMFAST_OP_FUZZ_SEED=op:backend:seed`` replays one.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import spec
import torch
from kernel_parity import assert_kernel_close, assert_reference_close, rel_err
from op_backends import require
from tolerances import EIG_ERR_FACTOR, KERNEL_SLACK_ULPS, LM_HEAD_ULPS, MC_BOUNDARY

from fimfast import ops
from fimfast.ops.gram import gram_upper_, mirror_upper_
from fimfast.ops.norm_terms import norm_terms
from fimfast.ops.torch_ref import fix_signs

_SCALE = max(1, int(os.environ.get("FIMFAST_OP_FUZZ", "1") or 1))
# cases per (op, backend) at FIMFAST_OP_FUZZ=1; the interpreter runs Triton programs in Python
_PER = {"probe_logit_grad": 60, "sq_matmul": 30, "shared_sq": 30, "accumulate_": 30,
        "core_topk": 30, "gram_upper_": 20, "mirror_upper_": 12, "norm_terms": 20,
        "pair_gram": 20, "lm_head_probe": 24, "recurrent_forward": 24, "recurrent_bptt": 24}
_TRITON_SHARE = {"probe_logit_grad": 0.5, "sq_matmul": 0.5, "shared_sq": 0.5,
                 "accumulate_": 0.6, "core_topk": 0.4, "lm_head_probe": 0.5}
_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# sizes: primes, 1, powers of two and their neighbours (the Triton tiles are 16/32/64 wide, the
# CPU kernels' tiles 3/4 rows, their vectors 8/16 lanes)
_SIZES = [1, 2, 3, 5, 7, 8, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 127, 129]
_LAYOUTS = ["contiguous", "transposed", "sliced", "offset", "expanded"]


_DEV = torch.device("cpu")  # the device of the case being built (set by test_fuzz)


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The values of ``t`` (any dimension) in another storage layout; ``expanded`` repeats
    ``t[0]`` along dim 0 with stride 0 (so it changes the values: all rows equal)."""
    t = t.to(_DEV)
    if kind == "contiguous" or t.dim() == 0:
        return t.contiguous()
    if kind == "transposed":  # dims stored in reverse order
        rev = list(range(t.dim()))[::-1]
        return t.permute(rev).contiguous().permute(rev)
    if kind == "sliced":  # every other element of a wider last dim
        n = t.shape[-1]
        wide = torch.zeros(*t.shape[:-1], 2 * n + 3, dtype=t.dtype, device=_DEV)
        wide[..., 1 : 1 + 2 * n : 2] = t
        return wide[..., 1 : 1 + 2 * n : 2]
    if kind == "offset":  # a view into a larger buffer, at an odd storage offset
        buf = torch.zeros(t.numel() + 16, dtype=t.dtype, device=_DEV)
        buf[5 : 5 + t.numel()] = t.reshape(-1)
        return buf[5 : 5 + t.numel()].view(t.shape)
    if kind == "expanded":
        if t.shape[0] == 0:
            return t.contiguous()
        return t[:1].expand(t.shape)
    raise KeyError(kind)


def _values(rng: np.random.Generator, shape, scale: float, dtype: torch.dtype) -> torch.Tensor:
    x = torch.from_numpy(rng.standard_normal(shape)) * scale
    return x.to(dtype)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


# ------------------------------------------------------------------------------------------------
# probe_logit_grad
# ------------------------------------------------------------------------------------------------
_BIG = {torch.float16: 1e4, torch.bfloat16: 1e30, torch.float32: 1e30, torch.float64: 1e30}


def _logits(rng, R, C, dtype):
    kind = _pick(rng, ["normal", "pm80", "big", "tiny", "ties", "mixed"])
    if kind == "normal":
        z = _values(rng, (R, C), 3.0, torch.float64)
    elif kind == "pm80":  # saturated logits: +-80 and neighbours, the top two 0.5 apart
        z = torch.from_numpy(rng.choice([-80.0, 80.0, 79.5, -79.5, 0.0], (R, C)))
        if C >= 2:
            z[:, int(rng.integers(C))], z[:, 0] = 80.0, 79.5
    elif kind == "big":  # the top two tied: the rest's exp underflows to 0 (1 - p is exact)
        z = _values(rng, (R, C), _BIG[dtype], torch.float64).to(dtype).double()
        if C >= 2:
            z[:, int(rng.integers(1, C))] = z[:, 0] = z.max(-1).values
    elif kind == "tiny":
        z = _values(rng, (R, C), 1e-30, torch.float64)
    elif kind == "ties":  # all-equal rows
        z = torch.from_numpy(rng.standard_normal((R, 1))).expand(R, C).clone()
    else:  # one leading class per row, ahead by 3, or by 25: a confident row (1 - max p a few
        # ulps of 1 in float32; test_confident_rows checks those row by row)
        z = _values(rng, (R, C), 1.0, torch.float64)
        if C:
            z[:, int(rng.integers(C))] += _pick(rng, [3.0, 25.0])
    return z.to(dtype), kind


def _probe_case(rng, backend):
    mode = _pick(rng, ops.PROBE_MODES)
    dtype = _pick(rng, _DTYPES)
    R = _pick(rng, [0, 1, 1, 2, 3, 5, 7, 13])
    C = _pick(rng, [1, 2, 3, 5, 31, 32, 33, 127, 128, 129, 257, 511, 513])
    if backend != "triton" and rng.random() < 0.15:
        C = _pick(rng, [4095, 4097, 8191, 8193])  # the Triton single-block limits, on the CPU
    z, kind = _logits(rng, R, C, dtype)
    z = _layout(z, _pick(rng, _LAYOUTS))
    S = int(rng.integers(1, 4))
    seed = int(_pick(rng, [0, 1, 2**32 - 1, 2**32, 2**64 - 1, int(rng.integers(2**62))]))
    offset = int(_pick(rng, [0, 31, 2**32 - 3, 2**33 + 5, int(rng.integers(2**40))]))
    labels = eig = None
    if mode == "empirical":
        labels = torch.from_numpy(rng.choice([0, max(C - 1, 0)], R) if rng.random() < 0.5
                                  else rng.integers(0, C, R)).long().to(_DEV)
    if mode == "rankk":
        k = int(rng.integers(1, min(C, 4) + 1))
        dt = ops.compute_dtype(dtype)
        lam = torch.from_numpy(rng.random((R, k)) - 0.2).to(dt)  # some < 0: clamped at 0
        vec = torch.from_numpy(rng.standard_normal((R, k, C))).to(dt)
        eig = (lam.to(_DEV), vec.to(_DEV))
    sigma2 = float(_pick(rng, [1.0, 0.5, 3e-7, 2.5e6]))
    what = f"{mode} {tuple(z.shape)} {dtype} {kind} S={S} seed={seed} offset={offset}"
    return dict(z=z, mode=mode, seed=seed, offset=offset, S=S, labels=labels, eig=eig,
                sigma2=sigma2), what


def _run_probe(c, backend):
    return ops.probe_logit_grad(c["z"], c["mode"], c["seed"], c["offset"], c["S"],
                                labels=c["labels"], eig=c["eig"], sigma2=c["sigma2"],
                                backend=backend)


def _check_probe(c, backend, what):
    out, ref = _run_probe(c, backend), _run_probe(c, "torch")
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous(), what
    if c["mode"] == "mc":
        _check_mc(c, out, ref, what)
        return
    truth = spec.probe_logit_grad(c["z"], c["mode"], c["seed"], c["offset"], c["S"],
                                  labels=c["labels"], eig=c["eig"], sigma2=c["sigma2"])
    tiny = torch.finfo(ref.dtype).tiny
    if truth.numel() and 0 < float(truth.abs().max()) < tiny:
        # every |dz| below the dtype's normal range (bernoulli of |z| > 175 in float32): a
        # relative error means nothing there, the absolute one is at most the smallest normal
        for who, t in (("torch", ref), (backend, out)):
            err = float((t.double().cpu() - truth).abs().max())
            assert err <= tiny, f"{who} {what}: |dz - truth| = {err:.3g} below the normal range"
        return
    assert_reference_close(ref, truth, what=f"torch {what}")
    assert_kernel_close(out, ref, truth, what=f"{backend} {what}")


def _check_mc(c, out, ref, what):
    """Labels of the definition except where u sits on a CDF step; e_y - p to rounding."""
    z64 = c["z"].double().cpu()
    R, C = z64.shape
    S = c["S"]
    if R == 0:
        return
    p = spec.softmax(z64.numpy())
    u = spec.uniforms(c["seed"], c["offset"], S * R).reshape(S, R)
    cdf = np.cumsum(p, -1)
    yt = torch.from_numpy(np.minimum((cdf[None] <= u[..., None]).sum(-1), C - 1))
    p64 = torch.from_numpy(p)
    errs = []
    for y_out, who in ((ref, "torch"), (out, "kernel")):
        y_out = y_out.cpu()
        y = (y_out.double() + p64).argmax(-1)  # the one-hot under e_y - p
        for s, r in (y != yt).nonzero().tolist():
            step = float(cdf[r, min(int(y[s, r]), int(yt[s, r]))])
            assert abs(step - float(u[s, r])) <= MC_BOUNDARY, (
                f"{who} {what}: mc label {int(y[s, r])} != {int(yt[s, r])} of the definition")
        truth = torch.nn.functional.one_hot(y, C).double() - p64
        errs.append(rel_err(y_out, truth))
        # e_y - p formed next to the one-hot's 1: absolute rounding of a few ulps
        err = float((y_out.double() - truth).abs().max())
        assert err <= KERNEL_SLACK_ULPS * torch.finfo(y_out.dtype).eps, f"{who} {what}: {err}"
    assert errs[1] <= errs[0] + KERNEL_SLACK_ULPS * torch.finfo(out.dtype).eps, (what, errs)


# ------------------------------------------------------------------------------------------------
# sq_matmul, shared_sq: x^4 stays inside each dtype's normal range
# ------------------------------------------------------------------------------------------------
_MAG = {torch.float16: [1.0, 4.0, 0.3], torch.bfloat16: [1.0, 1e7, 1e-7],
        torch.float32: [1.0, 1e7, 1e-7], torch.float64: [1.0, 1e30, 1e-30]}


def _two_dtypes(rng):
    d1 = _pick(rng, _DTYPES)
    d2 = d1 if rng.random() < 0.7 else _pick(rng, _DTYPES)
    return d1, d2


def _mag(rng, d1, d2):
    # the narrower range of the two (mixed f64 x f32 products computed in float64)
    narrow = d1 if _MAG[d1][1] < _MAG[d2][1] else d2
    return float(_pick(rng, _MAG[narrow]))


def _sq_case(rng, backend):
    d1, d2 = _two_dtypes(rng)
    N = _pick(rng, [0, 1, 2, 3, 17, 31, 33, 64, 65, 129])
    O, I = _pick(rng, _SIZES), _pick(rng, _SIZES)
    m = _mag(rng, d1, d2)
    g = _layout(_values(rng, (N, O), m, d1), _pick(rng, _LAYOUTS))
    a = _layout(_values(rng, (N, I), m, d2), _pick(rng, _LAYOUTS))
    return dict(g=g, a=a), f"g {tuple(g.shape)} {d1} {g.stride()} a {tuple(a.shape)} {d2} " \
                          f"{a.stride()} scale {m:g}"


def _check_sq(c, backend, what):
    out = ops.sq_matmul(c["g"], c["a"], backend=backend)
    ref = ops.sq_matmul(c["g"], c["a"], backend="torch")
    truth = spec.sq_matmul(c["g"], c["a"])
    assert_reference_close(ref, truth, what=f"torch sq_matmul {what}")
    assert_kernel_close(out, ref, truth, what=f"{backend} sq_matmul {what}")


def _shared_case(rng, backend):
    d1, d2 = _two_dtypes(rng)
    N = _pick(rng, [0, 1, 2, 3, 5])
    T = _pick(rng, [1, 2, 3, 15, 16, 17, 31, 32, 33])
    O, I = _pick(rng, _SIZES), _pick(rng, _SIZES)
    if backend == "triton":
        O, I = min(O, 65), min(I, 65)
    m = _mag(rng, d1, d2)
    G = _layout(_values(rng, (N, T, O), m, d1), _pick(rng, _LAYOUTS))
    A = _layout(_values(rng, (N, T, I), m, d2), _pick(rng, _LAYOUTS))
    return dict(G=G, A=A), f"G {tuple(G.shape)} {d1} {G.stride()} A {tuple(A.shape)} {d2} " \
                          f"{A.stride()} scale {m:g}"


def _check_shared(c, backend, what):
    out = ops.shared_sq(c["G"], c["A"], backend=backend)
    ref = ops.shared_sq(c["G"], c["A"], backend="torch")
    truth = spec.shared_sq(c["G"], c["A"])
    assert_reference_close(ref, truth, what=f"torch shared_sq {what}")
    assert_kernel_close(out, ref, truth, what=f"{backend} shared_sq {what}")


# ------------------------------------------------------------------------------------------------
# accumulate_ (sizes next to the Triton block of 4096 and the CPU block of 32768)
# ------------------------------------------------------------------------------------------------
def _acc_case(rng, backend):
    mode = _pick(rng, ["sum", "ema"])
    beta = float(_pick(rng, [0.0, 0.5, 0.9, 0.999])) if mode == "ema" else 0.0
    scale = float(_pick(rng, [1.0, 0.25, 3.0, 1e-6]))
    states, grads, whats = [], [], []
    for _ in range(int(rng.integers(1, 4))):
        n = _pick(rng, [0, 1, 7, 4095, 4096, 4097, 32767, 32769])
        shape = _pick(rng, [(n,), (1, n), (n, 1)]) if n < 4095 else (n,)
        if n == 7 and rng.random() < 0.5:
            shape = (7, 3)
        sdt = _pick(rng, [torch.float32, torch.float64])
        gdt = _pick(rng, _DTYPES)
        m = float(_pick(rng, {torch.float16: [1.0, 100.0], torch.bfloat16: [1.0, 1e15, 1e-15],
                              torch.float32: [1.0, 1e15, 1e-15],
                              torch.float64: [1.0, 1e15, 1e-15]}[min(sdt, gdt, key=_rank)]))
        st = _layout(torch.from_numpy(rng.random(shape) * m * m).to(sdt),
                     _pick(rng, ["contiguous", "transposed", "sliced", "offset"]))
        gr = _layout(_values(rng, shape, m, gdt), _pick(rng, _LAYOUTS))
        states.append(st)
        grads.append(gr)
        whats.append(f"{tuple(shape)} {sdt}<-{gdt} {st.stride()}/{gr.stride()} scale {m:g}")
    return dict(states=states, grads=grads, mode=mode, beta=beta, scale=scale), \
        f"{mode} beta={beta} scale={scale} [{'; '.join(whats)}]"


def _rank(d):
    return [torch.float16, torch.bfloat16, torch.float32, torch.float64].index(d)


def _check_acc(c, backend, what):
    states, grads = c["states"], c["grads"]
    ref = [s.clone() for s in states]
    truth = [spec.accumulate(s, g, c["mode"], c["beta"], c["scale"]) for s, g in
             zip(states, grads)]
    ops.accumulate_(states, grads, c["mode"], c["beta"], c["scale"], backend=backend)
    ops.accumulate_(ref, grads, c["mode"], c["beta"], c["scale"], backend="torch")
    for i, (s, r, t) in enumerate(zip(states, ref, truth)):
        assert_reference_close(r, t, what=f"torch accumulate_ tensor {i} {what}")
        assert_kernel_close(s, r, t, what=f"{backend} accumulate_ tensor {i} {what}")


# ------------------------------------------------------------------------------------------------
# core_topk (exact solver)
# ------------------------------------------------------------------------------------------------
def _topk_case(rng, backend):
    R = _pick(rng, [1, 2, 3, 5])
    C = _pick(rng, [2, 3, 5, 7, 16, 17, 31, 33, 64, 65, 127, 129])
    kind = _pick(rng, ["normal", "peaked", "ties", "zeros", "uniform", "pm80"])
    if kind == "normal":
        z = rng.standard_normal((R, C)) * 3
    elif kind == "peaked":
        z = rng.standard_normal((R, C)) * 40
    elif kind == "ties":  # a few distinct values, each repeated
        z = rng.choice(rng.standard_normal(3), (R, C))
    elif kind == "zeros":  # exact zero probabilities
        z = np.where(rng.random((R, C)) < 0.4, -np.inf, rng.standard_normal((R, C)))
        z[:, 0] = 0.0
    elif kind == "uniform":
        z = np.zeros((R, C))
    else:
        z = rng.choice([-80.0, 80.0, 0.0], (R, C))
    p = torch.softmax(torch.from_numpy(z), -1)
    dtype = _pick(rng, [torch.float32, torch.float64])
    k = int(rng.integers(1, min(C - 1, 5) + 1))
    p = _layout(p.to(dtype), _pick(rng, _LAYOUTS))
    return dict(p=p, k=k), f"{kind} {tuple(p.shape)} {dtype} {p.stride()} k={k}"


def _check_topk(c, backend, what):
    p, k = c["p"], c["k"]
    lam, vec = ops.core_topk(p, k, backend=backend)
    lam_r, vec_r = ops.core_topk(p, k, backend="torch")
    lam_t, vec_t = ops.core_topk(p.double(), k, backend="torch")
    tol = KERNEL_SLACK_ULPS * torch.finfo(lam.dtype).eps
    lam_np = torch.from_numpy(spec.core_eigh(p)[0][:, :k])
    for who, lm, vc in (("torch", lam_r, vec_r), (backend, lam, vec)):
        err = float((lm.double().cpu() - lam_np).abs().max())
        assert err <= tol, f"{who} {what}: eigenvalues off numpy's eigh by {err:.3g}"
        p64, V = p.double().cpu(), vc.double().cpu()
        MV = p64.unsqueeze(1) * V - p64.unsqueeze(1) * torch.einsum(
            "rc,rjc->rj", p64, V).unsqueeze(-1)
        res = float((MV - lm.double().cpu().unsqueeze(-1) * V).abs().max())
        assert res <= tol, f"{who} {what}: residual |M v - lam v| = {res:.3g}"
        assert bool(((V.norm(dim=-1) - 1).abs() < 1e-5).all()), f"{who} {what}: norms"
        assert torch.equal(fix_signs(vc), vc), f"{who} {what}: sign convention"
    assert_kernel_close(lam, lam_r, lam_t, what=f"{backend} {what} eigenvalues")
    if not _repeated(lam_t):  # a repeated eigenvalue's vectors are any basis of its space
        assert_kernel_close(vec, vec_r, vec_t, factor=EIG_ERR_FACTOR,
                            what=f"{backend} {what} eigenvectors")


def _repeated(lam: torch.Tensor) -> bool:
    gaps = (lam[:, 1:] - lam[:, :-1]).abs()
    return bool((gaps <= 1e-9).any())


# ------------------------------------------------------------------------------------------------
# the CPU-only ops (torch and cpp): gram_upper_, mirror_upper_, norm_terms, pair_gram, against
# float64 sums written out here
# ------------------------------------------------------------------------------------------------
_F = [torch.float32, torch.float64]
_N128 = [1, 2, 3, 7, 8, 9, 17, 127, 128, 129, 131]  # the CPU kernel's 8-wide tiles, 128-row blocks


def _square_view(n, dtype, rng, kind):
    """An (n, n) matrix with rows of stride 1: contiguous, or a block of a larger one."""
    if kind == "block":
        big = torch.full((n + 5, n + 9), float("nan"), dtype=dtype, device=_DEV)
        return big[2 : 2 + n, 3 : 3 + n]
    return torch.full((n, n), float("nan"), dtype=dtype, device=_DEV)


def _gram_case(rng, backend):
    n, R = _pick(rng, _N128), _pick(rng, [0, 1, 2, 5, 33, 129])
    dtype, acc = _pick(rng, _F), bool(rng.random() < 0.5)
    x = _layout(_values(rng, (R, n), float(_pick(rng, [1.0, 1e-15, 1e15])), dtype),
                _pick(rng, _LAYOUTS))
    return dict(n=n, x=x, acc=acc, kind=_pick(rng, ["contiguous", "block"]),
                init=_values(rng, (n, n), 1.0, dtype)), \
        f"x {tuple(x.shape)} {dtype} {x.stride()} accumulate={acc}"


def _check_gram(c, backend, what):
    outs = []
    for b in (backend, "torch"):
        out = _square_view(c["n"], c["x"].dtype, None, c["kind"])
        if c["acc"]:
            out.copy_(c["init"])
        gram_upper_(out, c["x"], c["acc"], backend=b)
        outs.append(out.triu())
    x = c["x"].double().cpu().numpy()
    truth = x.T @ x if x.shape[0] else np.zeros((c["n"], c["n"]))
    if c["acc"]:
        truth = truth + c["init"].double().numpy()
    truth = torch.from_numpy(np.triu(truth))
    # the products are summed in the dtype: the bound is relative to the sum of |terms|
    _close_sum(outs[0], outs[1], truth, what=f"{backend} gram_upper_ {what}")


def _close_sum(out, ref, truth, what):
    assert_reference_close(ref, truth, what=f"torch {what}")
    assert_kernel_close(out, ref, truth, what=what)


def _mirror_case(rng, backend):
    n, dtype = _pick(rng, _N128), _pick(rng, _F)
    scale = float(_pick(rng, [1.0, 0.5, -3.0, 1e-20]))
    return dict(m=_values(rng, (n, n), 1.0, dtype), scale=scale,
                kind=_pick(rng, ["contiguous", "block"])), f"({n}, {n}) {dtype} scale={scale}"


def _check_mirror(c, backend, what):
    outs = []
    for b in (backend, "torch"):
        m = _square_view(c["m"].shape[0], c["m"].dtype, None, c["kind"])
        upper = torch.ones_like(c["m"], dtype=torch.bool).triu()
        m.copy_(torch.where(upper, c["m"], float("nan")))  # the lower triangle is never read
        mirror_upper_(m, c["scale"], backend=b)
        outs.append(m.clone())
    u = np.triu(c["m"].double().numpy()) * c["scale"]
    truth = torch.from_numpy(u + np.triu(u, 1).T)
    _close_sum(outs[0], outs[1], truth, what=f"{backend} mirror_upper_ {what}")


def _norm_case(rng, backend):
    M, N, T = _pick(rng, [1, 2, 3]), _pick(rng, [0, 1, 3]), _pick(rng, [1, 2, 7, 17])
    D, dtype = _pick(rng, [1, 2, 5, 8, 16, 17, 33]), _pick(rng, _F)
    eps = _pick(rng, [None, 1e-5, 1e-12])
    m = float(_pick(rng, [1.0, 1e10, 1e-10]))
    G = _layout(_values(rng, (M, N, T, D), m, dtype), _pick(rng, _LAYOUTS))
    X = _layout(_values(rng, (N, T, D), 1.0, dtype) + float(_pick(rng, [0.0, 100.0])),
                _pick(rng, _LAYOUTS))
    return dict(G=G, X=X, eps=eps), f"G {tuple(G.shape)} {dtype} {G.stride()} X {X.stride()} " \
                                    f"eps={eps} scale {m:g}"


def _check_norm(c, backend, what):
    out = norm_terms(c["G"], c["X"], c["eps"], backend=backend)
    ref = norm_terms(c["G"], c["X"], c["eps"], backend="torch")
    g, x = c["G"].double().cpu().numpy(), c["X"].double().cpu().numpy()
    if c["eps"] is not None:
        mu = x.mean(-1, keepdims=True)
        x = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + c["eps"])
    truth = (torch.from_numpy((g * x[None]).sum(2)), torch.from_numpy(g.sum(2)))
    for o, r, t, name in zip(out, ref, truth, ("W", "B")):
        # the normalisation of X rounds in X's dtype: the reference's error is the yardstick
        assert_kernel_close(o, r, t, what=f"{backend} norm_terms {name} {what}")


def _pair_case(rng, backend):
    M, N, T = _pick(rng, [1, 2, 3]), _pick(rng, [1, 2, 5]), _pick(rng, [1, 2, 3, 5])
    O, dtype = _pick(rng, [1, 3, 8, 15, 16, 17, 33]), _pick(rng, _DTYPES)
    acc = bool(rng.random() < 0.5)
    P = [_layout(_values(rng, (M, N, O), 1.0, dtype), _pick(rng, _LAYOUTS)) for _ in range(T)]
    return dict(P=P, acc=acc), f"P {T} x {tuple(P[0].shape)} {dtype} accumulate={acc}"


def _check_pair(c, backend, what):
    P = c["P"]
    dt = ops.compute_dtype(P[0].dtype)
    T, (_, N, O) = len(P), P[0].shape
    init = torch.ones(N, T * (T + 1) // 2, O, dtype=dt, device=_DEV)
    out = ops.pair_gram(P, init.clone() if c["acc"] else None, backend=backend)
    ref = ops.pair_gram(P, init.clone() if c["acc"] else None, backend="torch")
    p = np.stack([q.double().cpu().numpy() for q in P], 2)
    rows = [(p[:, :, t] * p[:, :, s]).sum(0) for t in range(T) for s in range(t, T)]
    truth = torch.from_numpy(np.stack(rows, 1) + (1.0 if c["acc"] else 0.0))
    _close_sum(out, ref, truth, what=f"{backend} pair_gram {what}")


# ------------------------------------------------------------------------------------------------
# lm_head_probe: the three products of the probe through a Linear head
# ------------------------------------------------------------------------------------------------
def _lm_case(rng, backend):
    R, V = _pick(rng, [1, 2, 5, 17]), _pick(rng, [2, 3, 31, 64, 129, 257])
    d = _pick(rng, [1, 3, 16, 33])
    hd = _pick(rng, _DTYPES)
    wd = hd if rng.random() < 0.7 else _pick(rng, _DTYPES)
    h = _layout(_values(rng, (R, d), 1.0, hd), _pick(rng, _LAYOUTS))
    W = _layout(_values(rng, (V, d), 0.7 / max(1.0, d**0.5), wd), _pick(rng, _LAYOUTS))
    b = _layout(_values(rng, (V,), 1.0, wd), _pick(rng, _LAYOUTS)) if rng.random() < 0.5 else None
    mode = _pick(rng, ["hutchinson", "sqrt", "dg"])
    seed, offset = int(rng.integers(2**63)), int(_pick(rng, [0, 2**32 - 7, 2**33 + 5]))
    chunk = _pick(rng, [None, 1, 3, 7])
    return dict(h=h, W=W, b=b, mode=mode, seed=seed, offset=offset, chunk=chunk), \
        f"{mode} h {tuple(h.shape)} {hd} {h.stride()} W {tuple(W.shape)} {wd} {W.stride()} " \
        f"bias={b is not None} row_chunk={chunk}"


def _check_lm(c, backend, what):
    args = (c["h"], c["W"], c["b"], c["mode"], c["seed"], c["offset"])
    out = ops.lm_head_probe(*args, row_chunk=c["chunk"], backend=backend)
    ref = ops.lm_head_probe(*args, row_chunk=c["chunk"], backend="torch")
    h, W = c["h"].double().cpu(), c["W"].double().cpu()
    z = h @ W.t() + (0.0 if c["b"] is None else c["b"].double().cpu())
    mode = "hutchinson" if c["mode"] == "sqrt" else c["mode"]  # sqrt through log_softmax
    u = spec.probe_logit_grad(z, mode, c["seed"], c["offset"], 1)[0]
    truth = (u @ W, u.t() @ h, None if c["b"] is None else u.sum(0))
    # the sums cancel (sum_v u_v = 0 for hutchinson, and u itself is sqrt(p) xi - p (sqrt(p).xi)):
    # rounding scales with the sums of |terms|
    sp = torch.from_numpy(spec.softmax(z.numpy())).sqrt()
    a = sp + sp**2 * sp.sum(-1, keepdim=True)
    terms = (a @ W.abs(), a.t() @ h.abs(), a.sum(0))
    for name, o, r, t, a in zip(("grad_hidden", "grad_weight", "grad_bias"), out, ref, truth,
                                terms):
        if t is None:
            assert o is None and r is None, f"{backend} {what}: {name} should be None"
            continue
        scale = float(a.max()) if a.numel() else 0.0
        er = float((r.double().cpu() - t).abs().max()) if t.numel() else 0.0
        ek = float((o.double().cpu() - t).abs().max()) if t.numel() else 0.0
        bound = LM_HEAD_ULPS * torch.finfo(r.dtype).eps * scale
        assert er <= bound, f"torch lm_head_probe {name} {what}: error {er:.3g} > {bound:.3g}"
        slack = KERNEL_SLACK_ULPS * torch.finfo(o.dtype).eps * scale
        assert o.dtype == r.dtype and o.shape == r.shape, f"{backend} {what}: {name} dtype/shape"
        assert ek <= er + slack, f"{backend} lm_head_probe {name} {what}: error {ek:.3g} > " \
                                 f"{er:.3g} + {slack:.3g}"

# ------------------------------------------------------------------------------------------------
# recurrent_forward (torch and cpp): against the reference run in float64 on the same inputs
# (tests/ops/test_recurrent_forward.py checks that one against torch's own layers)
# ------------------------------------------------------------------------------------------------
def _rec_case(rng, backend):
    mode = _pick(rng, ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
    T, N = _pick(rng, [1, 2, 5, 9]), _pick(rng, [1, 2, 3, 7])
    H, dtype = _pick(rng, [1, 2, 3, 5, 8, 9, 17]), _pick(rng, _F)
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1) * H

    def lay(t):
        return _layout(t, _pick(rng, _LAYOUTS))

    gi = lay(_values(rng, (T, N, G), 1.0, dtype))
    h0 = lay(_values(rng, (N, H), 1.0, dtype))
    c0 = lay(_values(rng, (N, H), 1.0, dtype)) if mode == "LSTM" else None
    whh = lay(_values(rng, (G, H), 1.0 / H**0.5, dtype))
    bhh = lay(_values(rng, (G,), 1.0, dtype)) if rng.random() < 0.5 else None
    rev = bool(rng.random() < 0.5)
    return dict(args=(mode, gi, h0, c0, whh, bhh, rev)), \
        f"{mode} gi {tuple(gi.shape)} {dtype} {gi.stride()} whh {whh.stride()} " \
        f"bias={bhh is not None} reverse={rev}"


def _check_rec(c, backend, what):
    out = ops.recurrent_forward(*c["args"], backend=backend)
    ref = ops.recurrent_forward(*c["args"], backend="torch")
    a64 = [x.double() if isinstance(x, torch.Tensor) else x for x in c["args"]]
    truth = ops.recurrent_forward(*a64, backend="torch")
    for name, o, r, t in zip(("ys", "pre", "hT", "cT"), out, ref, truth):
        if t is None:
            assert o is None and r is None, f"{backend} {what}: {name} should be None"
            continue
        assert_kernel_close(o, r, t, what=f"{backend} recurrent_forward {name} {what}")


# ------------------------------------------------------------------------------------------------
# recurrent_bptt (torch and cpp): against the reference run in float64 on the same inputs
# (tests/ops/test_recurrent_bptt.py checks that one against autograd through the cells)
# ------------------------------------------------------------------------------------------------
def _bptt_case(rng, backend):
    mode = _pick(rng, ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
    T, N = _pick(rng, [1, 2, 5, 9]), _pick(rng, [1, 2, 3, 7])
    H, dtype = _pick(rng, [1, 2, 3, 5, 8, 9, 17]), _pick(rng, _F)
    scale = _pick(rng, [1.0, 1.0, 4.0, 1e-3])  # 4: saturated gates; 1e-3: all near zero
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1) * H

    def lay(t):
        return _layout(t, _pick(rng, _LAYOUTS))

    def val(*shape, s=scale):
        return lay(_values(rng, shape, s, dtype))

    if mode == "LSTM":
        saved = [val(T, N, G), val(N, H)]
    elif mode == "GRU":
        saved = [val(T, N, G), val(T, N, G), lay(_values(rng, (T, N, H), 0.5, dtype).tanh())]
    else:  # outputs of the cell: in (-1, 1) for tanh, >= 0 (some exactly 0) for relu
        ys = _values(rng, (T, N, H), scale, dtype)
        saved = [lay(ys.tanh() if mode == "RNN_TANH" else ys.clamp_min(0))]
    whh = lay(_values(rng, (G, H), 1.0 / H**0.5, dtype))
    dys, dh = val(T, N, H, s=1.0), val(N, H, s=1.0)
    dc = val(N, H, s=1.0) if mode == "LSTM" else None
    rev = bool(rng.random() < 0.5)
    return dict(args=(mode, saved, whh, dys, dh, dc, rev)), \
        f"{mode} T={T} N={N} H={H} {dtype} scale={scale} whh {whh.stride()} reverse={rev}"


def _check_bptt(c, backend, what):
    out = ops.recurrent_bptt(*c["args"], backend=backend)
    ref = ops.recurrent_bptt(*c["args"], backend="torch")
    a64 = [[s.double() for s in x] if isinstance(x, list) else
           x.double() if isinstance(x, torch.Tensor) else x for x in c["args"]]
    truth = ops.recurrent_bptt(*a64, backend="torch")
    # the recurrence rounds once per step in another order than the reference: T steps' slack
    # (in float64 the reference is the truth, so its own error reads 0)
    steps = c["args"][3].shape[0]
    for name, o, r, t in zip(("dG", "dgh", "dh0", "dc0"), out, ref, truth):
        if t is None:
            assert o is None and r is None, f"{backend} {what}: {name} should be None"
            continue
        assert o.dtype == r.dtype and o.shape == r.shape, f"{backend} {what}: {name} dtype/shape"
        assert bool(torch.isfinite(o).all()), f"{backend} {what}: {name} non-finite"
        ek, er = rel_err(o, t), rel_err(r, t)
        bound = 2 * er + steps * KERNEL_SLACK_ULPS * torch.finfo(o.dtype).eps
        assert ek <= bound, f"{backend} recurrent_bptt {name} {what}: error {ek:.3g} > " \
                            f"{bound:.3g} (torch error {er:.3g})"


# ------------------------------------------------------------------------------------------------
_OPS = {
    "probe_logit_grad": (_probe_case, _check_probe),
    "sq_matmul": (_sq_case, _check_sq),
    "shared_sq": (_shared_case, _check_shared),
    "accumulate_": (_acc_case, _check_acc),
    "core_topk": (_topk_case, _check_topk),
    "gram_upper_": (_gram_case, _check_gram),
    "mirror_upper_": (_mirror_case, _check_mirror),
    "norm_terms": (_norm_case, _check_norm),
    "pair_gram": (_pair_case, _check_pair),
    "lm_head_probe": (_lm_case, _check_lm),
    "recurrent_forward": (_rec_case, _check_rec),
    "recurrent_bptt": (_bptt_case, _check_bptt),
}
_CPU_ONLY = ("gram_upper_", "mirror_upper_", "norm_terms", "pair_gram", "recurrent_forward",
             "recurrent_bptt")


def _cases():
    replay = os.environ.get("FIMFAST_OP_FUZZ_SEED", "").strip()
    if replay:
        op, b, s = replay.split(":")
        yield pytest.param(op, b, int(s), id=replay)
        return
    for op in _OPS:
        for b in ("cpp",) if op in _CPU_ONLY else ("cpp", "triton", "cuda"):
            n = _PER[op] * _SCALE
            if b == "triton":
                n = max(1, int(n * _TRITON_SHARE[op]))
            marks = [pytest.mark.triton] if b == "triton" else []
            if b == "cuda" and not torch.cuda.is_available():
                continue
            for s in range(n):
                yield pytest.param(op, b, s, id=f"{op}:{b}:{s}", marks=marks)


@pytest.mark.parametrize("op,backend,seed", list(_cases()))
def test_fuzz(op, backend, seed):
    global _DEV
    _DEV = require(backend)
    make, check = _OPS[op]
    rng = np.random.default_rng([sum(op.encode()), seed, ord(backend[0])])
    case, what = make(rng, backend)
    check(case, backend, what)


# cases of the long runs that found a defect (now fixed; lm_head_probe: of the check's bound, an
# exactly zero u), kept in every run
_FOUND = ["core_topk:triton:212", "norm_terms:cpp:240", "norm_terms:cpp:333",
          "lm_head_probe:cpp:451", "lm_head_probe:cpp:695"]


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=[pytest.mark.triton] if ":triton:" in c else []) for c in _FOUND])
def test_found(case):
    op, backend, seed = case.split(":")
    test_fuzz(op, backend, int(seed))


@pytest.mark.parametrize("backend", [
    "cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_topk_subnormal_probabilities(backend):
    """A subnormal upper pole: p / hi overflows to inf and the secular vector holds inf / inf =
    nan, which counts as non-finite as an inf does (the class alone), as in the reference."""
    global _DEV
    _DEV = require(backend)
    p = torch.tensor([[1.0, 9.1e-44, 0.0, 0.0, 2.97e-41], [0.5, 0.5 - 1e-41, 1e-41, 0.0, 0.0]])
    _check_topk(dict(p=p.to(_DEV), k=4), backend, "subnormal probabilities")


def _confident(C: int, dtype: torch.dtype) -> torch.Tensor:
    """Three confident rows: the leading class first, last, and two tied leading classes; the
    others about 20 (float32) or 45 (float64) below, 5 more on a long row, so that 1 - max p is a
    few ulps of 1."""
    g = torch.Generator().manual_seed(C)
    margin = (45.0 if dtype == torch.float64 else 20.0) + (5.0 if C > 4096 else 0.0)
    z = torch.randn(3, C, generator=g, dtype=torch.float64) - margin
    z[0, 0] = z[1, C - 1] = 0.0
    z[2, 1 if C > 1 else 0] = z[2, C - 2 if C > 3 else 0] = 0.0
    return z.to(dtype)


def _exact_truth(z: torch.Tensor, mode: str, seed: int, S: int, labels: torch.Tensor):
    """``(S, R, C)`` dz in exact rational arithmetic on the float64 ``e = exp(z - max)`` and
    ``sqrt(p)`` (each within an ulp of float64): ``w - p (sum w)`` and ``e_y - p`` as written,
    with no rounding after them, so that every entry has the relative accuracy of float64
    however much the definition cancels (two tied classes of one sign included)."""
    from fractions import Fraction

    x = z.double().cpu().numpy()
    R, C = x.shape
    xi = spec.signs(seed, 0, S * R * C).reshape(S, R, C)
    out = np.zeros((S, R, C))
    for r in range(R):
        e = np.exp(x[r] - x[r].max())
        fe = [Fraction(float(v)) for v in e]
        tot = sum(fe)
        p = [v / tot for v in fe]
        for s in range(S):
            if mode == "hutchinson":
                w = [Fraction(float(xi[s, r, c] * np.sqrt(float(p[c])))) for c in range(C)]
                d = sum(w)
                out[s, r] = [float(w[c] - p[c] * d) for c in range(C)]
            else:
                y = int(labels[s, r])
                out[s, r] = [float(-p[c]) for c in range(C)]
                out[s, r, y] = float((tot - fe[y]) / tot)
    return torch.from_numpy(out)


@pytest.mark.parametrize("C", [2, 5, 97, 9000])  # 9000: Triton's column-block path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mode", ["hutchinson", "empirical", "mc"])
@pytest.mark.parametrize("backend", [
    "torch", "cpp", pytest.param("triton", marks=pytest.mark.triton), "cuda"])
def test_confident_rows(backend, mode, dtype, C):
    """1 - p of the leading class from the other classes' exponentials, on every backend: each
    row within a few ulps of the exact definition, relative to that row (formed as differences of
    numbers near 1 they were off by up to 100%). On the long row the leading class's entry is a
    9000-term sum of both signs: the CPU kernel's 16 sequential partial sums round it more than
    torch's pairwise sum (float32: up to 58 ulps of the row against torch's 5; formed as a
    difference near 1: 1,200 to 28,000 ulps)."""
    global _DEV
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    _DEV = require(backend) if backend != "torch" else torch.device("cpu")
    z = _confident(C, dtype).to(_DEV)
    labels = z.argmax(-1)  # the leading class (for the tied row, the first of the two)
    c = dict(z=z, mode=mode, seed=7, offset=0, S=2, labels=labels, eig=None, sigma2=1.0)
    out, ref = _run_probe(c, backend), _run_probe(c, "torch")
    if mode == "mc":  # the labels drawn: a leading class (the others' p is below 1e-8)
        drawn = ref.argmax(-1)
        assert bool((out.argmax(-1) == drawn.to(out.device)).all())
        assert bool((z.cpu()[torch.arange(3), drawn] == 0).all())
    else:
        drawn = labels.cpu().unsqueeze(0).expand(2, 3)
    truth = _exact_truth(z, mode, 7, 2, drawn)
    for s in range(2):
        for r in range(3):
            what = f"{backend} {mode} {dtype} C={C} row {r} probe {s}"
            assert_reference_close(ref[s, r], truth[s, r], what=what)
            assert_kernel_close(out[s, r], ref[s, r], truth[s, r],
                                factor=16.0 if C > 4096 else 1.0, what=what)
