"""The MultiheadAttention rule's output has torch's memory layout (a contiguous sequence-first
tensor; batch-first, a transposed view of one), so that an operation after it whose result
depends on the layout (a dropout draws its mask in memory order) gives what it gives on the plain
model: the per-step float64 oracle, running the plain model with the same random state, agrees."""

from __future__ import annotations

import adversarial as adv
import pytest
import torch
import torch.nn as nn


class _Net(nn.Module):
    def __init__(self, batch_first: bool, kv: bool):
        super().__init__()
        self.bf = batch_first
        self.emb = nn.Linear(6, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=batch_first, add_bias_kv=kv)
        self.drop, self.head = nn.Dropout(0.5), nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x if self.bf else x.transpose(0, 1))
        a = self.att(h, h, h, need_weights=False)[0]
        out = self.head(self.drop(a) + h)
        return out.mean(1 if self.bf else 0)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kv", [False, True])
@pytest.mark.parametrize("fim_type", ["exact", "empirical", "monte_carlo"])
def test_dropout_after_attention_matches_the_plain_model(batch_first, kv, fim_type):
    torch.manual_seed(0)
    m = _Net(batch_first, kv).double().train()
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    est, ref = adv.run(m, [(x, y), (x, y)], fim_type)
    assert adv.nonzero(ref)
    assert adv.max_rel(est, ref) < 1e-10


def test_output_layout_is_torchs():
    torch.manual_seed(0)
    import fimfast

    for bf in (True, False):
        m = _Net(bf, False).train()
        m.drop.p = 0.0
        x = torch.randn(5, 4, 6)
        h = m.emb(x if bf else x.transpose(0, 1))
        want = m.att(h, h, h, need_weights=False)[0]
        seen: list = []
        m.att.register_forward_hook(lambda mod, i, o, seen=seen: seen.append(o[0]))
        fimfast.DiagFisher(m, "exact").step((x, torch.randint(0, 3, (5,))))
        assert seen and seen[-1].stride() == want.stride()
