"""Float64 brute-force oracle: per-row Jacobians and ``sum_r diag(J_r^T M_r J_r)``.

Independent of the library: it rebuilds the logits with the case's own ``logits_fn``, forms every
row's full Jacobian ``J_r`` (C x P) one output coordinate at a time, and contracts it with the core
matrix of the requested quantity. Only for tiny models.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.utils.prune


@dataclass
class RowJacobians:
    """Per-row Jacobians of the valid rows, in float64.

    Attributes:
        names: trainable parameter names (order of the columns of ``J``).
        shapes: their shapes.
        J: ``(R, C, P)`` Jacobians of the logits of every valid row.
        z: ``(R, C)`` logits of the valid rows.
        labels: ``(R,)`` or ``(R, C)`` labels of the valid rows, or ``None``.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    J: torch.Tensor
    z: torch.Tensor
    labels: torch.Tensor | None

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat ``(P,)`` vector -> ``{name: tensor}``."""
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = 1
            for d in s:
                k *= d
            out[n] = flat[i:i + k].reshape(s)
            i += k
        return out


def strip_pruned(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without the masked tensors ``torch.nn.utils.prune`` (and the weights the older
    ``torch.nn.utils.weight_norm``) left from its last forward (not graph leaves:
    ``copy.deepcopy`` refuses them; the next forward makes them again)."""
    from torch.nn.utils.weight_norm import WeightNorm

    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, torch.nn.utils.prune.BasePruningMethod):
                m.__dict__.pop(hook._tensor_name, None)
                if isinstance(m, torch.nn.RNNBase):  # its list of the weights the forward reads
                    m._init_flat_weights()
            elif isinstance(hook, WeightNorm):  # the older weight_norm: made again likewise
                m.__dict__.pop(hook.name, None)
    return model


def row_jacobians(case) -> RowJacobians:
    """Float64 Jacobians of every valid row of ``case`` (see tests/cases.py)."""
    model = copy.deepcopy(strip_pruned(case.model)).double()
    for m in model.modules():  # the lookup's own derivative: scale_grad_by_freq only divides
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)):  # autograd's gradient
            m.scale_grad_by_freq = False  # by token counts over the whole batch
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    logits = case.logits_fn(model, case.batch_double())
    C = logits.shape[-1]
    flat = logits.reshape(-1, C)
    valid = case.valid.reshape(-1)
    rows = valid.nonzero().squeeze(-1)
    Js = []
    for r in rows.tolist():
        Jr = []
        for c in range(C):
            g = torch.autograd.grad(flat[r, c], params, retain_graph=True, allow_unused=True)
            Jr.append(torch.cat([
                (torch.zeros_like(p) if gi is None else gi).reshape(-1)
                for p, gi in zip(params, g)
            ]))
        Js.append(torch.stack(Jr))
    labels = None
    if case.labels is not None:
        lab = case.labels
        labels = (lab.reshape(-1) if case.likelihood == "categorical"
                  else lab.reshape(-1, C).double())[rows]
    return RowJacobians(
        names=[n for n, _ in named],
        shapes=[tuple(p.shape) for p in params],
        J=torch.stack(Js),
        z=flat[rows].detach(),
        labels=labels,
    )


def core_matrix(z: torch.Tensor, likelihood: str, sigma2: float = 1.0) -> torch.Tensor:
    """``(R, C, C)`` core FIM ``I(z)`` of every row."""
    C = z.shape[-1]
    if likelihood == "categorical":
        p = torch.softmax(z, -1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    if likelihood == "bernoulli":
        s = torch.sigmoid(z)
        return torch.diag_embed(s * (1 - s))
    return torch.eye(C, dtype=z.dtype).expand(z.shape[0], C, C) / sigma2


def core_rank_k(z: torch.Tensor, likelihood: str, k: int, sigma2: float = 1.0) -> torch.Tensor:
    """``(R, C, C)`` best rank-``k`` part of ``I(z)`` (top-``k`` eigenpairs by ``eigh``; for a
    diagonal ``I`` its ``k`` largest entries, ties by lower class index, as RANKK keeps them)."""
    I = core_matrix(z, likelihood, sigma2)
    if likelihood != "categorical":
        d = I.diagonal(dim1=-2, dim2=-1)
        idx = torch.sort(d, dim=-1, descending=True, stable=True).indices[:, :k]
        keep = torch.zeros_like(d).scatter_(-1, idx, 1.0)
        return torch.diag_embed(d * keep)
    ev, V = torch.linalg.eigh(I)
    ev, V = ev[:, -k:], V[:, :, -k:]
    return torch.einsum("rk,rik,rjk->rij", ev, V, V)


def quad_diag(J: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``sum_r diag(J_r^T M_r J_r)`` as a flat ``(P,)`` vector."""
    return torch.einsum("rcp,rcd,rdp->p", J, M, J)


def oracle(case, quantity: str = "exact", k: int = 2, sigma2: float = 1.0
           ) -> dict[str, torch.Tensor]:
    """Float64 diagonal of ``quantity`` summed over the valid rows of ``case``.

    ``quantity``: ``exact`` (diag F), ``empirical`` (observed-label scores), ``dg`` (the
    HUTCHINSON_DG upper bound ``J^T diag(I) J``... for categorical ``J^T diag(p) J``), ``rankk``
    (the HUTCHINSON_RANKK lower bound with the top-``k`` part of ``I``).
    """
    rj = row_jacobians(case)
    return rj.split(oracle_flat(rj, case.likelihood, quantity, k, sigma2))


def oracle_flat(rj: RowJacobians, likelihood: str, quantity: str, k: int = 2,
                sigma2: float = 1.0) -> torch.Tensor:
    """As :func:`oracle`, from precomputed Jacobians, as a flat vector."""
    z = rj.z
    if quantity == "exact":
        return quad_diag(rj.J, core_matrix(z, likelihood, sigma2))
    if quantity == "dg":
        if likelihood == "categorical":
            p = torch.softmax(z, -1)
            return quad_diag(rj.J, torch.diag_embed(p))
        return quad_diag(rj.J, core_matrix(z, likelihood, sigma2))
    if quantity == "rankk":
        return quad_diag(rj.J, core_rank_k(z, likelihood, k, sigma2))
    if quantity == "empirical":
        if likelihood == "categorical":
            g = torch.nn.functional.one_hot(rj.labels.long(), z.shape[-1]).double()
            g = g - torch.softmax(z, -1)
        elif likelihood == "bernoulli":
            g = rj.labels - torch.sigmoid(z)
        else:
            g = (rj.labels - z) / sigma2
        return (torch.einsum("rcp,rc->rp", rj.J, g) ** 2).sum(0)
    raise ValueError(quantity)


def hutchinson_factor(z: torch.Tensor, likelihood: str, kind: str, k: int = 2,
                      sigma2: float = 1.0) -> torch.Tensor:
    """``(R, m, C)`` factor ``A_r`` of the probe law: ``u_r = A_r^T xi_r`` with Rademacher ``xi_r``.

    ``kind``: ``hutchinson`` (A = diag(sqrt p) - sqrt p p^T), ``dg`` (diag(sqrt p)), ``rankk``
    (diag(sqrt lam) V^T); for diagonal likelihoods every kind is the diagonal square root (rankk
    keeps the ``k`` largest entries).
    """
    R, C = z.shape
    if likelihood == "categorical":
        p = torch.softmax(z, -1)
        sp = p.sqrt()
        if kind == "hutchinson":
            return torch.diag_embed(sp) - sp.unsqueeze(-1) * p.unsqueeze(-2)
        if kind == "dg":
            return torch.diag_embed(sp)
        ev, V = torch.linalg.eigh(core_matrix(z, likelihood))
        ev, V = ev[:, -k:].clamp_min(0), V[:, :, -k:]
        return ev.sqrt().unsqueeze(-1) * V.transpose(1, 2)
    d = core_matrix(z, likelihood, sigma2).diagonal(dim1=-2, dim2=-1)
    A = torch.diag_embed(d.sqrt())
    if kind == "rankk":
        idx = torch.sort(d, dim=-1, descending=True, stable=True).indices[:, :k]
        A = torch.gather(A, 1, idx.unsqueeze(-1).expand(R, k, C))
    return A


def hutchinson_variance(rj: RowJacobians, likelihood: str, kind: str, k: int = 2,
                        sigma2: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance per coordinate of one HUTCHINSON-type draw (docs/math.md §8).

    With ``b = (A_r v_r)_r`` stacked over rows, ``E = |b|^2`` and
    ``Var = 2 (|b|^4 - sum_k b_k^4)``.
    """
    A = hutchinson_factor(rj.z, likelihood, kind, k, sigma2)  # (R, m, C)
    b = torch.einsum("rmc,rcp->rmp", A, rj.J).reshape(-1, rj.J.shape[-1])  # (R*m, P)
    e = (b ** 2).sum(0)
    var = 2 * (e ** 2 - (b ** 4).sum(0))
    return e, var


def mc_variance(rj: RowJacobians) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance per coordinate of one MONTE_CARLO draw (categorical; docs/math.md §8)."""
    p = torch.softmax(rj.z, -1)  # (R, C)
    vbar = torch.einsum("rc,rcp->rp", p, rj.J)
    dev = rj.J - vbar.unsqueeze(1)
    m2 = torch.einsum("rc,rcp->rp", p, dev ** 2)
    m4 = torch.einsum("rc,rcp->rp", p, dev ** 4)
    return m2.sum(0), (m4 - m2 ** 2).sum(0)


def rel_error(got: dict, ref: dict) -> float:
    """Relative Frobenius error of the estimate ``got`` against ``ref`` over all of ``ref``'s
    tensors (both dicts keyed by parameter name; computed in float64)."""
    num = sum(float(((got[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
    den = sum(float((ref[k].double() ** 2).sum()) for k in ref)
    return (num / den) ** 0.5


def one_probe_oracle(model, batches, seed: int, mode: str = "hutchinson") -> dict:
    """Sums over ``batches`` of the squared one-probe gradients in float64, by hand: the probe of
    the counters each step of ``DiagFisher(model, mode, seed=seed)`` uses (``2 R C`` per batch of
    ``(R, C)`` logits), one ``autograd.grad`` through the model's own forward."""
    from fimfast import ops
    from fimfast.estimator import trainable_parameters

    names, params = trainable_parameters(model)
    out = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, params)}
    offset = 0
    for x, _ in batches:
        z = model(x)
        u = ops.probe_logit_grad(z.detach().double(), mode, seed, offset, 1, backend="torch")[0]
        grads = torch.autograd.grad(z, params, u.to(z.dtype), allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                out[n] += g.double() ** 2
        offset += 2 * z.shape[0] * z.shape[1]
    return out
