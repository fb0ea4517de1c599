"""The random structured Fisher matrices against the float64 oracle of
tests/adversarial_structured.py, with the draws the accumulator made (the counter-based generator
at the seed, the offset advancing per batch over the factor pass and EKFAC's refit): KFAC's
``A`` and ``G``, EKFAC's refitted ``D`` (in the accumulator's eigenbasis, checked to be one of
the oracle's factors), and the ``dense`` / ``low_rank`` matrices, for MONTE_CARLO and the
HUTCHINSON family, on a Linear MLP, token-level logits with ignored labels (an embedding), a
convolution net and a tied embedding and head, to 1e-10 relative."""

from __future__ import annotations

import adversarial_structured as ast
import pytest
import test_adversarial_2026_12 as A
import torch
from torch import nn

import fimfast

pytestmark = pytest.mark.filterwarnings("ignore")

DT = torch.float64
RANDOM = ["monte_carlo", "hutchinson", "hutchinson_sqrt", "hutchinson_dg", "hutchinson_rankk",
          "hutchinson_rank1"]


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 2, stride=2)
        self.h = nn.Linear(16, 5)
        self.to(DT)

    def forward(self, x):
        return self.h(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


class _TiedLm(A._Lm):
    """The output head's weight is the embedding table."""

    def __init__(self):
        super().__init__()
        self.h = nn.Linear(5, 7).to(DT)
        self.h.weight = self.e.weight


def _images(k=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 5, (3,), generator=g))
            for _ in range(k)]


def _tied_tokens():
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(2):
        x, y = torch.randint(0, 7, (3, 4), generator=g), torch.randint(0, 7, (3, 4), generator=g)
        y[0, i:] = -100
        out.append((x, y))
    return out


MODELS = {
    "mlp": (A._mlp, lambda: A._batches(3)),
    "tokens, ignored labels": (A._Lm, A._tokens),
    "convolutions": (_Conv, _images),
}


def _rel(a, b) -> float:
    return float((a.double() - b).norm() / b.norm())


def _cases():
    out = []
    for m in MODELS:
        types = RANDOM if m == "mlp" else ["monte_carlo", "hutchinson", "hutchinson_rank1"]
        out += [(m, t, red) for t in types for red in ("sum", "mean")]
    return out


@pytest.mark.parametrize("name,fim_type,reduction", _cases())
def test_kfac_and_ekfac_with_the_same_draws(name, fim_type, reduction):
    make, batches = MODELS[name]
    model, B = make(), batches()
    kw = {"seed": 5, "num_probes": 2}
    Fk = fimfast.fisher(model, B, fim_type, "kfac", reduction, **kw)
    Fe = fimfast.fisher(model, B, fim_type, "ekfac", reduction, **kw)
    refit = {info["weight"]: (Fe.UA[i], Fe.UG[i]) for i, info in enumerate(Fe.layers)}
    ref, D = ast.kfac(model, B, fim_type, 5, 2, reduction, refit=refit)
    assert sorted(ref) == sorted(info["weight"] for info in Fk.layers)
    for i, info in enumerate(Fk.layers):
        a, g = ref[info["weight"]]
        assert float(g.abs().max()) > 0 and float(D[info["weight"]].abs().max()) > 0
        assert _rel(Fk.A[i], a) < 1e-10, info["weight"]
        assert _rel(Fk.G[i], g) < 1e-10, info["weight"]
        # the refit's basis: eigenvectors of the oracle's factors (the choice within a repeated
        # eigenvalue is free), orthonormal
        for U, M in ((Fe.UA[i], a), (Fe.UG[i], g)):
            if U is None:  # an embedding's input basis: the identity (A is diagonal)
                continue
            U = U.double()
            lam = (U.T @ M @ U).diagonal()
            assert float((M @ U - U * lam).norm()) < 1e-10 * float(M.norm())
            assert float((U.T @ U - torch.eye(U.shape[1], dtype=DT)).abs().max()) < 1e-10
        assert _rel(Fe.D[i], D[info["weight"]]) < 1e-10, info["weight"]


DENSE = {**MODELS, "tied embedding and head": (_TiedLm, _tied_tokens)}


@pytest.mark.parametrize("fim_type", ["monte_carlo", "hutchinson", "hutchinson_sqrt",
                                      "hutchinson_rankk"])
@pytest.mark.parametrize("name", list(DENSE))
def test_dense_and_low_rank_with_the_same_draws(name, fim_type):
    make, batches = DENSE[name]
    model, B = make(), batches()
    for reduction in ("sum", "mean"):
        ref = ast.dense(model, B, fim_type, 5, 2, reduction)
        assert float(ref.diagonal().min()) >= 0 and float(ref.abs().max()) > 0
        for rep in ("dense", "low_rank"):
            got = fimfast.fisher(model, B, fim_type, rep, reduction, seed=5,
                                 num_probes=2).to_dense()
            assert _rel(got, ref) < 1e-10, (rep, reduction)


def test_kfac_refuses_the_tied_head():
    with pytest.raises(ValueError, match="h"):
        fimfast.fisher(_TiedLm(), _tied_tokens(), "monte_carlo", "kfac", seed=5)


def test_diag_representation_is_the_estimator_of_the_same_seed():
    """``representation="diag"`` is ``DiagFisher``'s estimate with the same draws."""
    import adversarial_bounds as ab

    for t in ("hutchinson_sqrt", "hutchinson_rankk"):
        model, B = A._Lm(), A._tokens()
        got = fimfast.fisher(model, B, t, "diag", "sum", seed=5, num_probes=2, class_dim=-1)
        est, ref = ab.run(model, B, t, seed=5, num_probes=2, class_dim=-1)
        for n, r in ref.items():
            assert _rel(got[n], r) < 1e-10, n
