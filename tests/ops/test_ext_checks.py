"""The argument checks of the compiled ops (csrc/include/fimfast_checks.h), called through
``torch.ops.fimfast`` directly so the Python contracts of fimfast/ops/__init__.py do not run first.

The CPU kernels and the CUDA bindings share these checks: each case runs on the ``cpp`` backend
and, with a GPU and the CUDA kernels built, on ``cuda``, and must fail with the same message,
which names the op and the argument."""

from __future__ import annotations

import pytest
import torch
from op_backends import require


def _ops():
    """torch.ops.fimfast, looked up once the extension is loaded (by require)."""
    return torch.ops.fimfast


def _probe(z, mode="hutchinson", num_probes=1, labels=None, lam=None, vec=None):
    return _ops().probe_logit_grad(z, mode, 1, 2, num_probes, labels, lam, vec, 1.0)


def _cases(dev):
    """name -> (call, regex of the message); inputs of 4 rows and 9 classes."""
    z = torch.randn(4, 9, device=dev)
    p = torch.softmax(z, -1)
    lam, vec = torch.rand(4, 2, device=dev), torch.randn(4, 2, 9, device=dev)
    labels = torch.tensor([0, 3, 9, 8], device=dev)
    g, a = torch.randn(6, 3, device=dev), torch.randn(6, 5, device=dev)
    G, A = torch.randn(2, 3, 4, device=dev), torch.randn(2, 3, 5, device=dev)
    s = [torch.zeros(5, device=dev), torch.zeros(2, 3, device=dev)]
    gr = [torch.ones(5, device=dev), torch.ones(2, 3, device=dev)]

    def acc(*args):
        return _ops().accumulate_(*args)

    return {
        "logits-1d": (lambda: _probe(z[0]),
                      r"probe_logit_grad: logits must be 2-D; got shape \[9\]"),
        "logits-int": (lambda: _probe(z.long()),
                       r"probe_logit_grad: logits must be float16, bfloat16, float32 or float64; "
                       r"got Long"),
        "num-probes": (lambda: _probe(z, num_probes=0),
                       r"probe_logit_grad: num_probes must be >= 1; got 0"),
        "mode": (lambda: _probe(z, "nope"), r"probe_logit_grad: unknown mode 'nope'"),
        "labels-missing": (lambda: _probe(z, "empirical"),
                           r"probe_logit_grad: mode 'empirical' needs labels"),
        "labels-shape": (lambda: _probe(z, "empirical", labels=labels[:3]),
                         r"probe_logit_grad: labels must have shape \(4,\); got \[3\]"),
        "labels-high": (lambda: _probe(z, "empirical", labels=labels),
                        r"probe_logit_grad: labels must be in \[0, 9\); got labels\[2\] = 9"),
        "labels-negative": (lambda: _probe(z, "empirical", labels=-labels),
                            r"labels must be in \[0, 9\); got labels\[1\] = -3"),
        "eig-missing": (lambda: _probe(z, "rankk", lam=lam),
                        r"probe_logit_grad: mode 'rankk' needs eig"),
        "lam-shape": (lambda: _probe(z, "rankk", lam=lam[:3], vec=vec),
                      r"probe_logit_grad: lam \(eigenvalues\) must be \(4, k\); got \[3, 2\]"),
        "vec-shape": (lambda: _probe(z, "rankk", lam=lam, vec=vec[:, :, :8]),
                      r"probe_logit_grad: vec \(eigenvectors\) must be \(4, 2, 9\); "
                      r"got \[4, 2, 8\]"),
        "vec-int": (lambda: _probe(z, "rankk", lam=lam, vec=vec.long()),
                    r"probe_logit_grad: vec must be float16, bfloat16, float32 or float64"),
        "p-3d": (lambda: _ops().core_topk(p[None], 2, "exact", 30),
                 r"core_topk: p must be 2-D; got shape \[1, 4, 9\]"),
        "p-int": (lambda: _ops().core_topk(p.long(), 2, "exact", 30),
                  r"core_topk: p must be float16, bfloat16, float32 or float64; got Long"),
        "k-zero": (lambda: _ops().core_topk(p, 0, "exact", 30),
                   r"core_topk: k must be in \[1, C-1\] = \[1, 8\]; got 0"),
        "k-C": (lambda: _ops().core_topk(p, 9, "power", 30),
                r"core_topk: k must be in \[1, C-1\] = \[1, 8\]; got 9"),
        "solver": (lambda: _ops().core_topk(p, 2, "lanczos", 30),
                   r"core_topk: solver must be 'exact' or 'power'; got 'lanczos'"),
        "sq-g-1d": (lambda: _ops().sq_matmul(g[0], a),
                    r"sq_matmul: g must be 2-D; got shape \[3\]"),
        "sq-a-3d": (lambda: _ops().sq_matmul(g, a[None]), r"sq_matmul: a must be 2-D"),
        "sq-N": (lambda: _ops().sq_matmul(g, a[:5]),
                 r"sq_matmul: g and a must have the same N; got \[6, 3\] and \[5, 5\]"),
        "sq-a-int": (lambda: _ops().sq_matmul(g, a.int()),
                     r"sq_matmul: a must be float16, bfloat16, float32 or float64; got Int"),
        "shared-G-2d": (lambda: _ops().shared_sq(G[0], A), r"shared_sq: G must be 3-D"),
        "shared-A-2d": (lambda: _ops().shared_sq(G, A[0]), r"shared_sq: A must be 3-D"),
        "shared-NT": (lambda: _ops().shared_sq(G, A[:, :2]),
                      r"shared_sq: G and A must agree on \(N, T\); "
                      r"got \[2, 3, 4\] and \[2, 2, 5\]"),
        "shared-G-int": (lambda: _ops().shared_sq(G.long(), A),
                         r"shared_sq: G must be float16, bfloat16, float32 or float64; got Long"),
        "acc-length": (lambda: acc(s, gr[:1], "sum", 0.0, 1.0),
                       r"accumulate_: states and grads differ in length: 2 vs 1"),
        "acc-mode": (lambda: acc(s, gr, "max", 0.0, 1.0),
                     r"accumulate_: mode must be 'sum' or 'ema'; got 'max'"),
        "acc-shape": (lambda: acc(s, [gr[0], gr[1].t()], "sum", 0.0, 1.0),
                      r"accumulate_: states\[1\] and grads\[1\] differ in shape: \[2, 3\] vs "
                      r"\[3, 2\]"),
        "acc-state-dtype": (lambda: acc([s[0], s[1].half()], gr, "sum", 0.0, 1.0),
                            r"accumulate_: states\[1\] must be float32 or float64; got Half"),
        "acc-grad-dtype": (lambda: acc(s, [gr[0], gr[1].long()], "ema", 0.5, 1.0),
                           r"accumulate_: grads\[1\] must be float16, bfloat16, float32 or "
                           r"float64; got Long"),
    }


def _device_cases(dev):
    """Cases that mix devices: only a CUDA tensor can meet a CPU one."""
    g, a = torch.randn(6, 3, device=dev), torch.randn(6, 5)
    G, A = torch.randn(2, 3, 4, device=dev), torch.randn(2, 3, 5)
    s, gr = [torch.zeros(5, device=dev), torch.zeros(3, device=dev)], [torch.ones(5, device=dev),
                                                                       torch.ones(3)]
    z, labels = torch.randn(4, 9), torch.zeros(4, dtype=torch.long, device=dev)
    return {
        "sq-device": (lambda: _ops().sq_matmul(g, a),
                      r"sq_matmul: a must be on the device of g \(cuda:0\); got cpu"),
        "shared-device": (lambda: _ops().shared_sq(G, A),
                          r"shared_sq: A must be on the device of G \(cuda:0\); got cpu"),
        "acc-device": (lambda: _ops().accumulate_(s, gr, "sum", 0.0, 1.0),
                       r"accumulate_: grads\[1\] must be on the device of states\[1\] "
                       r"\(cuda:0\); got cpu"),
        "probe-device": (lambda: _probe(z, "empirical", labels=labels),
                         r"probe_logit_grad: logits must be on a CUDA device when labels or eig "
                         r"are; got cpu"),
    }


CASES = list(_cases("cpu"))
DEVICE_CASES = list(_device_cases("cpu"))


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
@pytest.mark.parametrize("case", CASES)
def test_bad_argument_is_named(backend, case):
    dev = require(backend)
    call, msg = _cases(dev)[case]
    with pytest.raises(RuntimeError, match=msg):
        call()


def test_bad_pair_leaves_every_state_untouched():
    dev = require("cpp")
    states = [torch.zeros(5, device=dev), torch.zeros(2, 3, device=dev)]
    with pytest.raises(RuntimeError, match=r"grads\[1\]"):
        _ops().accumulate_(states, [torch.ones(5), torch.ones(2, 3).long()], "sum", 0.0, 1.0)
    assert all(torch.equal(s, torch.zeros_like(s)) for s in states)


@pytest.mark.parametrize("case", DEVICE_CASES)
def test_inputs_on_two_devices_are_named(case):
    dev = require("cuda")
    call, msg = _device_cases(dev)[case]
    with pytest.raises(RuntimeError, match=msg):
        call()


def test_cpu_labels_of_cuda_logits_are_moved():
    """Labels on the host are accepted for CUDA logits (moved to their device), as before."""
    dev = require("cuda")
    z = torch.randn(4, 9, device=dev)
    labels = torch.tensor([0, 3, 1, 8])
    got = _probe(z, "empirical", labels=labels)
    want = _probe(z, "empirical", labels=labels.to(dev))
    assert torch.equal(got, want)
