"""Random structured estimates are unbiased for their EXACT counterparts.

For MONTE_CARLO, HUTCHINSON and HUTCHINSON_SQRT, the mean over many seeds of the KFAC output
factor ``G``, of EKFAC's refitted diagonal (in a fixed eigenbasis) and of the dense matrix must lie
within a few standard errors (estimated from the same draws; ``STAT_SIGMAS`` or the Bonferroni bound
for the number of entries at family-wise level 1e-3, whichever is larger) of the EXACT value, entry
by entry. The input factor ``A`` does not depend on the draws and must equal EXACT's. Two models:
an MLP (one row per sample) and a token-level model whose positions mix (a causal running mean),
with ignored tokens, so that rows of one sample share layer outputs.
"""

from __future__ import annotations

import pytest
import torch
from cases import make_case
from tolerances import STAT_SIGMAS
from torch import nn

import fimfast
from fimfast.structured import capture, engine, refit_ekfac
from fimfast.types import FIMType, Options

DRAWS = 300


class MixLM(nn.Module):
    """Token-level logits; position ``t`` sees the running mean of positions ``<= t``."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 5)
        self.l2 = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        t = torch.arange(1, x.shape[1] + 1, dtype=h.dtype).reshape(1, -1, 1)
        return self.l2(h.cumsum(1) / t)


def _problem(name: str):
    if name == "mlp":
        case = make_case("relu_mlp", N=6).to(torch.float64)
        return case.model, [case.batch]
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    model = MixLM().double()
    x = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 4), generator=g)
    y[0, 1] = -100
    return model, [(x, y)]


def _zcheck(draws: list[torch.Tensor], exact: torch.Tensor, what: str) -> None:
    X = torch.stack(draws).double()
    mean, se = X.mean(0), X.std(0) / len(draws) ** 0.5
    z = (mean - exact).abs() / (se + 1e-12 * exact.abs().max())
    # max over n entries: a Bonferroni bound at family-wise level 1e-3, never below STAT_SIGMAS
    n = exact.numel()
    crit = max(STAT_SIGMAS, float(torch.special.ndtri(torch.tensor(1 - 1e-3 / (2 * n)))))
    assert float(z.max()) <= crit, f"{what}: max |z| = {float(z.max()):.2f} > {crit:.2f}"
    # the draws do vary (a test that cannot fail would pass here too)
    assert float(X.std(0).max()) > 0


RANDOM = ["monte_carlo", "hutchinson", "hutchinson_sqrt"]


@pytest.mark.parametrize("problem", ["mlp", "mixlm"])
@pytest.mark.parametrize("fim_type", RANDOM)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_factors_unbiased(problem, fim_type, approx):
    model, data = _problem(problem)
    ex = fimfast.fisher(model, data, "exact", representation="kfac", reduction="sum",
                        kfac_approx=approx)
    Gs = [[] for _ in ex.G]
    for s in range(DRAWS):
        F = fimfast.fisher(model, data, fim_type, representation="kfac", reduction="sum",
                           kfac_approx=approx, seed=s)
        for i, (a, g) in enumerate(zip(F.A, F.G)):
            torch.testing.assert_close(a, ex.A[i], rtol=0, atol=1e-13)
            Gs[i].append(g)
    for i, g in enumerate(ex.G):
        _zcheck(Gs[i], g, f"G of layer {i}")


@pytest.mark.parametrize("problem", ["mlp", "mixlm"])
@pytest.mark.parametrize("fim_type", RANDOM)
def test_ekfac_refit_unbiased(problem, fim_type):
    model, data = _problem(problem)
    ex = fimfast.fisher(model, data, "exact", representation="ekfac", reduction="sum")
    kf = fimfast.fisher(model, data, "exact", representation="kfac", reduction="sum")
    names = kf.names
    params = [dict(model.named_parameters())[n] for n in names]
    layers = capture.layers_of(model, names, params, "ekfac")
    Ds = [[] for _ in ex.D]
    for s in range(DRAWS):
        st = engine.Stream(FIMType.parse(fim_type), Options(seed=s), s)
        E = refit_ekfac(kf, model, data, st, layers, "sum")
        for i, d in enumerate(E.D):
            Ds[i].append(d)
    for i, d in enumerate(ex.D):
        _zcheck(Ds[i], d, f"D of layer {i}")


@pytest.mark.parametrize("problem", ["mlp", "mixlm"])
@pytest.mark.parametrize("fim_type", RANDOM)
def test_dense_unbiased(problem, fim_type):
    model, data = _problem(problem)
    ex = fimfast.fisher(model, data, "exact", representation="dense", reduction="sum")
    draws = [fimfast.fisher(model, data, fim_type, representation="dense", reduction="sum",
                            seed=s).to_dense() for s in range(DRAWS)]
    _zcheck(draws, ex.to_dense(), "dense")


def test_seed_reproduces_and_probes_average():
    model, data = _problem("mixlm")
    a = fimfast.fisher(model, data, "hutchinson", representation="kfac", seed=7)
    b = fimfast.fisher(model, data, "hutchinson", representation="kfac", seed=7)
    c = fimfast.fisher(model, data, "hutchinson", representation="kfac", seed=8)
    assert torch.equal(a.to_dense(), b.to_dense())
    assert not torch.equal(a.to_dense(), c.to_dense())
    ex = fimfast.fisher(model, data, "exact", representation="kfac").to_dense()
    many = fimfast.fisher(model, data, "monte_carlo", representation="kfac", seed=1,
                          num_probes=4000).to_dense()
    # 4000 draws: the relative Frobenius error shrinks like 1/sqrt(S) (about 0.02 here)
    assert float((many - ex).norm() / ex.norm()) < 0.1


def test_check_detects_a_biased_estimator():
    """HUTCHINSON_DG estimates ``J^T diag(p) J`` (an upper bound), not F: the check must fail."""
    model, data = _problem("mlp")
    ex = fimfast.fisher(model, data, "exact", representation="kfac", reduction="sum")
    draws = [fimfast.fisher(model, data, "hutchinson_dg", representation="kfac",
                            reduction="sum", seed=s).G[-1] for s in range(DRAWS)]
    with pytest.raises(AssertionError, match="max |z|"):
        _zcheck(draws, ex.G[-1], "G")
