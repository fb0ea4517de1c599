"""The channel norms' one-column squares (fimfast/persample/norm_lane.py): the same sums bit for
bit as the rule's terms squared by the general chunk code, for BatchNorm (eval and train mode,
with and without positions), GroupNorm and InstanceNorm, float32 and float64, EMPIRICAL and
MONTE_CARLO; against the float64 oracle; the lane taken (not a vacuous comparison); and left to
the general code where it does not apply (several columns, a rule with its own terms)."""

from __future__ import annotations

import pytest
import torch
from cases import Fn, empirical_oracle
from torch import nn

import fimfast
from fimfast.persample import norm_lane
from fimfast.rules.norm import BatchNormRule


def _bn1d(train: bool = False):
    m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8),
                      nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4))
    return m.train() if train else m.eval()


def _bn2d():
    return Fn(lambda s, x: s.head(s.act(s.bn(s.conv(x))).mean((2, 3))),
              conv=nn.Conv2d(3, 5, 3, padding=1), bn=nn.BatchNorm2d(5), act=nn.ReLU(),
              head=nn.Linear(5, 4)).eval()


def _bn1d_seq():
    return Fn(lambda s, x: s.head(s.act(s.bn(s.conv(x))).mean(2)),
              conv=nn.Conv1d(3, 5, 3, padding=1), bn=nn.BatchNorm1d(5), act=nn.Tanh(),
              head=nn.Linear(5, 4)).eval()


def _gn():
    return Fn(lambda s, x: s.head(s.act(s.gn(s.conv(x))).mean((2, 3))),
              conv=nn.Conv2d(3, 6, 3, padding=1), gn=nn.GroupNorm(2, 6), act=nn.ReLU(),
              head=nn.Linear(6, 4))


def _inorm():
    return Fn(lambda s, x: s.head(s.act(s.n(s.conv(x))).mean((2, 3))),
              conv=nn.Conv2d(3, 5, 3, padding=1),
              n=nn.InstanceNorm2d(5, affine=True, track_running_stats=True), act=nn.Tanh(),
              head=nn.Linear(5, 4)).eval()


MODELS = {"bn1d": (_bn1d, (6,)), "bn1d_train": (lambda: _bn1d(True), (6,)),
          "bn2d": (_bn2d, (3, 6, 6)), "bn1d_seq": (_bn1d_seq, (3, 7)), "gn": (_gn, (3, 6, 6)),
          "instancenorm": (_inorm, (3, 6, 6))}
NAMES = list(MODELS)


def _model(name: str, dtype=torch.float32):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    m = make().to(dtype)
    with torch.no_grad():  # running statistics and affine parameters away from their init
        for mod in m.modules():
            if getattr(mod, "running_mean", None) is not None:
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)):
                mod.weight.normal_()
                mod.bias.normal_()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, *shape, generator=g, dtype=dtype),
                torch.randint(0, 4, (5,), generator=g)) for _ in range(3)]
    return m, batches


def _run(model, batches, fim_type, monkeypatch=None, off: bool = False, spy: list | None = None):
    if off:
        monkeypatch.setattr(norm_lane, "take", lambda *a: False)
    elif spy is not None:
        take = norm_lane.take
        monkeypatch.setattr(norm_lane, "take", lambda *a: spy.append(r := take(*a)) or r)
    est = fimfast.DiagFisher(model, fim_type, seed=3)
    for b in batches:
        est.step(b)
    if monkeypatch is not None:
        monkeypatch.undo()
    return est


@pytest.mark.parametrize("fim_type", ["empirical", "monte_carlo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", NAMES)
def test_same_sums_as_the_rules_terms(name, dtype, fim_type, monkeypatch):
    model, batches = _model(name, dtype)
    taken: list = []
    a = _run(model, batches, fim_type, monkeypatch, spy=taken)
    b = _run(model, batches, fim_type, monkeypatch, off=True)
    assert any(taken), "the lane never ran: the comparison would be vacuous"
    ra, rb = a.result(), b.result()
    assert list(ra) == list(rb)
    for n in ra:
        assert torch.equal(ra[n], rb[n]), n


@pytest.mark.parametrize("name", ["bn1d", "bn2d", "bn1d_seq", "gn", "instancenorm"])
def test_against_float64_oracle(name):
    model, batches = _model(name)
    est = _run(model, batches, "empirical")
    ref = empirical_oracle(model, batches)
    got = list(est.result().values())
    norms = [n for n, _ in model.named_parameters() if n.split(".")[0] in ("1", "4", "bn", "gn",
                                                                           "n")]
    assert norms
    for (n, _), g, r in zip(model.named_parameters(), got, ref):
        if n in norms:
            assert r.abs().max() > 1e-3, n  # the oracle's Fisher of the norm is not zero
        torch.testing.assert_close(g.double(), r, rtol=2e-4, atol=1e-6, msg=n)


def test_several_columns_take_the_general_code(monkeypatch):
    model, batches = _model("bn2d")
    taken: list = []
    _run(model, batches, "exact", monkeypatch, spy=taken)
    assert taken and not any(taken)


def test_a_rule_with_its_own_terms_takes_the_general_code():
    class Own(BatchNormRule):
        def terms(self, call, grads):
            return super().terms(call, grads)

    assert not norm_lane._plain(Own()) and norm_lane._plain(BatchNormRule())

