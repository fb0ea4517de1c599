"""Structured Fisher representations: NNGeometry parity and float64 oracles.

* every representation's ``to_dense()`` equals NNGeometry's ``to_torch()`` (``FIM`` with
  ``classif_logits``, mean over the examples) on Linear and Conv2d models, to float32 rounding;
* dense, block-diagonal and low-rank equal the float64 oracle of ``sum_r J_r^T I(z_r) J_r``
  (tests/oracle.py) to 1e-10 on the whole panel (attention, embeddings, LayerNorm, tied weights,
  token-level logits with masks), for EXACT and EMPIRICAL;
* quasi-diagonal equals the oracle's diagonal and weight-bias cross entries; EKFAC's refitted
  diagonal equals ``diag(K^T F_l K)`` in its own eigenbasis ``K``; KFAC equals the exact block on
  one sample of an MLP (where the Kronecker factorisation is exact).
"""

from __future__ import annotations

import pytest
import torch
from cases import CATEGORICAL, PANEL, Case, make_case
from oracle import core_matrix, row_jacobians
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fimfast
from fimfast.structured import StructuredFIM

nngeometry = pytest.importorskip("nngeometry")
from nngeometry.metrics import FIM  # noqa: E402
from nngeometry.object import (  # noqa: E402
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
)

F64 = 1e-10
F32_REL = 1e-5  # float32 sums of a few hundred terms, two libraries, different orders


def _mlp(bias_last: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(),
                         nn.Linear(6, 4, bias=bias_last))


def _cnn(bias_first: bool = True) -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=bias_first), nn.ReLU(),
                         nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(), nn.Linear(2 * 3 * 3, 4))


MODELS = {
    "mlp": (_mlp, lambda g: torch.randn(36, 5, generator=g)),
    "mlp_nobias": (lambda: _mlp(False), lambda g: torch.randn(36, 5, generator=g)),
    "cnn": (_cnn, lambda g: torch.randn(24, 2, 6, 6, generator=g)),
    "cnn_nobias": (lambda: _cnn(False), lambda g: torch.randn(24, 2, 6, 6, generator=g)),
}
NNG = {"dense": PMatDense, "block_diag": PMatBlockDiag, "kfac": PMatKFAC,
       "quasi_diag": PMatQuasiDiag, "low_rank": PMatLowRank, "ekfac": PMatEKFAC}


def _setup(name: str):
    g = torch.Generator().manual_seed(3)
    build, data = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = data(g)
    y = torch.randint(0, 4, (x.shape[0],), generator=g)
    return model, DataLoader(TensorDataset(x, y), batch_size=x.shape[0] // 3)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    err = float((a.double() - b.double()).abs().max())
    scale = float(b.double().abs().max())
    assert err <= rel * scale, f"max error {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("rep", list(NNG))
def test_nngeometry_parity(model_name, rep):
    model, dl = _setup(model_name)
    F = fimfast.fisher(model, dl, "exact", representation=rep, reduction="mean")
    ref = FIM(model, dl, NNG[rep], variant="classif_logits")
    if rep == "ekfac":
        ref.update_diag(dl)  # the refit on the same examples
    _close(F.to_dense(), ref.to_torch(), F32_REL)
    # the diagonal through both libraries' own paths (PMatEKFAC has no get_diag)
    if rep != "ekfac":
        _close(F.diag().to_vector(), ref.get_diag(), F32_REL)
    _close(torch.tensor(F.trace()), torch.as_tensor(ref.trace()).detach(), F32_REL)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_nngeometry_diag(model_name):
    model, dl = _setup(model_name)
    F = fimfast.fisher(model, dl, "exact", representation="diag", reduction="mean")
    assert isinstance(F, fimfast.DiagFIM)
    ref = FIM(model, dl, PMatDiag, variant="classif_logits")
    _close(F.to_vector(), ref.get_diag(), F32_REL)


# -- float64 oracle ----------------------------------------------------------------------------- #
def _oracle_dense(case, quantity: str = "exact") -> torch.Tensor:
    rj = row_jacobians(case)
    if quantity == "exact":
        M = core_matrix(rj.z, case.likelihood)
    else:
        p = torch.softmax(rj.z, -1)
        g = torch.nn.functional.one_hot(rj.labels.long(), rj.z.shape[-1]).double() - p
        M = g.unsqueeze(-1) * g.unsqueeze(-2)
    return torch.einsum("rcp,rcd,rdq->pq", rj.J, M, rj.J), rj.J.shape[0]


def _fisher64(case, rep, fim_type="exact", **kw):
    c = case.to(torch.float64)
    return fimfast.fisher(c.model, [c.batch], fim_type, representation=rep,
                          likelihood=case.likelihood, **kw)


def _blocks_mask(F: StructuredFIM) -> torch.Tensor:
    from fimfast.structured.dense import module_blocks

    P = F.numel()
    mask = torch.zeros(P, P, dtype=torch.bool)
    for i, j in module_blocks(F.names):
        a, b = F.offsets[i], F.offsets[j]
        mask[a:b, a:b] = True
    return mask


@pytest.mark.parametrize("name", PANEL)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_dense_block_lowrank_oracle(name, reduction):
    case = make_case(name)
    ref, R = _oracle_dense(case)
    if reduction == "mean":
        ref = ref / R
    D = _fisher64(case, "dense", reduction=reduction)
    assert D.meta["count"] == R
    _close(D.to_dense(), ref, F64)
    B = _fisher64(case, "block_diag", reduction=reduction)
    _close(B.to_dense(), ref * _blocks_mask(B), F64)
    L = _fisher64(case, "low_rank", reduction=reduction)
    _close(L.to_dense(), ref, F64)
    ev, V = torch.linalg.eigh(ref)
    top = (V[:, -3:] * ev[-3:]) @ V[:, -3:].T
    Lr = _fisher64(case, "low_rank", reduction=reduction, rank=3)
    _close(Lr.to_dense(), top, 1e-8)


@pytest.mark.parametrize("name", CATEGORICAL)
def test_dense_empirical_oracle(name):
    case = make_case(name)
    ref, _ = _oracle_dense(case, "empirical")
    _close(_fisher64(case, "dense", "empirical", reduction="sum").to_dense(), ref, F64)


def test_dense_over_batches_and_chunks():
    """Two batches and one pair per backward give the one-batch value."""
    case = make_case("token_lm", N=4).to(torch.float64)
    b = case.batch
    halves = [{k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()}]
    one = fimfast.fisher(case.model, [b], "exact", representation="dense", reduction="sum")
    two = fimfast.fisher(case.model, halves, "exact", representation="dense", reduction="sum",
                         pair_chunk=1)
    _close(two.to_dense(), one.to_dense(), F64)


def _layer_positions(model: nn.Module, F: StructuredFIM):
    """``(O, I')`` flat positions of every Linear/Conv2d (bias as the last column), built from
    the module tree independently of the library."""
    out = []
    for mname, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        w = F.slice_of(f"{mname}.weight")
        O = m.weight.shape[0]
        pos = torch.arange(w.start, w.stop).reshape(O, -1)
        if m.bias is not None:
            b = F.slice_of(f"{mname}.bias")
            pos = torch.cat([pos, torch.arange(b.start, b.stop).unsqueeze(1)], 1)
        out.append((m, pos))
    return out


KRON_CASES = ["relu_mlp", "sigmoid_mlp", "cnn", "multilabel", "regression"]


@pytest.mark.parametrize("name", KRON_CASES)
def test_quasi_diag_oracle(name):
    case = make_case(name)
    ref, _ = _oracle_dense(case)
    Q = _fisher64(case, "quasi_diag", reduction="sum")
    P = Q.numel()
    mask = torch.eye(P, dtype=torch.bool)
    for m, pos in _layer_positions(case.model, Q):
        if m.bias is not None:
            w, b = pos[:, :-1], pos[:, -1:].expand_as(pos[:, :-1])
            mask[w.reshape(-1), b.reshape(-1)] = True
            mask[b.reshape(-1), w.reshape(-1)] = True
    _close(Q.to_dense(), ref * mask, F64)


@pytest.mark.parametrize("name", KRON_CASES)
def test_ekfac_refit_is_the_diagonal_in_its_basis(name):
    case = make_case(name)
    ref, _ = _oracle_dense(case)
    E = _fisher64(case, "ekfac", reduction="sum")
    for (_, pos), ua, ug, d in zip(_layer_positions(case.model, E), E.UA, E.UG, E.D):
        p = pos.reshape(-1)
        K = torch.kron(ug, ua)
        want = (K.T @ ref[p][:, p] @ K).diagonal().reshape(d.shape)
        _close(d, want, F64)


@pytest.mark.parametrize("name", ["relu_mlp", "sigmoid_mlp", "multilabel", "regression"])
def test_kfac_exact_on_one_sample(name):
    """With one sample and 2-D inputs, ``sum_k (a a^T) (x) (g_k g_k^T) = (a a^T) (x) G``."""
    case = make_case(name, N=1)
    ref, _ = _oracle_dense(case)
    for rep in ("kfac", "ekfac"):
        F = _fisher64(case, rep, reduction="sum")
        _close(F.to_dense(), ref * _blocks_mask(F), 1e-9)


# -- operations ---------------------------------------------------------------------------------- #
REPS = ["dense", "block_diag", "low_rank", "kfac", "ekfac", "quasi_diag"]


@pytest.mark.parametrize("rep", REPS)
def test_operations_match_dense(rep, tmp_path):
    case = make_case("cnn", N=6).to(torch.float64)
    F = fimfast.fisher(case.model, [case.batch], "exact", representation=rep)
    M = F.to_dense()
    P = F.numel()
    g = torch.Generator().manual_seed(0)
    v = torch.randn(P, generator=g, dtype=torch.float64)
    _close(F.mv(v), M @ v, F64)
    vd = F.unflat(v)
    out = F.mv(vd)
    assert isinstance(out, dict) and list(out) == F.names
    _close(torch.cat([out[k].reshape(-1) for k in F.names]), M @ v, F64)
    _close(F.vTMv(v), v @ M @ v, F64)
    _close(F.vTMv(vd), v @ M @ v, F64)
    A = M + 1e-2 * torch.eye(P, dtype=torch.float64)
    _close(F.solve(v, damping=1e-2), torch.linalg.solve(A, v), 1e-8)
    _close(F.inverse(damping=1e-2).to_dense(), torch.linalg.inv(A), 1e-8)
    assert abs(F.trace() - float(M.trace())) <= F64 * abs(float(M.trace()))
    assert abs(F.frobenius_norm() - float(torch.linalg.matrix_norm(M))) <= 1e-9 * F.trace()
    d = F.diag()
    assert isinstance(d, fimfast.DiagFIM) and list(d) == F.names
    _close(d.to_vector(), M.diagonal(), F64)
    path = tmp_path / f"{rep}.safetensors"
    F.save(path)
    G = StructuredFIM.load(path)
    assert type(G) is type(F) and G.names == F.names and G.meta["fim_type"] == "exact"
    _close(G.to_dense(), M, 0.0)


def test_vector_order_is_named_parameters():
    model = _mlp()
    x = torch.randn(8, 5)
    F = fimfast.fisher(model, [(x, torch.zeros(8, dtype=torch.long))], representation="dense")
    names = [n for n, p in model.named_parameters()]
    assert F.names == names
    assert F.shapes == [tuple(p.shape) for p in model.parameters()]
    # the values follow that order: the dense diagonal is the diagonal estimator's vector, read
    # parameter by parameter in named_parameters() order, each flattened row-major
    D = fimfast.DiagFisher(model, "exact", reduction="mean")
    D.step((x, torch.zeros(8, dtype=torch.long)))
    want = torch.cat([D.result()[n].reshape(-1) for n in names])
    _close(F.to_dense().diagonal(), want, F32_REL)
    for n, sl in ((n, F.slice_of(n)) for n in names):
        _close(F.to_dense().diagonal()[sl], D.result()[n].reshape(-1), F32_REL)


def test_frozen_parameters_left_out():
    """Freezing the first layer leaves it out and leaves the rest unchanged: the matrix is the
    trainable block of the full model's one (dense: exactly that block; KFAC: the same factors)."""
    torch.manual_seed(0)
    model = _mlp().double()
    x = torch.randn(8, 5, dtype=torch.float64)
    full = {rep: fimfast.fisher(model, [x], representation=rep, reduction="sum")
            for rep in ("dense", "kfac")}
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    skip = model[0].weight.numel() + model[0].bias.numel()
    for rep in ("dense", "kfac"):
        F = fimfast.fisher(model, [x], representation=rep, reduction="sum")
        assert F.names == ["2.weight", "2.bias", "4.weight", "4.bias"]
        assert F.numel() == sum(p.numel() for p in model.parameters() if p.requires_grad)
        _close(F.to_dense(), full[rep].to_dense()[skip:, skip:], 1e-12)
        if rep == "dense":  # and the float64 oracle of the trainable parameters
            case = Case("frozen", model, x, lambda m, b: m(b), torch.ones(8, dtype=torch.bool),
                        None, "categorical", 4)
            _close(F.to_dense(), _oracle_dense(case)[0], F64)



# -- NNGeometry conversions ---------------------------------------------------------------------- #
@pytest.mark.parametrize("model_name", ["mlp_nobias", "cnn"])
@pytest.mark.parametrize("rep", list(NNG))
def test_nngeometry_round_trip(model_name, rep):
    from nngeometry.object.vector import PVector

    model, dl = _setup(model_name)
    F = fimfast.fisher(model, dl, "exact", representation=rep)
    ng = F.to_nngeometry(model)
    assert type(ng) is NNG[rep]
    back = StructuredFIM.from_nngeometry(ng, model)
    assert type(back) is type(F) and back.names == F.names
    _close(back.to_dense(), F.to_dense(), 0.0)
    # NNGeometry's own products on the converted object (its PMatEKFAC.to_torch needs a generator)
    v = torch.randn(F.numel())
    lc = ng.generator.layer_collection
    from fimfast.structured.nngeometry import _nngeometry_entries, _perm

    p = _perm(F, [n for n, _ in _nngeometry_entries(lc)])
    out = ng.mv(PVector(lc, vector_repr=v[p])).to_torch()
    _close(out, F.mv(v)[p], 1e-5)
    ref = FIM(model, dl, NNG[rep], variant="classif_logits")
    if rep == "ekfac":
        ref.update_diag(dl)
    _close(StructuredFIM.from_nngeometry(ref, model).to_dense(), F.to_dense(), F32_REL)


def test_eigh_falls_back_on_a_degenerate_factor(monkeypatch):
    """A float32 decomposition that raises or returns NaN is redone in float64."""
    from fimfast.structured import factors

    real = torch.linalg.eigh
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g)
    A = x.T @ x
    for bad in ("raise", "nan"):
        def fake(m, _bad=bad):
            if m.dtype == torch.float32:
                if _bad == "raise":
                    raise torch.linalg.LinAlgError("failed to converge")
                lam, U = real(m)
                return lam * float("nan"), U
            return real(m)

        monkeypatch.setattr(torch.linalg, "eigh", fake)
        lam, U = factors.eigh(A)
        monkeypatch.setattr(torch.linalg, "eigh", real)
        assert lam.dtype == torch.float32 and torch.isfinite(lam).all()
        torch.testing.assert_close((U * lam) @ U.T, A, atol=1e-4, rtol=1e-4)
