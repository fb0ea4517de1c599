"""Float64 references: the exact diagonal FIM and the diagonal empirical Fisher of one batch.

``diag F = sum_r diag(J_r^T (diag p_r - p_r p_r^T) J_r)`` and ``diag EF = sum_r (J_r^T (p_r -
e_{y_r}))^2``, with ``J_r`` the Jacobian of row ``r``'s logits (a sample, or a token) with respect
to every trainable parameter, computed in float64 on a copy of the model:

* ``brute_force``: per-row Jacobians by ``torch.func.vjp`` of one sample's (or sequence's) logits,
  one cotangent per (token, class), batched with ``vmap`` in chunks bounded by ``chunk_bytes``;
* ``linear_head`` (workload d): the closed form ``(p(1-p))^T x^2`` of a Linear classifier;
* ``token_lm`` (workload g): the head's parameters in closed form; the body's through the head's
  range. With ``M_r = W^T (diag p_r - p_r p_r^T) W = L_r L_r^T`` (d x d, eigendecomposition), the
  body needs ``d`` cotangents per token on the features instead of ``V``; the token embedding
  table's per-cotangent gradient is the segment sum of the input gradient over equal token ids.

References are cached (keyed by workload, size, seed and a fingerprint of the model and batch).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time

import torch
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.workloads import TinyLM, Workload

__all__ = [
    "ORACLE_VERSION",
    "PARITY_RTOL",
    "brute_force",
    "cache_dir",
    "flatten",
    "linear_head",
    "reference",
    "rel_err",
    "token_lm",
]

ORACLE_VERSION = "1"

# relative L2 error below which a deterministic float32 result counts as correct. Exact float32
# methods land at 1e-8..1e-6 of the float64 reference here; 1e-3 leaves room for cancellation in
# deep models and catches every real bug (a wrong term, a missing row or parameter is >= 1e-2).
PARITY_RTOL = 1e-3


def cache_dir() -> str:
    """Where references are cached (system temp dir)."""
    return os.path.join(tempfile.gettempdir(), "fimfast_bench_oracle")


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, detached."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def flatten(d: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """One float64 vector from per-parameter values in the order ``names`` (missing -> error)."""
    missing = [n for n in names if n not in d]
    if missing:
        raise KeyError(f"result misses {len(missing)}/{len(names)} parameters, e.g. {missing[0]}")
    return torch.cat([d[n].detach().reshape(-1).to("cpu", torch.float64) for n in names])


def rel_err(d: torch.Tensor, ref: torch.Tensor) -> float:
    """``||d - ref||_2 / ||ref||_2``."""
    return float((d - ref).norm() / ref.norm())


def _zeros(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(p) for n, p in params.items()}


# --------------------------------------------------------------------------------------------- #
# generic brute force
# --------------------------------------------------------------------------------------------- #
def brute_force(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    chunk_bytes: int = 2**30,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Exact diag FIM and diag EF by per-(token, class) vjps, in the model's dtype.

    Args:
        model: any network; ``model(x[None])`` gives ``(1, C)`` or ``(1, T, C)`` logits.
        inputs: ``(N, ...)`` batch.
        labels: ``(N,)`` or ``(N, T)`` int64.
        num_classes: C.
        chunk_bytes: memory bound of one batch of cotangents' gradients.

    Returns:
        ``(fim, ef)``, dicts of per-parameter diagonals.
    """
    params = trainable(model)
    P = sum(p.numel() for p in params.values())
    C = num_classes
    fim, ef = _zeros(params), _zeros(params)
    # ~2 live copies of the per-cotangent gradients (the vjp output and its square)
    k_max = max(1, chunk_bytes // (2 * P * params[next(iter(params))].element_size()))
    for n in range(inputs.shape[0]):
        x = inputs[n : n + 1]

        def f(pr, x=x):
            return functional_call(model, pr, (x,)).reshape(-1, C)  # (T, C)

        z, vjp_fn = vjp(f, params)
        p = torch.softmax(z.detach(), dim=-1)
        y = labels[n].reshape(-1)
        for t in range(z.shape[0]):
            jtp, gy = _zeros(params), None
            for c0 in range(0, C, k_max):
                cls = torch.arange(c0, min(C, c0 + k_max))
                E = torch.zeros(len(cls), *z.shape, dtype=z.dtype)
                E[torch.arange(len(cls)), t, cls] = 1.0
                (g,) = vmap(vjp_fn)(E)  # {name: (k, *shape)}: rows J_{t,c}
                hit = (cls == y[t]).nonzero()
                if hit.numel():  # J_{t,y}, taken before g is squared in place
                    gy = {name: g[name][hit[0, 0]].clone() for name in params}
                w = p[t, cls]
                for name, q in params.items():
                    gf = g[name].reshape(len(cls), -1)
                    # mv over a transposed view: no copy of the (k, numel) block
                    jtp[name] += (gf.t() @ w).view(q.shape)
                    fim[name] += (gf.square_().t() @ w).view(q.shape)
            for name in params:
                fim[name] -= jtp[name] ** 2
                ef[name] += (jtp[name] - gy[name]) ** 2
    return fim, ef


# --------------------------------------------------------------------------------------------- #
# closed forms
# --------------------------------------------------------------------------------------------- #
def linear_head(
    lin: torch.nn.Linear, x: torch.Tensor, labels: torch.Tensor, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Closed form for a Linear classifier ``z = W x + b`` on rows ``x`` ``(R, D)``.

    ``d z_c / d W_cj = x_j``, so ``diag F_W = (p(1-p))^T x^2`` and
    ``diag EF_W = ((p-e_y)^2)^T x^2``.
    """
    with torch.no_grad():
        p = torch.softmax(lin(x), dim=-1)
        hf = p * (1 - p)  # diagonal of diag(p) - p p^T
        s = p.clone()
        s[torch.arange(x.shape[0]), labels] -= 1.0
        he = s * s
        x2 = x * x
        fim = {prefix + "weight": hf.t() @ x2}
        ef = {prefix + "weight": he.t() @ x2}
        if lin.bias is not None:
            fim[prefix + "bias"] = hf.sum(0)
            ef[prefix + "bias"] = he.sum(0)
    return fim, ef


def token_lm(
    model: TinyLM, ids: torch.Tensor, labels: torch.Tensor, chunk_bytes: int = 2**28
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Exact diag FIM and EF of :class:`~benchmarks.workloads.TinyLM` over every token.

    Head in closed form; body through ``L_r`` (see the module docstring); the embedding tables by
    per-cotangent segment sums, so no per-cotangent gradient of the ``V x d`` table is formed.
    """
    N, T = ids.shape
    with torch.no_grad():
        x = model.embed(ids)  # (N, T, d)
        h = model.body(x)  # (N, T, d)
    R, d = N * T, h.shape[-1]
    W = model.head.weight.detach()  # (V, d)
    y = labels.reshape(-1)
    fim, ef = linear_head(model.head, h.reshape(R, d), y, prefix="head.")
    with torch.no_grad():
        p = torch.softmax(model.head(h.reshape(R, d)), dim=-1)  # (R, V)
        Wp = p @ W  # (R, d) = W^T p_r
        M = torch.einsum("rv,vi,vj->rij", p, W, W) - Wp[:, :, None] * Wp[:, None, :]
        lam, U = torch.linalg.eigh(M)
        Lf = U * lam.clamp_min(0).sqrt()[:, None, :]  # (R, d, d): columns L_r[:, k]
        s = p.clone()
        s[torch.arange(R), y] -= 1.0
        Le = (s @ W)[:, :, None]  # (R, d, 1): the observed score through the head
    layer_params = {n: p.detach() for n, p in model.layers.named_parameters()}
    for name in ("tok.weight", "pos.weight"):
        fim[name] = torch.zeros_like(dict(model.named_parameters())[name])
        ef[name] = torch.zeros_like(fim[name])
    for n_ in layer_params:
        fim["layers." + n_] = torch.zeros_like(layer_params[n_])
        ef["layers." + n_] = torch.zeros_like(layer_params[n_])
    P = sum(p.numel() for p in layer_params.values()) + 3 * T * d
    k_max = max(1, chunk_bytes // (4 * P * x.element_size()))

    def body1(lp, xn):
        return functional_call(model.layers, lp, (xn[None],),
                               {"mask": _causal(T, xn.dtype), "is_causal": True})[0]

    for n in range(N):
        uniq, inv = torch.unique(ids[n], return_inverse=True)
        S = torch.zeros(len(uniq), T, dtype=x.dtype)
        S[inv, torch.arange(T)] = 1.0  # segment sum over equal token ids
        _, vjp_fn = vjp(body1, layer_params, x[n])
        for target, Lall in ((fim, Lf), (ef, Le)):
            L = Lall[n * T : (n + 1) * T]  # (T, d, K)
            K = L.shape[-1]
            t_idx = torch.arange(T).repeat_interleave(K)
            k_idx = torch.arange(K).repeat(T)
            for s0 in range(0, T * K, k_max):
                tt, kk = t_idx[s0 : s0 + k_max], k_idx[s0 : s0 + k_max]
                E = torch.zeros(len(tt), T, d, dtype=x.dtype)
                E[torch.arange(len(tt)), tt] = L[tt, :, kk]
                glp, gx = vmap(vjp_fn)(E)  # {name: (k, ...)}, (k, T, d)
                for n_, g in glp.items():
                    target["layers." + n_] += (g**2).sum(0)
                target["pos.weight"][:T] += (gx**2).sum(0)
                gt = torch.einsum("ut,ktd->kud", S, gx)
                target["tok.weight"].index_add_(0, uniq, (gt**2).sum(0))
    return fim, ef


def _causal(T: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.triu(torch.full((T, T), float("-inf"), dtype=dtype), 1)


# --------------------------------------------------------------------------------------------- #
# dispatch and cache
# --------------------------------------------------------------------------------------------- #
def fingerprint(wl: Workload) -> str:
    """Short hash of the model's parameters and the batch (invalidates stale caches)."""
    h = hashlib.sha1()
    for n, p in wl.model.named_parameters():
        v = p.detach().double()
        h.update(f"{n}{tuple(p.shape)}{float(v.sum()):.12e}{float(v.abs().sum()):.12e}".encode())
    for t in (wl.inputs, wl.labels):
        v = t.detach().double()
        h.update(f"{tuple(t.shape)}{float(v.sum()):.12e}{float(v.abs().sum()):.12e}".encode())
    return h.hexdigest()[:16]


def compute(wl: Workload, chunk_bytes: int = 2**30) -> dict:
    """Reference vectors for ``wl`` in float64: ``{"fim", "ef", "names", "info"}``."""
    names = [n for n, p in wl.model.named_parameters() if p.requires_grad]
    m64 = copy.deepcopy(wl.model).to("cpu", torch.float64)
    x = wl.inputs.to("cpu")
    x64 = x.to(torch.float64) if x.is_floating_point() else x
    y = wl.labels.to("cpu")
    t0 = time.perf_counter()
    # the composite attention kernel: float64, batched rules for vmap (the fused one has none)
    with sdpa_kernel(SDPBackend.MATH):
        fim, ef, method = _compute(wl, m64, x64, y, chunk_bytes)
    info = {"method": method, "seconds": time.perf_counter() - t0, "num_params": wl.num_params,
            "version": ORACLE_VERSION}
    return {"fim": flatten(fim, names), "ef": flatten(ef, names), "names": names, "info": info}


def _compute(wl, m64, x64, y, chunk_bytes):
    if wl.oracle == "linear_head":
        fim, ef = linear_head(m64[0], x64, y, prefix="0.")
        method = "float64 closed form (p(1-p))^T x^2 of the linear head"
    elif wl.oracle == "token_lm":
        fim, ef = token_lm(m64, x64, y, chunk_bytes=min(chunk_bytes, 2**28))
        method = "float64: head closed form, body by vjp through the head's range (L_r L_r^T)"
    else:
        fim, ef = brute_force(m64, x64, y, wl.num_classes, chunk_bytes)
        method = "float64 brute force from per-row logit Jacobians (vjp, chunked)"
    return fim, ef, method


def reference(wl: Workload, seed: int, directory: str | None = None, recompute: bool = False,
              chunk_bytes: int = 2**30) -> dict:
    """Cached :func:`compute` (``recompute`` forces a fresh one)."""
    directory = directory or cache_dir()
    os.makedirs(directory, exist_ok=True)
    fp = fingerprint(wl)
    path = os.path.join(directory, f"ref_v{ORACLE_VERSION}_{wl.key}_{wl.size}_seed{seed}_{fp}.pt")
    if os.path.exists(path) and not recompute:
        out = torch.load(path)
        out["info"] = dict(out["info"], cached=True)
        return out
    out = compute(wl, chunk_bytes)
    out["info"]["fingerprint"] = fp
    torch.save(out, path)
    with open(path + ".json", "w") as f:
        json.dump(out["info"], f)
    return out
