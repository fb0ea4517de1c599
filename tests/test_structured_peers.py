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


def test_conv_expand_and_reduce_differ():
    """The two weight-sharing approximations are different matrices on a convolution."""
    model, _, data = _problem("cnn")
    e = fimfast.fisher(model, data, "exact", representation="kfac", kfac_approx="expand")
    r = fimfast.fisher(model, data, "exact", representation="kfac", kfac_approx="reduce")
    assert float((e.to_dense() - r.to_dense()).abs().max()) > 1e-3 * e.trace()
