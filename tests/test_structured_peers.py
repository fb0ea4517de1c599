"""KFAC against curvlinops' ``KFACLinearOperator`` where the definitions coincide.

curvlinops approximates the GGN of a loss; with ``CrossEntropyLoss`` and ``fisher_type="type-2"``
it is fimfast's EXACT Fisher (``reduction`` sum or mean over the loss terms), and with
``separate_weight_and_bias=False`` weight and bias share one factor (the appended 1) as here.
They coincide for KFAC-expand and KFAC-reduce when each sample has one row of logits, and for
KFAC-expand on token-level logits when a position's logits depend on that position only. When
rows of one sample share layer outputs, curvlinops back-propagates each output column of all the
sample's rows together (its type-2 columns include cross-row products, which ``F = sum_r J_r^T
I J_r`` does not have); fimfast keeps rows apart, so its MONTE_CARLO/HUTCHINSON factors are
unbiased for its EXACT ones (tests/test_structured_random.py). That case is not compared.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fimfast

curvlinops = pytest.importorskip("curvlinops")
from curvlinops import KFACLinearOperator  # noqa: E402


class SeqHead(nn.Module):
    """(N, T, 4) -> (N, T, 3) position-wise, or (N, 3, T) for curvlinops (classes in dim 1)."""

    def __init__(self, classes_first: bool = False):
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.l2 = nn.Linear(6, 3)
        self.classes_first = classes_first

    def forward(self, x):
        z = self.l2(torch.tanh(self.l1(x)))
        return z.transpose(1, 2) if self.classes_first else z


def _problem(name: str):
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
        x, y = torch.randn(12, 5, generator=g), torch.randint(0, 4, (12,), generator=g)
        peer = model
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2),
                              nn.Flatten(), nn.Linear(2 * 16, 4))
        x, y = torch.randn(6, 2, 5, 5, generator=g), torch.randint(0, 4, (6,), generator=g)
        peer = model
    else:
        model = SeqHead()
        x, y = torch.randn(6, 5, 4, generator=g), torch.randint(0, 3, (6, 5), generator=g)
        peer = SeqHead(classes_first=True)
        peer.load_state_dict(model.state_dict())
        peer.double()
    model.double()
    x = x.double()
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    return model, peer, data


CASES = [("mlp", "expand"), ("mlp", "reduce"), ("cnn", "expand"), ("cnn", "reduce"),
         ("seq", "expand")]


@pytest.mark.parametrize("name,approx", CASES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_kfac_matches_curvlinops(name, approx, reduction):
    model, peer, data = _problem(name)
    K = KFACLinearOperator(peer, nn.CrossEntropyLoss(reduction=reduction),
                           list(peer.parameters()), data, fisher_type="type-2",
                           kfac_approx=approx, separate_weight_and_bias=False,
                           check_deterministic=False)
    P = sum(p.numel() for p in model.parameters())
    ref = K @ torch.eye(P, dtype=torch.float64)
    F = fimfast.fisher(model, data, "exact", representation="kfac", reduction=reduction,
                       kfac_approx=approx)
    torch.testing.assert_close(F.to_dense(), ref, rtol=1e-10, atol=1e-12)


def _conv_factors(model, x):
    """Float64 KFAC factors of the "cnn" problem's two convolutions from ``F.unfold`` patches
    and autograd output gradients (docs/structured.md, KFAC): per approximation, ``A`` of the
    patches with an appended 1 and ``G = sum_{n,c}`` of the EXACT cotangent
    ``u_c = sqrt(p_c) (e_c - p_n)``'s output gradients (per position, or summed over them)."""
    c1, c2, lin = model[0], model[2], model[4]
    s1 = c1(x).detach().requires_grad_(True)
    h = torch.relu(s1)
    s2 = c2(h)
    s2.retain_grad()
    z = lin(s2.flatten(1))
    N = x.shape[0]
    patches = [nn.functional.unfold(x, 3, padding=1), nn.functional.unfold(h.detach(), 2)]
    a = [torch.cat([q.transpose(1, 2), torch.ones(N, q.shape[2], 1, dtype=x.dtype)], 2)
         for q in patches]  # (N, T, I')
    A = {"expand": [(t.reshape(-1, t.shape[2]).T @ t.reshape(-1, t.shape[2])) / (N * t.shape[1])
                    for t in a],
         "reduce": [t.mean(1).T @ t.mean(1) / N for t in a]}
    G = {k: [torch.zeros(3, 3, dtype=x.dtype), torch.zeros(2, 2, dtype=x.dtype)]
         for k in ("expand", "reduce")}
    p = torch.softmax(z.detach(), -1)
    eye = torch.eye(4, dtype=x.dtype)
    for n in range(N):
        for c in range(4):
            s1.grad = s2.grad = None
            (z[n] @ (p[n, c].sqrt() * (eye[c] - p[n]))).backward(retain_graph=True)
            for i, s in enumerate((s1, s2)):
                g = s.grad[n].flatten(1).T  # (T, O)
                G["expand"][i] += g.T @ g
                G["reduce"][i] += torch.outer(g.sum(0), g.sum(0))
    return A, G


def test_conv_expand_and_reduce_factors():
    """The two weight-sharing approximations on a convolution, each against its definition,
    and different matrices."""
    model, _, data = _problem("cnn")
    x = torch.cat([b[0] for b in data])
    A, G = _conv_factors(model, x)
    F = {k: fimfast.fisher(model, data, "exact", representation="kfac", kfac_approx=k,
                           reduction="sum") for k in ("expand", "reduce")}
    for k, f in F.items():
        for i in range(2):
            torch.testing.assert_close(f.A[i], A[k][i], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(f.G[i], G[k][i], rtol=1e-10, atol=1e-12)
    e, r = F["expand"], F["reduce"]
    assert float((e.to_dense() - r.to_dense()).abs().max()) > 1e-3 * e.trace()
