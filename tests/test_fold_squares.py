"""The extension's fold of a one-probe step's squares (csrc/cpu/fold_squares.cpp): bit for bit
torch's multi-tensor ``addcmul``, all or nothing, and the HUTCHINSON steps that use it equal to
those that do not and to a float64 oracle."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from cases import assert_same_estimators

import fimfast
from fimfast import _ext, prepared
from fimfast.estimator import trainable_parameters

FOLD = _ext.host_function("fold_squares")
pytestmark = pytest.mark.skipif(FOLD is None, reason="the extension's fold_squares is not built")

# a weight over the parallel grain (32768) and sizes that are no multiple of a vector
SHAPES = [(300, 131), (7,), (1,), (0,), (5, 3), (65537,)]


def _pairs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = [torch.rand(s, generator=g, dtype=dtype) * 1e-3 for s in SHAPES]
    grads = [torch.randn(s, generator=g, dtype=dtype) * 3 for s in SHAPES]
    return states, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_fold_is_torchs_addcmul_bit_for_bit(dtype, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        states, grads = _pairs(dtype)
        want = [s.clone() for s in states]
        torch._foreach_addcmul_(want, grads, grads, value=1.0)
        versions = [s._version for s in states]
        assert FOLD(states, grads) is True
    finally:
        torch.set_num_threads(before)
    for s, w, v in zip(states, want, versions):
        assert torch.equal(s, w)
        assert s._version == v + 1  # as an in-place op bumps it
    assert any((w - s0).abs().max() > 0 for w, s0 in zip(want, _pairs(dtype)[0]) if w.numel())


def test_each_capability_of_torch_is_followed_bit_for_bit():
    """torch's DEFAULT kernels multiply and add, its AVX2 and AVX512 ones fuse: the fold follows
    the capability torch dispatches to (``ATEN_CPU_CAPABILITY``)."""
    code = (
        "import torch\nfrom fimfast import _ext\nf = _ext.host_function('fold_squares')\n"
        "g = torch.Generator().manual_seed(0)\n"
        "a = torch.rand(40003, generator=g) * 1e-3\nx = torch.randn(40003, generator=g) * 3\n"
        "w = a.clone()\ntorch._foreach_addcmul_([w], [x], [x], value=1.0)\n"
        "ok = f([a], [x])\nprint(torch.backends.cpu.get_cpu_capability(), ok, "
        "not ok or torch.equal(a, w))\n"
    )
    for cap in ("default", "avx2", "avx512"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**_env(), "ATEN_CPU_CAPABILITY": cap}, check=True).stdout
        assert out.split()[-1] == "True", (cap, out)


def _env():
    import os

    return dict(os.environ)


def test_a_pair_it_cannot_fold_leaves_every_state_for_torch():
    """All or nothing: ``False`` and nothing written (the caller runs torch's addcmul) when any
    pair is of another dtype, strided, expanded, of another size, needs gradients or is an
    inference tensor; the lists differ in length."""
    cases = {
        "dtype": lambda s, g: (s, g.double()),
        "strided grad": lambda s, g: (s, torch.stack([g, g], -1)[..., 0]),
        "strided state": lambda s, g: (torch.stack([s, s], -1)[..., 0], g),
        "expanded grad": lambda s, g: (s, g[:1].expand(g.shape)),
        "size": lambda s, g: (s, g[:-1]),
        "requires grad": lambda s, g: (s.clone().requires_grad_(), g),
        "integer": lambda s, g: (s.long(), g.long()),
    }
    for what, bad in cases.items():
        states, grads = _pairs(torch.float32)
        states[-1], grads[-1] = bad(states[-1], grads[-1])
        before = [s.detach().clone() for s in states]
        assert FOLD(states, grads) is False, what
        for s, b in zip(states, before):
            assert torch.equal(s.detach(), b), what
    with torch.inference_mode():
        s, g = torch.zeros(3), torch.ones(3)
    assert FOLD([s], [g]) is False and not s.any()
    states, grads = _pairs(torch.float32)
    assert FOLD(states, grads[:-1]) is False
    assert FOLD([], []) is True


def test_a_copy_on_write_state_is_written_alone():
    """A state that is a lazy clone (fimfast.state's copies on the CPU) gets its own storage
    before the write; the tensor it was cloned from keeps its values."""
    a = torch.rand(1000)
    b = torch._lazy_clone(a)
    keep = a.clone()
    g = torch.randn(1000)
    assert FOLD([b], [g])
    assert torch.equal(a, keep) and torch.equal(b, keep.addcmul(g, g))


def _mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 4)).to(dtype)


def _batches(dtype, k=4, n=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g))
            for _ in range(k)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_steps_with_the_fold_equal_those_without_and_the_oracle(monkeypatch, dtype):
    if None in prepared._host():
        pytest.skip("the extension's one_probe_step is not built")
    batches = _batches(dtype)
    calls = []
    real = prepared._HOST[2]

    def fold(states, grads):
        calls.append(real(states, grads))
        return calls[-1]

    def run(host):
        with monkeypatch.context() as mp:
            mp.setattr(prepared, "_HOST", [*prepared._HOST[:2], host])
            est = fimfast.DiagFisher(_mlp(dtype), "hutchinson", seed=3)
            for b in batches:
                est.step(b)
        return est

    with_fold, without = run(fold), run(None)
    assert calls == [True] * 3  # the first step adopts its squares
    assert_same_estimators(with_fold, without)
    # the oracle: the squared one-probe gradients in float64, their probes drawn by the torch op
    model = _mlp(dtype)
    names, params = trainable_parameters(model)
    want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, params)}
    offset = 0
    for x, _ in batches:
        z = model(x)
        u = fimfast.ops.probe_logit_grad(z.detach().double(), "hutchinson", 3, offset, 1,
                                         backend="torch")[0]
        for n, g in zip(names, torch.autograd.grad(z, params, u.to(dtype))):
            want[n] += g.double() ** 2
        offset += 2 * z.numel()
    got = with_fold.result()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for n in names:
        assert want[n].abs().max() > 0, n  # not a vacuous comparison
        torch.testing.assert_close(got[n].double(), want[n], rtol=tol, atol=tol * 1e-3, msg=n)


def test_a_failed_step_leaves_the_state_with_the_fold(monkeypatch):
    """The squares are folded after the backward, when nothing of the step can fail any more: a
    backward that raises leaves the state as it was."""
    if None in prepared._host():
        pytest.skip("the extension's one_probe_step is not built")

    class Boom(torch.autograd.Function):
        fail = False

        @staticmethod
        def forward(ctx, x):
            return x * 1

        @staticmethod
        def backward(ctx, g):
            if Boom.fail:
                raise RuntimeError("backward failed")
            return g

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.b(Boom.apply(torch.tanh(self.a(x))))

    torch.manual_seed(0)
    est = fimfast.DiagFisher(Net(), "hutchinson", seed=1)
    batches = _batches(torch.float32)
    for b in batches[:2]:
        est.step(b)
    before = {n: v.clone() for n, v in est.result().items()}
    count, offset = est.state.count, est.offset
    Boom.fail = True
    with pytest.raises(RuntimeError, match="backward failed"):
        est.step(batches[2])
    Boom.fail = False
    after = est.result()
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert (est.state.count, est.offset) == (count, offset)
    est.step(batches[2])  # and the next step folds as usual
    assert est.state.steps == 3
