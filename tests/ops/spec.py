"""Independent float64 definitions of the five ops and of the counter-based generator, for the op
tests: numpy only, written from the definitions (README "Backends and kernels", the docstring of
fimfast/ops/rng.py and csrc/include/fimfast_rng.h), sharing no code with ``fimfast.ops``.

Every kernel backend and the torch reference are checked against these.
"""

from __future__ import annotations

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------
# the generator: MurmurHash3's fmix32 chained twice with two keys, on numpy uint32 (wrap-around
# modulo 2**32 is numpy's unsigned arithmetic, as in the C++ header)
# ------------------------------------------------------------------------------------------------
_U32 = np.uint32


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _U32(16))
    h = h * _U32(0x85EBCA6B)
    h = h ^ (h >> _U32(13))
    h = h * _U32(0xC2B2AE35)
    return h ^ (h >> _U32(16))


def keys(seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """``(k0, k1)`` of a 64-bit seed (taken modulo 2**64) and a stream id, as uint32 scalars."""
    seed &= (1 << 64) - 1
    lo, hi = np.array([seed & 0xFFFFFFFF], _U32), np.array([seed >> 32], _U32)
    salt = np.array([stream], _U32) * _U32(0x27D4EB2F)
    return _fmix32(lo ^ _U32(0x9E3779B9)), _fmix32(hi ^ _U32(0x7F4A7C15) ^ salt)


def hash_u32(seed: int, stream: int, ctr: np.ndarray) -> np.ndarray:
    """uint32 hash of uint64 counters: fmix32(fmix32(lo ^ k0) ^ (k1 + hi))."""
    k0, k1 = keys(seed, stream)
    ctr = np.asarray(ctr, dtype=np.uint64)
    lo = (ctr & np.uint64(0xFFFFFFFF)).astype(_U32)
    hi = (ctr >> np.uint64(32)).astype(_U32)
    return _fmix32(_fmix32(lo ^ k0) ^ (k1 + hi))


def signs(seed: int, offset: int, n: int) -> np.ndarray:
    """float64 Rademacher signs of counters offset .. offset+n-1: bit (c & 31) of hash(c >> 5),
    +1 for a 0 bit and -1 for a 1 bit (stream 0)."""
    c = np.uint64(offset) + np.arange(n, dtype=np.uint64)
    bit = (hash_u32(seed, 0, c >> np.uint64(5)) >> (c & np.uint64(31)).astype(_U32)) & _U32(1)
    return 1.0 - 2.0 * bit.astype(np.float64)


def uniforms(seed: int, offset: int, n: int) -> np.ndarray:
    """float64 uniforms of counters offset .. offset+n-1: (hash(c) >> 8) * 2**-24 (stream 1)."""
    c = np.uint64(offset) + np.arange(n, dtype=np.uint64)
    return (hash_u32(seed, 1, c) >> _U32(8)).astype(np.float64) * 2.0**-24


# ------------------------------------------------------------------------------------------------
# the ops, in float64
# ------------------------------------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def softmax(z: np.ndarray) -> np.ndarray:
    """Row softmax by hand: exp(z - max) / sum."""
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def one_minus_softmax(z: np.ndarray) -> np.ndarray:
    """``1 - p`` of every class as the sum of the other classes' probabilities: at the row's
    (first) largest logit the sum of the other exponentials, so confident rows keep their relative
    accuracy (``1 - p`` there is tiny; elsewhere ``p <= 1/2``)."""
    e = np.exp(z - z.max(-1, keepdims=True))
    s = e.sum(-1, keepdims=True)
    out = (s - e) / s
    if z.size == 0:
        return out
    top = z.argmax(-1)
    for r in range(z.shape[0]):
        if z.shape[1]:
            out[r, top[r]] = (e[r, : top[r]].sum() + e[r, top[r] + 1 :].sum()) / s[r, 0]
    return out


def _hutchinson_mix(w: np.ndarray, p: np.ndarray, om: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``w - p (sum w)`` as ``w_c (1 - p_c) - p_c sum_{j != c} w_j`` per class, the sum without
    ``w_c`` added up from the other classes at the row's largest logit."""
    tot = w.sum(-1, keepdims=True)
    others = tot - w
    top = z.argmax(-1)
    for r in range(z.shape[0]):
        t = top[r]
        others[:, r, t] = w[:, r, :t].sum(-1) + w[:, r, t + 1 :].sum(-1)
    return w * om - p * others


def probe_logit_grad(z: torch.Tensor, mode: str, seed: int, offset: int, S: int, labels=None,
                     eig=None, sigma2: float = 1.0) -> torch.Tensor:
    """``(S, R, C)`` dz of every mode; ``mc`` labels by the inverse CDF of the float64 softmax."""
    x = _np(z)
    R, C = x.shape
    if mode in ("gaussian", "bernoulli", "hutchinson", "sqrt", "dg"):
        xi = signs(seed, offset, S * R * C).reshape(S, R, C)
        if mode == "gaussian":
            return _t(xi / np.sqrt(sigma2))
        if mode == "bernoulli":  # s (1 - s) with 1 - s = sigmoid(-x) itself: no cancellation
            s, t = 1.0 / (1.0 + np.exp(-x)), 1.0 / (1.0 + np.exp(x))
            return _t(xi * np.sqrt(s * t))
        p = softmax(x)
        w = xi * np.sqrt(p)
        if mode == "hutchinson":  # (diag(sqrt p) - sqrt p p^T)^T xi = sqrt(p) xi - p (sqrt(p).xi)
            if C == 0:
                return _t(w)
            return _t(_hutchinson_mix(w, p, one_minus_softmax(x), x))
        return _t(w)
    p = softmax(x)
    if mode == "rankk":
        lam, vec = _np(eig[0]), _np(eig[1])  # (R, k), (R, k, C)
        k = lam.shape[-1]
        xi = signs(seed, offset, S * R * k).reshape(S, R, k)
        out = np.zeros((S, R, C))
        for j in range(k):  # sum_j xi_j sqrt(max(lam_j, 0)) v_j
            out += (xi[:, :, j] * np.sqrt(np.maximum(lam[:, j], 0.0)))[:, :, None] * vec[:, j]
        return _t(out)
    if mode == "empirical":
        y = labels.cpu().numpy()
        out = -p.copy()
        out[np.arange(R), y] = one_minus_softmax(x)[np.arange(R), y]
        return _t(np.broadcast_to(out, (S, R, C)).copy())
    if mode == "mc":
        u = uniforms(seed, offset, S * R).reshape(S, R)
        cdf = np.cumsum(p, -1)
        y = np.minimum((cdf[None] <= u[..., None]).sum(-1), C - 1)  # (S, R)
        out = np.broadcast_to(-p, (S, R, C)).copy()
        om = np.broadcast_to(one_minus_softmax(x), (S, R, C))
        np.put_along_axis(out, y[..., None], np.take_along_axis(om, y[..., None], -1), -1)
        return _t(out)
    raise KeyError(mode)


def sq_matmul(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """sum_n g[n]^2 (outer) a[n]^2, as an explicit sum over n of outer products."""
    G, A = _np(g) ** 2, _np(a) ** 2
    out = np.zeros((G.shape[1], A.shape[1]))
    for n in range(G.shape[0]):
        out += np.outer(G[n], A[n])
    return _t(out)


def shared_sq(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """sum_n (G_n^T A_n)^2 with G_n^T A_n = sum_t G[n, t]^T A[n, t] written out."""
    g, a = _np(G), _np(A)
    out = np.zeros((g.shape[2], a.shape[2]))
    for n in range(g.shape[0]):
        per = np.zeros_like(out)
        for t in range(g.shape[1]):
            per += np.outer(g[n, t], a[n, t])
        out += per**2
    return _t(out)


def accumulate(state: torch.Tensor, grad: torch.Tensor, mode: str, beta: float, scale: float
               ) -> torch.Tensor:
    """s + scale g^2 (sum) or beta s + (1 - beta) scale g^2 (ema), in float64."""
    s, g = _np(state), _np(grad)
    if mode == "sum":
        return _t(s + scale * g * g)
    return _t(beta * s + (1.0 - beta) * scale * g * g)


def core_eigh(p: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """All eigenpairs of diag(p) - p p^T by numpy (LAPACK), descending: (R, C), (R, C, C) with
    eigenvector j in [:, j, :]."""
    x = _np(p)
    M = np.einsum("rc,cd->rcd", x, np.eye(x.shape[1])) - x[:, :, None] * x[:, None, :]
    lam, V = np.linalg.eigh(M)
    return lam[:, ::-1].copy(), np.transpose(V[:, :, ::-1], (0, 2, 1)).copy()
