"""Pure-PyTorch reference implementations of every op (any device, float64-capable).

These define correctness: every other backend is tested against them op by op.
"""

from __future__ import annotations

import math

import torch

from fimfast.dtypes import compute_dtype
from fimfast.ops import rng, softmax_rest

PROBE_MODES = ("hutchinson", "sqrt", "dg", "rankk", "empirical", "mc", "bernoulli", "gaussian")


def probe_logit_grad_torch(
    logits: torch.Tensor,
    mode: str,
    seed: int,
    offset: int,
    num_probes: int,
    labels: torch.Tensor | None = None,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
    sigma2: float = 1.0,
) -> torch.Tensor:
    """Reference of :func:`fimfast.ops.probe_logit_grad` (see its docstring)."""
    R, C = logits.shape
    S = int(num_probes)
    dt = compute_dtype(logits.dtype)
    z = logits.detach().to(dt)
    dev = z.device
    if mode == "gaussian":
        xi = rng.rademacher(seed, offset, (S, R, C), dt, dev)
        return xi * (1.0 / math.sqrt(sigma2))
    if mode == "bernoulli":  # sqrt(s (1 - s)) = 1 / (2 cosh(z / 2)), accurate in both tails
        xi = rng.rademacher(seed, offset, (S, R, C), dt, dev)
        return xi * (0.5 / torch.cosh(0.5 * z))
    # 1 - p of the leading classes from the others' exponentials: exact on confident rows
    soft = softmax_rest.softmax_rest(z)
    p = soft.p
    if mode in ("hutchinson", "sqrt", "dg"):
        sp = torch.sqrt(p)
        w = rng.rademacher(seed, offset, (S, R, C), dt, dev) * sp
        if mode == "hutchinson":
            return softmax_rest.mix(w, soft)
        return w
    if mode == "rankk":
        if eig is None:
            raise ValueError("probe_logit_grad: mode 'rankk' needs eig=(eigenvalues, eigenvectors)")
        lam, vec = eig
        k = lam.shape[-1]
        xi = rng.rademacher(seed, offset, (S, R, k), dt, dev)
        coef = xi * torch.sqrt(lam.to(dt).clamp_min(0)).unsqueeze(0)  # (S, R, k)
        return torch.einsum("srk,rkc->src", coef, vec.to(dt))
    if mode == "empirical":
        if labels is None:
            raise ValueError("probe_logit_grad: mode 'empirical' needs labels")
        y = labels.long().to(dev).unsqueeze(0).expand(S, R)
        return softmax_rest.score(soft, y)
    if mode == "mc":
        u = rng.uniform(seed, offset, (S, R), dt, dev)
        cdf = torch.cumsum(p, dim=-1)
        # label = number of classes whose cumulative probability is <= u (inverse CDF)
        y = (cdf.unsqueeze(0) <= u.unsqueeze(-1)).sum(-1).clamp_max(C - 1)
        return softmax_rest.score(soft, y)
    raise ValueError(f"probe_logit_grad: mode must be one of {PROBE_MODES}; got {mode!r}")


def sample_labels_torch(
    logits: torch.Tensor, seed: int, offset: int, num_probes: int
) -> torch.Tensor:
    """Labels drawn by mode ``mc`` of the reference, shape ``(S, R)`` int64 (for tests)."""
    dz = probe_logit_grad_torch(logits, "mc", seed, offset, num_probes)
    return dz.argmax(-1)


# --------------------------------------------------------------------------------------------- #
# core_topk: top-k eigenpairs of diag(p) - p p^T
# --------------------------------------------------------------------------------------------- #
def _secular(qs: torch.Tensor, origin: torch.Tensor, tau: torch.Tensor):
    """g(lambda) = sum_c q_c / (q_c - lambda) and its derivative, lambda = origin + tau.

    With sum_c p_c = 1 the secular equation sum_c p_c^2/(p_c - lambda) = 1 equals
    lambda * g(lambda) = 0, so the non-zero eigenvalues are the roots of g. g has no constant term:
    the form with "- 1" cancels catastrophically when the other probabilities are tiny (peaked p),
    which cost 4e-3 of orthogonality in float64. The differences q_c - lambda are formed as
    (q_c - origin) - tau so that the pole nearest the root keeps full relative accuracy.

    qs: (R, K, C) sorted probabilities, each interval scaled by its upper pole (so that tiny
    probabilities do not overflow the derivative); origin, tau: (R, K) in the same units.
    """
    delta = (qs - origin.unsqueeze(-1)) - tau.unsqueeze(-1)  # (R, K, C)
    r = qs / delta
    return r.sum(-1), (r / delta).sum(-1), delta


def _tie_vectors(
    vec_sorted: torch.Tensor, tie: torch.Tensor, q: torch.Tensor, a: torch.Tensor, eps: float
) -> None:
    """Put the Helmert vector (e_g0+...+e_g(i-1) - i e_a) of the tie group ending at sorted
    position ``a[j]`` into ``vec_sorted[:, j]`` for the rows where eigenvalue ``j`` is a tie."""
    dt = vec_sorted.dtype
    pos = torch.arange(q.shape[-1], device=q.device)
    for j in range(tie.shape[1]):
        tj = tie[:, j]
        if not bool(tj.any()):
            continue
        aj = int(a[j])
        qa = q[:, aj].unsqueeze(-1)
        notsame = ((qa - q) > 8 * eps * qa) & (pos.unsqueeze(0) < aj)
        last_not = torch.where(notsame, pos.unsqueeze(0), torch.full_like(pos, -1).unsqueeze(0))
        start = last_not.max(-1).values + 1  # (R,)
        i = (aj - start).to(dt)  # members before aj in the group (>= 1 for a tie)
        inrun = (pos.unsqueeze(0) >= start.unsqueeze(-1)) & (pos.unsqueeze(0) < aj)
        h = inrun.to(dt) - (pos.unsqueeze(0) == aj).to(dt) * i.unsqueeze(-1)
        vec_sorted[:, j] = torch.where(tj.unsqueeze(-1), h, vec_sorted[:, j])


def core_topk_torch(
    p: torch.Tensor, k: int, solver: str = "exact", iters: int = 30
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`fimfast.ops.core_topk` (see its docstring)."""
    if solver == "power":
        return _core_topk_power(p, k, iters)
    if solver != "exact":
        raise ValueError(f"core_topk: solver must be 'exact' or 'power'; got {solver!r}")
    R, C = p.shape
    dt = compute_dtype(p.dtype)
    p = p.to(dt)
    eps = torch.finfo(dt).eps
    # ascending; stable, so tied probabilities keep class order: the tie eigenvectors (Helmert
    # vectors over sorted positions) are then the same on every device and backend
    q, perm = torch.sort(p, dim=-1, stable=True)
    # eigenvalue j (0 = largest) lies in the sorted interval (q[a-1], q[a]) with a = C-1-j
    a = torch.arange(C - 1, C - 1 - k, -1, device=p.device)  # (K,)
    hi = q[:, a]  # (R, K)
    lo = q[:, a - 1]
    tie = (hi - lo) <= 8 * eps * hi
    zlo = (lo <= 0) & ~tie  # lower pole is an underflowed probability: the eigenvalue is 0
    scale = torch.where(hi > 0, hi, torch.ones_like(hi))
    qs = q.unsqueeze(1) / scale.unsqueeze(-1)  # (R, K, C)
    lo_s, hi_s = lo / scale, hi / scale
    gap = hi_s - lo_s
    # pick the pole nearest the root as origin: g(mid) >= 0 means the root is in (lo, mid]
    mid = 0.5 * (lo_s + hi_s)
    g_mid, _, _ = _secular(qs, mid, torch.zeros_like(mid))
    left = g_mid >= 0
    origin = torch.where(left, lo_s, hi_s)
    t_lo = torch.where(left, torch.zeros_like(gap), -0.5 * gap)  # bracket of tau = lambda - origin
    t_hi = torch.where(left, 0.5 * gap, torch.zeros_like(gap))
    tau = 0.5 * (t_lo + t_hi)
    fixed = tie | zlo
    for _ in range(200):
        g, dg, _ = _secular(qs, origin, tau)
        t_lo = torch.where(g < 0, tau, t_lo)  # g increases with lambda
        t_hi = torch.where(g > 0, tau, t_hi)
        # rational step: model g(tau) ~ a - s/tau (the pole at the origin dominates), matched to
        # g and g' at tau; it is exact for a single pole, where Newton needs ~log2(gap/root)
        # bisections (hundreds when the probabilities span hundreds of decades)
        s_ = dg * tau * tau
        rational = s_ / (g + s_ / tau)
        newton = tau - g / dg
        ok_r = (rational > t_lo) & (rational < t_hi) & torch.isfinite(rational) & (rational != tau)
        ok_n = (newton > t_lo) & (newton < t_hi) & torch.isfinite(newton) & (newton != tau)
        nxt = torch.where(ok_r, rational, torch.where(ok_n, newton, 0.5 * (t_lo + t_hi)))
        done = (g == 0) | ((nxt - tau).abs() <= 2 * eps * (origin + tau).abs()) | fixed
        tau = torch.where(g == 0, tau, nxt)
        if bool(done.all()):
            break
    _, _, delta = _secular(qs, origin, tau)
    vec_sorted = qs / delta  # (R, K, C), secular eigenvectors p_c / (p_c - lambda)
    lam = torch.where(tie, hi, (origin + tau) * scale)
    lam = torch.where(zlo, torch.zeros_like(lam), lam)
    if bool(zlo.any()):
        # eigenvalue 0 of the zero classes: the normalised indicator of the zero group, orthogonal
        # to every eigenvector of a positive eigenvalue (which vanish on the zero classes)
        ind = (q <= 0).to(dt).unsqueeze(1).expand_as(vec_sorted)
        vec_sorted = torch.where(zlo.unsqueeze(-1), ind, vec_sorted)
    if bool(tie.any()):
        _tie_vectors(vec_sorted, tie, q, a, eps)
    # a root that sits on a pole to within rounding leaves an infinite entry: that class alone
    bad = ~torch.isfinite(vec_sorted)
    if bool(bad.any()):
        vec_sorted = torch.where(bad.any(-1, keepdim=True), bad.to(dt), vec_sorted)
    vec_sorted = vec_sorted / vec_sorted.norm(dim=-1, keepdim=True)
    vec = torch.empty_like(vec_sorted)
    vec.scatter_(-1, perm.unsqueeze(1).expand(R, k, C), vec_sorted)
    return lam, fix_signs(vec)


# entries within this many ulps of the largest magnitude count as equally large for the sign rule
SIGN_TIE_ULPS = 64


def fix_signs(v: torch.Tensor) -> torch.Tensor:
    """Flip each vector of ``v`` (..., C) so its largest-magnitude entry is positive.

    Entries within ``SIGN_TIE_ULPS`` ulps of the largest magnitude count as equally large and the
    first of them (in class order) decides: two classes (eigenvector (1, -1)/sqrt(2)) and tie
    groups have equal magnitudes of opposite signs, which rounding alone would otherwise order,
    differently on every backend.
    """
    mag = v.abs()
    eps = torch.finfo(v.dtype).eps
    near = mag >= mag.amax(-1, keepdim=True) * (1 - SIGN_TIE_ULPS * eps)
    idx = near.to(torch.int8).argmax(-1, keepdim=True)  # the first near-largest entry
    sign = torch.sign(torch.gather(v, -1, idx))
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)


def _core_topk_power(p: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Power iteration with Gram-Schmidt deflation (the paper's solver), ``iters`` steps."""
    R, C = p.shape
    dt = compute_dtype(p.dtype)
    p = p.to(dt)
    # the k largest, ties by lower class index (topk's order among ties is unspecified)
    top = torch.sort(p, dim=-1, descending=True, stable=True).indices[:, :k]  # (R, K)
    # start: e_{top_j} minus its projection on the null vector 1 (deterministic, never orthogonal
    # to the top eigenvector, which is concentrated on the largest probabilities)
    v = torch.nn.functional.one_hot(top, C).to(dt) - 1.0 / C
    for _ in range(int(iters)):
        v = p.unsqueeze(1) * v - p.unsqueeze(1) * (v @ p.unsqueeze(-1))  # I v per row and vector
        v = _gram_schmidt(v)
    Iv = p.unsqueeze(1) * v - p.unsqueeze(1) * (v @ p.unsqueeze(-1))
    lam = (v * Iv).sum(-1)
    return lam, fix_signs(v)


def power_finish(p: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The power solver's last step, on every backend's vectors ``v`` (R, k, C): Gram-Schmidt
    once more (repeated while it shrinks a vector), then the Rayleigh quotients ``v^T I v`` and
    the sign rule.

    The iterations' own pass leaves ``I v_j`` orthogonal to ``v_1 .. v_(j-1)`` only to rounding
    relative to ``|I v_j|``, which is about ``lam_1`` whatever ``lam_j``: a row whose ``lam_j``
    is below ``eps * lam_1`` kept a component of ``v_1`` of any size (5e-3 for probabilities
    (0.85, 4e-17, 5e-26, 0.15)), its Rayleigh quotient picked up ``lam_1`` times its square
    (7.5e-6 instead of 6.6e-17) and ``I - I_k`` lost positive semi-definiteness by as much: the
    lower bound failed by a factor 1e11 on that class; a row whose ``v_2`` came out as ``v_1``
    itself counted ``lam_1`` twice (and one more pass was not enough there: its residual, of the
    size of rounding, still lay along ``v_1``). After these passes ``v_j`` is orthogonal to the
    others to rounding of what is left of it, its quotient at most ``lam_j`` plus rounding."""
    dt = v.dtype
    p = p.to(dt)
    v = _gram_schmidt(v, passes=8)
    Iv = p.unsqueeze(1) * v - p.unsqueeze(1) * (v @ p.unsqueeze(-1))
    return (v * Iv).sum(-1), fix_signs(v)


def _gram_schmidt(v: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """Gram-Schmidt over the vectors of every row; with ``passes > 1`` the projections are
    taken again while a pass shrinks some row's vector by more than half (at most ``passes``):
    a pass leaves rounding of the vector's size before it along the others, which is all that
    is left of a vector nearly in their span."""
    out = []
    for j in range(v.shape[1]):
        x = v[:, j]
        for _ in range(passes if out else 0):
            before = x.norm(dim=-1) if passes > 1 else None
            for y in out:
                x = x - (x * y).sum(-1, keepdim=True) * y
            if before is None:
                break
            after = x.norm(dim=-1)
            if not bool(((after < 0.5 * before) & (after > 0)).any()):
                break
        out.append(x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny))
    return torch.stack(out, 1)


# --------------------------------------------------------------------------------------------- #
# squared products and accumulation
# --------------------------------------------------------------------------------------------- #
def sq_matmul_torch(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`fimfast.ops.sq_matmul`: ``(g*g).T @ (a*a)`` in float32 or wider."""
    dt = compute_dtype(torch.promote_types(g.dtype, a.dtype))
    g = g.to(dt)
    a = a.to(dt)
    return (g * g).transpose(0, 1) @ (a * a)


def shared_sq_torch(G: torch.Tensor, A: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Reference of :func:`fimfast.ops.shared_sq`: ``sum_n (G_n^T A_n)**2`` by chunked bmm."""
    dt = compute_dtype(torch.promote_types(G.dtype, A.dtype))
    N, _, O = G.shape
    I = A.shape[-1]
    out = torch.zeros(O, I, dtype=dt, device=G.device)
    if chunk is None:
        chunk = max(1, (64 * 2**20) // max(1, O * I * (8 if dt == torch.float64 else 4)))
    for s in range(0, N, chunk):
        per = torch.bmm(G[s : s + chunk].to(dt).transpose(1, 2), A[s : s + chunk].to(dt))
        out += (per * per).sum(0)
    return out


def accumulate_torch_(
    states: list[torch.Tensor],
    grads: list[torch.Tensor],
    mode: str = "sum",
    beta: float = 0.0,
    scale: float = 1.0,
) -> None:
    """Reference of :func:`fimfast.ops.accumulate_` (``torch._foreach_*``)."""
    if not states:
        return
    sq = [g.to(s.dtype) for s, g in zip(states, grads)]
    sq = torch._foreach_mul(sq, sq)
    if mode == "sum":
        torch._foreach_add_(states, sq, alpha=scale)
    elif mode == "ema":
        torch._foreach_mul_(states, beta)
        torch._foreach_add_(states, sq, alpha=(1.0 - beta) * scale)
    else:
        raise ValueError(f"accumulate_: mode must be 'sum' or 'ema'; got {mode!r}")
