"""Bad inputs to ``fimfast.fisher`` and to the structured matrices: clear errors, naming what."""

from __future__ import annotations

import pytest
import torch
from cases import make_case
from torch import nn

import fimfast
from fimfast.structured import base


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))


def _data(n=6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 5, generator=g), torch.randint(0, 4, (n,), generator=g))]


@pytest.mark.parametrize("kw,match", [
    ({"representation": "full"}, "representation must be one of"),
    ({"fim_type": "fisher"}, "fim_type must be one of"),
    ({"reduction": "avg"}, "reduction must be one of"),
    ({"kfac_approx": "both"}, "kfac_approx must be one of"),
    ({"representation": "dense", "rank": 2}, "rank is for representation='low_rank'"),
    ({"representation": "low_rank", "rank": 0}, "rank must be an integer >= 1"),
    ({"pair_chunk": 0}, "pair_chunk must be an integer >= 1"),
    ({"num_probes": 0}, r"fim_opts\['num_probes'\]"),
    ({"bogus": 1}, "unknown key"),
    ({"lm_head": "2"}, "lm_head.*diag.* only"),
])
def test_bad_arguments(kw, match):
    kw = {"fim_type": "exact", "representation": "kfac", **kw}
    with pytest.raises(ValueError, match=match):
        fimfast.fisher(_mlp(), _data(), **kw)


@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag"])
def test_unsupported_layer_named(rep):
    model = nn.Sequential(nn.Linear(5, 6), nn.GroupNorm(2, 6), nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"module '1' \(GroupNorm\).*'1.weight', '1.bias'"):
        fimfast.fisher(model, _data(), representation=rep)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)

    def forward(self, x):
        return nn.functional.linear(x, self.lin.weight, self.lin.bias)


def test_functional_use_of_a_linear_refused():
    """A Linear whose weights are used without calling it."""
    with pytest.raises(ValueError, match="'lin'.*never called"):
        fimfast.fisher(Functional(), _data(), representation="kfac")


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) + nn.functional.linear(x, self.a.weight)


def test_weight_also_used_outside_its_module_refused():
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="weight of module 'a' reaches the logits through 2 uses"):
        fimfast.fisher(TiedHead(), [x], representation="kfac")


def _tied_kfac_factors(model, x):
    """KFAC "expand" factors of ``TiedNet`` (docs/structured.md, KFAC) in float64 from autograd,
    the two calls of ``shared`` as two positions: ``A = (1/M) sum_{n,t} a a^T`` (input with a
    1 appended), ``G = sum_{n,c} sum_t g g^T`` with ``g`` the gradient at the call's output of
    ``u_c^T z_n``, ``u_c = sqrt(p_c) (e_c - p)`` (EXACT)."""
    one = torch.ones(x.shape[0], 1, dtype=x.dtype)
    s1 = model.shared(x).detach().requires_grad_(True)
    h1 = torch.tanh(s1)
    s2 = model.shared(h1)
    s2.retain_grad()
    h2 = torch.tanh(s2)
    z = model.head(h2)
    h2.retain_grad()
    A_sh = [torch.cat([x, one], 1), torch.cat([h1.detach(), one], 1)]
    A_hd = torch.cat([h2.detach(), one], 1)
    p = torch.softmax(z.detach(), -1)
    C = z.shape[1]
    G_sh = torch.zeros(s1.shape[1], s1.shape[1], dtype=x.dtype)
    G_hd = torch.zeros(C, C, dtype=x.dtype)
    eye = torch.eye(C, dtype=x.dtype)
    for n in range(x.shape[0]):
        for c in range(C):
            u = p[n, c].sqrt() * (eye[c] - p[n])
            s1.grad = s2.grad = None
            (z[n] @ u).backward(retain_graph=True)
            for g in (s1.grad[n], s2.grad[n]):
                G_sh += torch.outer(g, g)
            G_hd += torch.outer(u, u)  # the head's output is the logits
    A_shared = sum(a.T @ a for a in A_sh) / (2 * x.shape[0])
    return [A_shared, A_hd.T @ A_hd / x.shape[0]], [G_sh, G_hd]


def test_shared_module_is_weight_sharing():
    """A module called twice is weight sharing (positions of both calls), not an error: its
    Kronecker factors are the float64 autograd ones with two positions per sample."""
    case = make_case("tied").to(torch.float64)
    F = fimfast.fisher(case.model, [case.batch], "exact", representation="kfac",
                       reduction="sum")
    assert F.numel() == sum(p.numel() for p in case.model.parameters())
    assert [m["name"] for m in F.layers] == ["shared", "head"]
    A, G = _tied_kfac_factors(case.model, case.batch[0])
    for i in range(2):
        torch.testing.assert_close(F.A[i], A[i], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(F.G[i], G[i], rtol=1e-10, atol=1e-12)


def test_grouped_conv_refused():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 9, 3))
    with pytest.raises(ValueError, match="module '0'.*groups=2"):
        fimfast.fisher(model, [torch.randn(3, 2, 5, 5)], representation="kfac")


def test_half_frozen_layer_refused():
    model = _mlp()
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"module '0' \(Linear\) has a frozen weight or bias"):
        fimfast.fisher(model, _data(), representation="kfac")


def test_dense_size_limit(monkeypatch):
    monkeypatch.setattr(base, "DENSE_LIMIT", 50)
    P = sum(p.numel() for p in _mlp().parameters())
    with pytest.raises(ValueError, match=rf"dense \({P} x {P}\).*P <= 50"):
        fimfast.fisher(_mlp(), _data(), representation="dense")
    F = fimfast.fisher(_mlp(), _data(), representation="kfac")
    with pytest.raises(ValueError, match="KFACFIM.to_dense"):
        F.to_dense()


def test_low_rank_row_limit():
    with pytest.raises(ValueError, match="max_rows=10"):
        fimfast.fisher(_mlp(), _data(), representation="low_rank", max_rows=10)


def test_ekfac_needs_a_reiterable_loader():
    with pytest.raises(ValueError, match="re-iterable"):
        fimfast.fisher(_mlp(), iter(_data()), representation="ekfac")


def test_empirical_needs_labels():
    with pytest.raises(ValueError, match="labels are required"):
        fimfast.fisher(_mlp(), [torch.randn(4, 5)], "empirical", representation="dense")


def test_empty_loader():
    with pytest.raises(ValueError, match="loader yielded no batch"):
        fimfast.fisher(_mlp(), [], representation="kfac")


def test_batch_not_first():
    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(5, 3)

        def forward(self, x):  # (N, T, 5) -> the Linear sees (T, N, 5) (sequence first)
            return self.l(x.transpose(0, 1)).mean(0)

    with pytest.raises(ValueError, match="batch \\(N=6\\) must be its first dimension"):
        fimfast.fisher(T(), [torch.randn(6, 4, 5)], representation="kfac")


@pytest.mark.parametrize("rep", ["dense", "kfac", "ekfac", "quasi_diag", "low_rank",
                                 "block_diag"])
def test_bad_vectors_and_damping(rep):
    F = fimfast.fisher(_mlp(), _data(), representation=rep)
    P = F.numel()
    with pytest.raises(ValueError, match=f"flat tensor of {P} entries"):
        F.mv(torch.zeros(P + 1))
    with pytest.raises(ValueError, match="missing parameters"):
        F.mv({"0.weight": torch.zeros(7, 5)})
    v = F.unflat(torch.zeros(P))
    v["0.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"v\['0.bias'\] must have shape \(7,\)"):
        F.vTMv(v)
    with pytest.raises(TypeError, match="flat tensor or a mapping"):
        F.mv([1.0])
    with pytest.raises(ValueError, match="damping must be a number >= 0"):
        F.solve(torch.zeros(P), damping=-1.0)


def test_load_rejects_other_files(tmp_path):
    fimfast.diag_fisher(_mlp(), _data(), "exact").save(tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="not a structured Fisher file"):
        fimfast.structured.load(tmp_path / "d.safetensors")
