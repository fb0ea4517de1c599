"""DiagFIM: every operation against the dense diagonal matrix, files, and NNGeometry."""

from __future__ import annotations

import pytest
import torch

import fimfast
from fimfast import DiagFIM

SHAPES = {"0.weight": (3, 4), "0.bias": (3,), "2.weight": (2, 3), "2.bias": (2,), "scale": ()}


def _fim(seed: int = 0, dtype=torch.float64) -> DiagFIM:
    g = torch.Generator().manual_seed(seed)
    return DiagFIM(
        {k: torch.rand(s, generator=g, dtype=dtype) + 0.1 for k, s in SHAPES.items()},
        {"fim_type": "exact"},
    )


def _vec(F: DiagFIM, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(F.numel(), generator=g, dtype=torch.float64)


def _dict(F: DiagFIM, v: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, t in F.items():
        out[k] = v[i : i + t.numel()].reshape(t.shape)
        i += t.numel()
    return out


def test_vector_and_dense_views():
    F = _fim()
    vec = torch.cat([F[k].reshape(-1) for k in SHAPES])
    assert torch.equal(F.to_vector(), vec) and torch.equal(F.get_diag(), vec)
    assert torch.equal(F.to_dense(), torch.diag(vec))
    assert F.numel() == vec.numel() == 24
    assert list(F) == list(SHAPES) and F.shapes == SHAPES
    G = F.from_vector(vec * 2)
    assert list(G) == list(F) and all(torch.equal(G[k], 2 * F[k]) for k in F)
    with pytest.raises(ValueError, match="flat tensor of 24"):
        F.from_vector(vec[:-1])


@pytest.mark.parametrize("form", ["flat", "dict"])
def test_linear_algebra_against_dense(form):
    F = _fim()
    D = F.to_dense()
    v = _vec(F)
    arg = v if form == "flat" else _dict(F, v)

    def flat(x):
        return x if isinstance(x, torch.Tensor) else torch.cat([x[k].reshape(-1) for k in F])

    mv = F.mv(arg)
    assert isinstance(mv, torch.Tensor) == (form == "flat")
    assert torch.allclose(flat(mv), D @ v, rtol=1e-14)
    assert torch.allclose(F.vTMv(arg), v @ D @ v, rtol=1e-14)
    lam = 0.3
    A = D + lam * torch.eye(D.shape[0], dtype=D.dtype)
    sol = F.solve(arg, damping=lam)
    assert torch.allclose(flat(sol), torch.linalg.solve(A, v), rtol=1e-12)
    # solve then mv round-trips: (F + lam I) (F + lam I)^-1 v == v
    back = flat(F.mv(sol)) + lam * flat(sol)
    assert torch.allclose(back, v, rtol=1e-12, atol=1e-14)
    assert torch.allclose(F.inverse(lam).to_dense(), torch.linalg.inv(A), rtol=1e-12)
    assert torch.allclose(flat(F.inverse(lam).mv(arg)), flat(sol), rtol=1e-14)
    assert F.trace() == pytest.approx(float(torch.trace(D)), rel=1e-14)
    assert F.frobenius_norm() == pytest.approx(float(torch.linalg.matrix_norm(D)), rel=1e-14)
    assert F.norm() == F.frobenius_norm()


def test_solve_without_damping_inverts_exactly():
    F = _fim()
    v = _vec(F)
    assert torch.allclose(F.mv(F.solve(v, damping=0)), v, rtol=1e-13)


def test_damping_zero_refuses_entries_zero_up_to_rounding():
    """``damping=0`` refuses an entry within ``P * eps * max|F|`` of zero, as the structured
    representations' ``check_invertible`` does (before: only entries exactly ``0`` were refused,
    and a structural zero computed as rounding noise was inverted: 1 / 1e-36)."""
    F = DiagFIM({"a": torch.tensor([2.0, 1e-30], dtype=torch.float64),
                 "b": torch.tensor([1.0, 3.0], dtype=torch.float64)})
    v = torch.ones(4, dtype=torch.float64)
    for call in (lambda: F.solve(v, damping=0), lambda: F.inverse(0.0),
                 lambda: F.solve(v, damping=torch.tensor(0.0))):
        with pytest.raises(ValueError, match=r"damping=0 leaves F singular: 'a' has an entry"):
            call()
    assert torch.equal(F.solve(v, damping=1e-3), v / (F.to_vector() + 1e-3))  # damping > 0
    # just above the tolerance (4 * eps * 3 = 2.7e-15): solved exactly
    G = DiagFIM({"a": torch.tensor([3.0, 1e-14], dtype=torch.float64)})
    assert torch.equal(G.solve(torch.ones(2, dtype=torch.float64), damping=0),
                       1 / G.to_vector())
    # float32: eps of float32
    H = DiagFIM({"a": torch.tensor([1.0, 1e-7])})
    with pytest.raises(ValueError, match="'a'"):
        H.inverse(0)
    assert torch.isfinite(DiagFIM({"a": torch.tensor([1.0, 1e-5])}).inverse(0)["a"]).all()
    with pytest.raises(ValueError, match="non-finite"):
        DiagFIM({"a": torch.tensor([1.0, float("nan")])}).solve(torch.ones(2), damping=0)


def test_damping_zero_refuses_the_key_bias_of_an_attention():
    """The key bias of an attention leaves the softmax unchanged: its exact Fisher is zero, and
    computed as rounding noise (~1e-36 here); before, ``solve(v, damping=0)`` returned 1e35."""
    from test_adversarial_round2 import _singular_model, _token_batches

    model = _singular_model()
    model.emb.weight.requires_grad_(False)  # the only exact zeros: the rows never looked up
    F = fimfast.diag_fisher(model, _token_batches(), "exact")
    assert float(F["att.in_proj_bias"].abs().min()) < 1e-30
    assert all(float(v.abs().min()) > 1e-10 for k, v in F.items() if k != "att.in_proj_bias")
    v = torch.ones(F.numel(), dtype=torch.float64)
    with pytest.raises(ValueError, match="damping=0 leaves F singular: 'att.in_proj_bias'"):
        F.solve(v, damping=0)
    assert torch.isfinite(F.solve(v, damping=1e-6)).all()


def test_arithmetic_against_dense():
    F, G = _fim(0), _fim(1)
    D, E = F.to_dense(), G.to_dense()
    assert torch.allclose((F + G).to_dense(), D + E)
    assert torch.allclose((F - G).to_dense(), D - E)
    assert torch.allclose((2.5 * F).to_dense(), 2.5 * D)
    assert torch.allclose((F * torch.tensor(2.0)).to_dense(), 2 * D)
    assert torch.allclose((F / 4).to_dense(), D / 4)
    assert torch.allclose((-F).to_dense(), -D)
    assert torch.allclose(F.mm(G).to_dense(), D @ E)
    assert torch.allclose(sum([F, G, F]).to_dense(), 2 * D + E)
    # names are matched by name, whatever their order
    H = DiagFIM({k: G[k] for k in reversed(list(G))})
    assert torch.allclose((F + H).to_dense(), D + E)
    assert (F + G).meta == F.meta
    assert F.allclose(F.clone()) and not F.allclose(G)


def test_per_layer_by_param_and_module():
    F = _fim()
    per = F.per_layer()
    assert list(per) == list(SHAPES)
    w = F["0.weight"].reshape(-1)
    assert per["0.weight"]["numel"] == 12
    assert per["0.weight"]["trace"] == pytest.approx(float(w.sum()))
    assert per["0.weight"]["median"] == pytest.approx(float(w.median()))
    mod = F.per_layer(by="module")
    assert list(mod) == ["0", "2", ""]
    both = torch.cat([F["0.weight"].reshape(-1), F["0.bias"]])
    assert mod["0"]["numel"] == 15
    assert mod["0"]["mean"] == pytest.approx(float(both.mean()))
    assert mod["0"]["max"] == pytest.approx(float(both.max()))
    with pytest.raises(ValueError, match="by must be"):
        F.per_layer(by="tensor")


def test_errors_name_the_argument():
    F = _fim()
    v = _vec(F)
    with pytest.raises(ValueError, match="v must be a flat tensor of 24"):
        F.mv(v[:3])
    with pytest.raises(ValueError, match="missing parameters"):
        F.mv({"0.weight": torch.zeros(3, 4)})
    bad = _dict(F, v)
    bad["0.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"v\['0.bias'\] must have shape \(3,\)"):
        F.vTMv(bad)
    with pytest.raises(TypeError, match="flat tensor or a mapping"):
        F.mv([1.0, 2.0])
    with pytest.raises(ValueError, match="damping must be a number >= 0"):
        F.solve(v, damping=-1.0)
    Z = DiagFIM({"w": torch.tensor([0.0, 1.0])})
    with pytest.raises(ValueError, match="singular"):
        Z.solve(torch.ones(2), damping=0)
    with pytest.raises(ValueError, match="singular"):
        Z.inverse(0.0)
    with pytest.raises(ValueError, match="same parameter names"):
        F + Z
    with pytest.raises(ValueError, match="shape"):
        Z + DiagFIM({"w": torch.zeros(3)})
    with pytest.raises(TypeError):
        F * F
    with pytest.raises(ZeroDivisionError):
        F / 0
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        DiagFIM({"w": [1.0]})


def test_save_load_round_trip_keeps_order_and_meta(tmp_path):
    F = _fim(dtype=torch.float32)
    # entries that are views of one flat vector, in an order that sorting would change
    G = DiagFIM({k: F[k] for k in ["scale", "2.bias", "0.weight", "0.bias", "2.weight"]})
    G = G.from_vector(G.to_vector().clone(), {"fim_type": "hutchinson", "count": 7})
    path = tmp_path / "fim.safetensors"
    G.save(str(path))
    H = DiagFIM.load(str(path))
    assert list(H) == list(G)
    assert H.meta == {"fim_type": "hutchinson", "count": 7}
    assert all(torch.equal(H[k], G[k]) and H[k].dtype == torch.float32 for k in G)


def test_estimator_result_is_a_diagfim():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    F = fimfast.diag_fisher(model, [(torch.randn(6, 3),)], "exact")
    assert isinstance(F, DiagFIM) and list(F) == [n for n, _ in model.named_parameters()]
    p = {n: q.detach() for n, q in model.named_parameters()}
    flat = torch.cat([t.reshape(-1) for t in p.values()])
    assert torch.allclose(F.vTMv(p), (F.to_vector() * flat.square()).sum(), rtol=1e-5)


# --------------------------------------------------------------------------------------------- #
# NNGeometry
# --------------------------------------------------------------------------------------------- #
def _nngeometry():
    return pytest.importorskip(
        "nngeometry",
        reason="NNGeometry is not installed (pip install --no-deps nngeometry==0.4)",
    )


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5, bias=False), torch.nn.ReLU(),
        torch.nn.LayerNorm(5), torch.nn.Linear(5, 3),
    )  # fmt: skip


def test_nngeometry_round_trip():
    _nngeometry()
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object import PMatDiag, PVector

    model = _net()
    F = DiagFIM({n: torch.rand(p.shape) + 0.1 for n, p in model.named_parameters()})
    P = F.to_nngeometry(model)
    assert isinstance(P, PMatDiag)
    lc = LayerCollection.from_model(model)
    # NNGeometry's own flat order is the collection's: check a PVector of the parameters
    v = PVector.from_model(model)
    ours = torch.cat(
        [p.detach().reshape(-1) for p in lc.parameters(lc.get_layerid_module_maps(model)[0])]
    )
    assert torch.equal(v.to_torch(), ours)
    assert torch.allclose(P.vTMv(v), F.vTMv({n: p.detach() for n, p in model.named_parameters()}))
    assert float(P.trace()) == pytest.approx(F.trace(), rel=1e-6)
    assert float(P.frobenius_norm()) == pytest.approx(F.frobenius_norm(), rel=1e-6)
    back = DiagFIM.from_nngeometry(P, model)
    assert list(back) == list(F) and back.allclose(F, rtol=0, atol=0)
    # a layer collection as the target, and the collection's order without a model
    assert torch.equal(F.to_nngeometry(lc).get_diag(), P.get_diag())
    assert set(DiagFIM.from_nngeometry(P)) == set(F)


def test_nngeometry_fisher_equals_exact():
    """NNGeometry's closed-form FIM (PMatDiag) equals fimfast's EXACT, mean reduction."""
    _nngeometry()
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDiag

    model = _net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    P = FIM(model=model, loader=loader, representation=PMatDiag, variant="classif_logits")
    F = fimfast.diag_fisher(model, loader, "exact", reduction="mean")
    G = DiagFIM.from_nngeometry(P, model)
    assert G.allclose(F, rtol=1e-4, atol=1e-7)
    assert torch.allclose(F.to_nngeometry(model).get_diag(), P.get_diag(), rtol=1e-4, atol=1e-7)


def test_nngeometry_errors():
    _nngeometry()
    model = _net()
    F = DiagFIM({"0.weight": torch.ones(6, 4)})
    with pytest.raises(ValueError, match="lacks"):
        F.to_nngeometry(model)
    with pytest.raises(TypeError, match="LayerCollection"):
        F.to_nngeometry("model")
    with pytest.raises(TypeError, match="NNGeometry PMat"):
        DiagFIM.from_nngeometry(F)
    G = DiagFIM({n: torch.ones(p.shape) for n, p in model.named_parameters()})
    G._d["0.weight"] = torch.ones(24)
    with pytest.raises(ValueError, match="shape"):
        G.to_nngeometry(model)
