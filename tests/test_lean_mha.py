"""The lean self-attention of the one-backward estimators (fimfast/lean_mha.py): torch's output
and layout, gradients equal up to rounding, every other call sent to torch's forward, and the
HUTCHINSON steps that run it (prepared and general path) equal to each other and to a float64
oracle built on torch's own forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from cases import assert_same_estimators
from oracle import one_probe_oracle

import fimfast
from fimfast import lean_mha, prepared


def _mha(batch_first=True, bias=True, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return nn.MultiheadAttention(16, 4, bias=bias, batch_first=batch_first, dtype=dtype, **kw)


def _x(batch_first=True, dtype=torch.float64, N=3, L=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, L, 16, generator=g, dtype=dtype)
    return x if batch_first else x.transpose(0, 1).contiguous()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_the_lean_forward_is_torchs_output_and_gradients(batch_first, bias, dtype, training):
    m = _mha(batch_first, bias, dtype).train(training)
    x = _x(batch_first, dtype)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    want, w0 = m(x, x, x, need_weights=False)
    gw = torch.autograd.grad(want.square().sum(), list(m.parameters()))
    try:  # the lean forward ran (not torch's, which calls SDPA through its functional)
        torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or real(
            *a, **k)
        got, w1 = lean_mha.forward(m, x, x, x, need_weights=False)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert calls == [1] and w0 is None and w1 is None
    # torch's values to rounding: the packed projection on the input as it is, not on its
    # sequence-first view, rounds differently where the GEMM kernel blocks the two layouts
    # differently (bit for bit with AVX-512 kernels; 1.7e-16 apart in float64 with AVX2 ones)
    out_tol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, want, rtol=out_tol, atol=out_tol)
    assert got.stride() == want.stride() and got.shape == want.shape  # torch's layout
    gg = torch.autograd.grad(got.square().sum(), list(m.parameters()))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _calls():
    """``(module, args, kwargs)`` of calls the lean forward leaves to torch's forward."""
    x, y = _x(), _x(N=3, L=5) + 1
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[0, 1] = True
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[1, 4] = True
    drop = _mha(dropout=0.5).train()
    return [
        (_mha(), (x, x, x), {}),  # need_weights defaults to True
        (_mha(), (x, x, x), {"need_weights": False, "attn_mask": mask}),
        (_mha(), (x, x, x), {"need_weights": False, "key_padding_mask": kpm}),
        (_mha(), (x, y, y), {"need_weights": False}),
        (_mha(), (x, x, y), {"need_weights": False}),
        (_mha(add_bias_kv=True), (x, x, x), {"need_weights": False}),
        (_mha(add_zero_attn=True), (x, x, x), {"need_weights": False}),
        (_mha(kdim=8, vdim=8), (x, x[..., :8], x[..., :8]), {"need_weights": False}),
        (drop, (x, x, x), {"need_weights": False}),
        (_mha(), (x[0], x[0], x[0]), {"need_weights": False}),  # unbatched
    ]


@pytest.mark.parametrize("i", range(10))
def test_every_other_call_runs_torchs_forward(i, monkeypatch):
    m, args, kwargs = _calls()[i]
    seen = []
    real = nn.MultiheadAttention.forward
    monkeypatch.setattr(nn.MultiheadAttention, "forward",
                        lambda *a, **k: seen.append(1) or real(*a, **k))
    # the spy taken as torch's forward: only the call's own arguments send it there
    monkeypatch.setattr(lean_mha, "_TORCH", nn.MultiheadAttention.forward)
    if m.dropout:
        torch.manual_seed(5)
    lean_mha.forward(m, *args, **kwargs)
    assert seen == [1]


def test_no_grad_a_subclass_and_a_patched_class_forward_run_theirs():
    x = _x()
    m = _mha()
    with torch.no_grad():
        assert torch.equal(lean_mha.forward(m, x, x, x, need_weights=False)[0],
                           m(x, x, x, need_weights=False)[0])

    class Sub(nn.MultiheadAttention):
        def forward(self, *a, **k):
            return "sub", None

    torch.manual_seed(0)
    assert lean_mha.forward(Sub(16, 4, batch_first=True).double(), x, x, x,
                            need_weights=False)[0] == "sub"
    real = nn.MultiheadAttention.forward
    try:  # a class forward patched after import: it runs
        nn.MultiheadAttention.forward = lambda *a, **k: ("patched", None)
        assert lean_mha.forward(m, x, x, x, need_weights=False)[0] == "patched"
    finally:
        nn.MultiheadAttention.forward = real


class _Encoder(nn.Module):
    """A post-norm encoder layer (its self-attention called as torch's layer calls it) and a
    head on the mean over positions."""

    def __init__(self, batch_first=True, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first,
                                                dtype=dtype)
        self.head = nn.Linear(16, 3, dtype=dtype)
        self.batch_first = batch_first

    def forward(self, x):
        h = self.layer(x)
        return self.head(h.mean(1 if self.batch_first else 0))


def _batches(batch_first=True, dtype=torch.float64, k=3):
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(k):
        x = torch.randn(4, 6, 16, generator=g, dtype=dtype)
        out.append((x if batch_first else x.transpose(0, 1).contiguous(),
                    torch.randint(0, 3, (4,), generator=g)))
    return out


def _run(model, batches, general, monkeypatch, fim_type):
    est = fimfast.DiagFisher(model, fim_type, seed=3)
    took = []
    with monkeypatch.context() as mp:
        real = prepared.step
        mp.setattr(prepared, "step", (lambda e, b: False) if general else
                   (lambda e, b: took.append(real(e, b)) or took[-1]))
        for b in batches:
            est.step(b)
    return est, took


@pytest.mark.parametrize("fim_type", ["hutchinson", "hutchinson_dg"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hutchinson_steps_run_it_and_equal_the_oracle(monkeypatch, fim_type, batch_first, dtype):
    model = _Encoder(batch_first, dtype)
    batches = _batches(batch_first, dtype)
    runs = []
    real = lean_mha.forward
    monkeypatch.setattr(lean_mha, "forward", lambda *a, **k: runs.append(1) or real(*a, **k))
    ref, _ = _run(model, batches, True, monkeypatch, fim_type)
    assert len(runs) == 3  # the general path ran it
    est, took = _run(model, batches, False, monkeypatch, fim_type)
    assert took == [True] * 3 and len(runs) == 6
    assert_same_estimators(est, ref)  # the prepared step and the general path: bit for bit
    mode = "dg" if fim_type == "hutchinson_dg" else "hutchinson"
    want = one_probe_oracle(model, batches, 3, mode)
    tol = 1e-11 if dtype == torch.float64 else 2e-4
    got = est.result()
    assert set(got) == set(want)
    for n, v in got.items():
        torch.testing.assert_close(v.double(), want[n], rtol=tol, atol=tol * 1e-3, msg=n)
    assert all(float(v.abs().max()) > 0 for v in got.values())


def test_an_instance_forward_of_the_users_is_kept(monkeypatch):
    model = _Encoder()
    attn = model.layer.self_attn
    calls = []
    attn.forward = lambda *a, **k: calls.append(1) or nn.MultiheadAttention.forward(attn, *a, **k)
    runs = []
    real = lean_mha.forward
    monkeypatch.setattr(lean_mha, "forward", lambda *a, **k: runs.append(1) or real(*a, **k))
    est = fimfast.DiagFisher(model, "hutchinson", seed=3)
    est.step(_batches()[0])
    assert calls == [1] and runs == []
    assert attn.__dict__["forward"] is not None  # put back as found


def test_per_sample_types_keep_the_attention_rule(monkeypatch):
    runs = []
    real = lean_mha.forward
    monkeypatch.setattr(lean_mha, "forward", lambda *a, **k: runs.append(1) or real(*a, **k))
    est = fimfast.DiagFisher(_Encoder(), "empirical")
    est.step(_batches()[0])
    assert runs == []


def test_train_step_gradients_and_fisher_with_it(monkeypatch):
    """``train_step`` of HUTCHINSON runs the lean forward: its ``.grad`` is the plain training
    step's up to rounding, and its Fisher the one ``step`` gives on the same batch."""
    model = _Encoder()
    x, y = _batches()[0]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    want = torch.autograd.grad(loss, list(model.parameters()))
    runs = []
    real = lean_mha.forward
    monkeypatch.setattr(lean_mha, "forward", lambda *a, **k: runs.append(1) or real(*a, **k))
    est = fimfast.DiagFisher(model, "hutchinson", seed=3)
    got = est.train_step((x, y))
    assert runs == [1]
    torch.testing.assert_close(got, loss.detach(), rtol=1e-12, atol=0)
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-13)
    ref = fimfast.DiagFisher(model, "hutchinson", seed=3)
    ref.step((x, y))
    assert_same_estimators(est, ref)
