"""Adversarial checks, sixth round: ``fimfast.sensitivity.measure_kl``, the measured side of the
predicted change ``0.5 delta^T F delta``.

* A model in train mode with dropout: the reference and the perturbed forwards drew different
  masks, so a zero perturbation measured a KL of 0.036 instead of 0; both forwards of a batch now
  run with the same random state (the KL of the sampled sub-network, as the Fisher of a train-mode
  step is that sub-network's: docs/exactness.md).
* BatchNorm in train mode: its running statistics moved with every forward of the measurement;
  the buffers are now put back.
* One batch passed as ``inputs`` (a tensor: each sample ran without its batch axis, and the KL
  was divided by C instead of 1) and logits other than ``(N, C)`` (token logits: the KL of whole
  sequences per sequence, not per row as ``predicted_change`` of a ``"mean"`` Fisher) are refused.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fimfast import sensitivity as sens


def _net(train: bool = True):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Tanh(),
                        nn.Linear(6, 3)).double()
    return net.train(train)


def _x():
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _kl_by_hand(net, delta, x, seed):
    """The KL of the sub-network of the masks drawn at ``seed``, float64, on copies."""
    import copy

    a, b = copy.deepcopy(net), copy.deepcopy(net)
    with torch.no_grad():
        for n, p in b.named_parameters():
            if n in delta:
                p.add_(delta[n])
        torch.manual_seed(seed)
        lp = torch.log_softmax(a(x), -1)
        torch.manual_seed(seed)
        lq = torch.log_softmax(b(x), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_a_zero_perturbation_measures_zero_in_train_mode():
    net, x = _net(), _x()
    zero = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    assert sens.measure_kl(net, zero, [x, x[:5]]) == 0.0


def test_train_mode_measures_the_kl_of_the_sampled_sub_network():
    net, x = _net(), _x()
    g = torch.Generator().manual_seed(2)
    delta = {n: 0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype)
             for n, p in net.named_parameters()}
    torch.manual_seed(7)
    got = sens.measure_kl(net, delta, [x])
    ref = _kl_by_hand(net, delta, x, 7)
    assert ref > 0 and abs(got - ref) <= 1e-12 * ref


def test_the_measurement_leaves_buffers_parameters_and_mode_as_they_were():
    net, x = _net(), _x()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    delta = {"0.weight": torch.full_like(net[0].weight, 0.1)}
    sens.measure_kl(net, delta, [x, x])
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training


@pytest.mark.parametrize("inputs,what", [("tensor", "tensor"), ("tuple", "tuple"),
                                         ("mapping", "mapping")])
def test_one_batch_as_inputs_is_refused(inputs, what):
    net, x = _net(False), _x()
    arg = {"tensor": x, "tuple": (x, torch.zeros(8, dtype=torch.long)),
           "mapping": {"input": x}}[inputs]
    with pytest.raises(TypeError, match="inputs") as info:
        sens.measure_kl(net, {"0.bias": torch.ones(6, dtype=torch.float64)}, arg)
    assert what in str(info.value)


def test_logits_other_than_n_by_c_are_refused_naming_the_shape():
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.o = nn.Embedding(5, 4), nn.Linear(4, 3)

        def forward(self, ids):
            return self.o(self.e(ids))

    net = Tok().double()
    ids = torch.randint(0, 5, (2, 6))
    with pytest.raises(ValueError, match=r"\(N, C\).*\(2, 6, 3\)"):
        sens.measure_kl(net, {"o.bias": torch.ones(3, dtype=torch.float64)}, [ids])
    # the KL per token: the rows flattened by the forward
    got = sens.measure_kl(net, {"o.bias": torch.ones(3, dtype=torch.float64)}, [ids],
                          forward=lambda m, b: m(b).reshape(-1, 3))
    assert got == pytest.approx(sens.measure_kl(net, {"o.bias": torch.ones(3, dtype=torch.float64)},
                                                [ids.reshape(-1)]), rel=1e-12)
