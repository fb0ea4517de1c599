"""``sequence_rows``: one Fisher row per sequence for token-level MONTE_CARLO and EMPIRICAL."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fimfast


class Tagger(nn.Module):
    """Embedding, masked self-attention and a linear head: tokens of a sequence are coupled."""

    def __init__(self, vocab=7, d=8, c=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, c)

    def forward(self, ids):
        x = self.emb(ids)
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head(torch.tanh(x + a))


def _data(padded: bool = True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (4, 6), generator=g)
    y = torch.randint(0, 5, (4, 6), generator=g)
    if padded:
        y[1, 4:] = -100  # padding left out
    return ids, y


def _model():
    torch.manual_seed(0)
    return Tagger().double().eval()


def _sequence_empirical(m, ids, y):
    """Float64 reference: sum_n (grad of the summed token log-likelihood of sequence n)^2."""
    out = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for n in range(ids.shape[0]):
        z = m(ids[n : n + 1])[0]
        loss = F.cross_entropy(z, y[n], ignore_index=-100, reduction="sum")
        gs = torch.autograd.grad(loss, list(m.parameters()))
        for (k, _), g in zip(m.named_parameters(), gs):
            out[k] += g.square()
    return out


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "every_token"])
@pytest.mark.parametrize("rules", [True, False], ids=["fast", "generic"])
def test_sequence_empirical_is_the_whole_sequence_empirical_fisher(rules, padded):
    """With padding, and without (every row valid: the head's output gradient is then the
    column itself, fimfast/persample/engine.py, ``_head_grad``)."""
    m = _model()
    ids, y = _data(padded)
    est = fimfast.DiagFisher(m, "empirical", class_dim=-1, sequence_rows=True)
    est._persample.use_rules = rules
    est.step((ids, y))
    ref = _sequence_empirical(m, ids, y)
    for k, v in est.result().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-10, atol=1e-14)
    if rules:
        assert est._persample.last_plan.generic == []


def test_sequence_monte_carlo_fast_equals_generic_for_the_same_draws():
    m = _model()
    ids, y = _data()
    res = []
    for rules in (True, False):
        est = fimfast.DiagFisher(m, "monte_carlo", class_dim=-1, sequence_rows=True, seed=3,
                                 num_probes=2)
        est._persample.use_rules = rules
        est.step((ids, y))
        res.append(est.result())
    for k in res[0].keys():
        torch.testing.assert_close(res[0][k], res[1][k], rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_sequence_monte_carlo_is_unbiased_for_the_token_fisher():
    m = _model()
    ids, y = _data()
    exact = fimfast.DiagFisher(m, "exact", class_dim=-1)
    exact.step((ids, y))
    ref = exact.result()
    draws = 400
    seq = fimfast.DiagFisher(m, "monte_carlo", class_dim=-1, sequence_rows=True, seed=11,
                             num_probes=draws)
    seq.step((ids, y))
    tok = fimfast.DiagFisher(m, "monte_carlo", class_dim=-1, seed=11, num_probes=draws)
    tok.step((ids, y))
    # measured over 300 seeds of one draw: the relative sd of a tensor's trace is at most 0.41
    # with sequence rows and 0.15 with token rows; the mean of 400 draws must lie within 4
    # standard errors (4 sd / 20) of EXACT
    for k, r in ref.items():
        for est, tol in ((seq, 0.085), (tok, 0.03)):
            assert float(est.result()[k].sum()) == pytest.approx(float(r.sum()), rel=tol), k


def test_sequence_rows_applies_to_monte_carlo_and_empirical_only():
    for t in ("exact", "hutchinson"):
        with pytest.raises(ValueError, match="sequence_rows"):
            fimfast.DiagFisher(_model(), t, sequence_rows=True)
    with pytest.raises(ValueError, match="sequence_rows"):
        fimfast.DiagFisher(_model(), "empirical", sequence_rows="yes")
