"""The Triton kernels as torch custom ops (``torch.ops.fimfast_triton.*``,
fimfast/ops/triton/library.py): schemas, ``torch.library.opcheck``, ``torch.compile`` against the
torch reference, and the graph ``torch.compile`` builds on a GPU.

Under ``TRITON_INTERPRET=1`` (the CPU) every opcheck stage runs: ``test_schema``,
``test_autograd_registration``, ``test_faketensor`` (the registered fake implementations) and
``test_aot_dispatch_dynamic``. The last one sees the op as one opaque node there: an interpreted
kernel cannot be traced into a graph (``wrap_triton`` hands the ``InterpretedFunction`` back
unwrapped, and launching it on the functional tensors of a trace fails, as they hold no data), so
the interpreter registration keeps the op whole. The traced form that a GPU compiles (one
``triton_kernel_wrapper_functional`` node per kernel) is checked in a subprocess with the
interpreter off, which can build that graph without a GPU but not run it. On a GPU the same tests
run the traced form end to end, and ``torch.compile`` with Inductor as well.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from op_backends import require
from torch.utils._python_dispatch import TorchDispatchMode

from fimfast import ops

pytestmark = pytest.mark.triton

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPS = ("accumulate_", "core_topk", "lm_head_probe", "probe_logit_grad", "shared_sq", "sq_matmul")
SCHEMAS = {
    "accumulate_": "fimfast_triton::accumulate_(Tensor(a0!)[] states, Tensor[] grads, "
    "str update_mode, float beta, float scale) -> ()",
    "core_topk": "fimfast_triton::core_topk(Tensor p, SymInt k, str solver, SymInt iters) -> "
    "(Tensor, Tensor)",
    "lm_head_probe": "fimfast_triton::lm_head_probe(Tensor hidden, Tensor weight, Tensor? bias, "
    "str mode, SymInt seed, SymInt offset) -> (Tensor, Tensor, Tensor)",
    "probe_logit_grad": "fimfast_triton::probe_logit_grad(Tensor logits, str mode, SymInt seed, "
    "SymInt offset, SymInt num_probes, Tensor? labels, Tensor? lam, Tensor? vec, float sigma2) "
    "-> Tensor",
    "shared_sq": "fimfast_triton::shared_sq(Tensor G, Tensor A) -> Tensor",
    "sq_matmul": "fimfast_triton::sq_matmul(Tensor g, Tensor a) -> Tensor",
}
SEED = 0xF234_5678_9ABC_DEF0  # the top bit set: a negative int64 in the schema
OFFSET = 2**33 + 5
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


@pytest.fixture(scope="module")
def dev():
    d = require("triton")
    import fimfast.ops.triton.accumulate  # noqa: F401  (each module registers its op)
    import fimfast.ops.triton.core_topk  # noqa: F401
    import fimfast.ops.triton.lm_head_probe  # noqa: F401
    import fimfast.ops.triton.probe_logit_grad  # noqa: F401
    import fimfast.ops.triton.shared_sq  # noqa: F401
    import fimfast.ops.triton.sq_matmul  # noqa: F401

    return d


def _rnd(gen, *shape, dtype=F32):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def _op_args(name: str, dt: torch.dtype, device) -> tuple:
    """Representative arguments of ``torch.ops.fimfast_triton.<op>`` (``name`` is
    ``op[-variant]``) in input dtype ``dt``."""
    g = torch.Generator().manual_seed(0)
    op, _, variant = name.partition("-")
    if op == "probe_logit_grad":
        z = _rnd(g, 4, 9, dtype=dt)
        labels = torch.randint(0, 9, (4,), generator=g) if variant == "empirical" else None
        acc = F64 if dt == F64 else F32
        lam = torch.rand(4, 2, generator=g, dtype=acc) if variant == "rankk" else None
        vec = _rnd(g, 4, 2, 9, dtype=acc) if variant == "rankk" else None
        args = (z, variant, SEED - 2**64, OFFSET, 2, labels, lam, vec, 2.0)
    elif op == "core_topk":
        p = torch.softmax(_rnd(g, 2, 9, dtype=F64), -1).to(dt)
        args = (p, 3, variant, 5)
    elif op == "sq_matmul":
        args = (_rnd(g, 6, 3, dtype=dt), _rnd(g, 6, 5, dtype=dt))
    elif op == "shared_sq":
        args = (_rnd(g, 2, 3, 4, dtype=dt), _rnd(g, 2, 3, 5, dtype=dt))
    elif op == "lm_head_probe":
        bias = _rnd(g, 11, dtype=dt) if variant != "nobias" else None
        args = (_rnd(g, 5, 8, dtype=dt), _rnd(g, 11, 8, dtype=dt), bias,
                "sqrt" if variant == "nobias" else variant, SEED - 2**64, OFFSET)
    elif op == "accumulate_":
        states = [_rnd(g, 5, dtype=F32), _rnd(g, 2, 3, dtype=F64),
                  _rnd(g, 4, 3, dtype=F32).t()]  # a non-contiguous state
        grads = [_rnd(g, 5, dtype=dt), _rnd(g, 2, 3, dtype=dt), _rnd(g, 3, 4, dtype=dt)]
        args = (states, grads, variant, 0.9, 2.0)
    else:
        raise KeyError(name)
    return tuple(
        [t.to(device) for t in a] if isinstance(a, list)
        else a.to(device) if isinstance(a, torch.Tensor) else a
        for a in args
    )  # fmt: skip


# (op-variant, input dtypes it accepts): core_topk takes probabilities in float32|float64, the fused
# lm_head kernels compute in float32 (float64 heads go to the composite)
CASES = {
    "probe_logit_grad-hutchinson": (F32, F64, BF16),
    "probe_logit_grad-rankk": (F32, F64),
    "probe_logit_grad-empirical": (F32, BF16),
    "probe_logit_grad-mc": (F64, F16),
    "probe_logit_grad-bernoulli": (F32,),
    "probe_logit_grad-gaussian": (F32,),
    "core_topk-exact": (F32, F64),
    "core_topk-power": (F32, F64),
    "sq_matmul": (F32, F64, BF16),
    "shared_sq": (F32, F64, BF16),
    "lm_head_probe-hutchinson": (F32, BF16),
    "lm_head_probe-nobias": (F32,),
    "lm_head_probe-dg": (F16,),
    "accumulate_-sum": (F32, F64, BF16),
    "accumulate_-ema": (F16,),
}
PARAMS = [
    pytest.param(name, dt, id=f"{name}-{str(dt)[6:]}") for name, dts in CASES.items() for dt in dts
]


def _op(name: str):
    return getattr(torch.ops.fimfast_triton, name.partition("-")[0]).default


def test_schemas(dev):
    for name in OPS:
        op = getattr(torch.ops.fimfast_triton, name).default
        assert str(op._schema) == SCHEMAS[name], name
        writes = [a.name for a in op._schema.arguments if a.alias_info and a.alias_info.is_write]
        assert writes == (["states"] if name == "accumulate_" else []), name


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def test_backend_runs_the_custom_ops(dev):
    """``backend="triton"`` reaches each kernel through its custom op."""
    calls = {
        "sq_matmul": lambda: ops.sq_matmul(*_op_args("sq_matmul", F32, dev), backend="triton"),
        "shared_sq": lambda: ops.shared_sq(*_op_args("shared_sq", F32, dev), backend="triton"),
        "core_topk": lambda: ops.core_topk(*_op_args("core_topk-exact", F32, dev)[:3],
                                           backend="triton"),
        "probe_logit_grad": lambda: ops.probe_logit_grad(
            *_op_args("probe_logit_grad-hutchinson", F32, dev)[:5], backend="triton"),
        "lm_head_probe": lambda: ops.lm_head_probe(
            *_op_args("lm_head_probe-hutchinson", F32, dev), backend="triton"),
        "accumulate_": lambda: ops.accumulate_(*_op_args("accumulate_-ema", F32, dev),
                                               backend="triton"),
    }  # fmt: skip
    for name, call in calls.items():
        with _Seen() as seen:
            call()
        assert f"fimfast_triton.{name}.default" in seen.ops, (name, sorted(seen.ops))


@pytest.mark.parametrize("name,dt", PARAMS)
def test_opcheck(dev, name, dt):
    args = _op_args(name, dt, dev)
    result = torch.library.opcheck(_op(name), args)
    assert result == {
        "test_schema": "SUCCESS",
        "test_autograd_registration": "SUCCESS",
        "test_faketensor": "SUCCESS",
        "test_aot_dispatch_dynamic": "SUCCESS",
    }


def _reference(name: str, args: tuple):
    """The torch reference backend on the op's arguments (the launcher's contract)."""
    op = name.partition("-")[0]
    if op == "probe_logit_grad":
        z, mode, seed, offset, S, labels, lam, vec, sigma2 = args
        eig = None if lam is None else (lam, vec)
        return ops.probe_logit_grad(z, mode, seed, offset, S, labels, eig, sigma2,
                                    backend="torch")  # fmt: skip
    if op == "core_topk":
        return ops.core_topk(*args, backend="torch")
    if op in ("sq_matmul", "shared_sq"):
        return getattr(ops, op)(*args, backend="torch")
    if op == "lm_head_probe":
        gh, gw, gb = ops.lm_head_probe(*args, backend="torch")
        return gh, gw, gb if gb is not None else torch.empty(0, dtype=gw.dtype, device=gw.device)
    raise KeyError(name)


def _assert_close(out, ref, what):
    if isinstance(out, torch.Tensor):
        out, ref = (out,), (ref,)
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == r.dtype and o.shape == r.shape, (what, o.dtype, r.dtype, o.shape)
        tol = 1e-12 if o.dtype == F64 else 3e-5 if o.dtype == F32 else 2e-2
        scale = max(1.0, float(r.abs().max())) if r.numel() else 1.0
        torch.testing.assert_close(o, r, rtol=tol, atol=tol * scale, msg=what)


COMPILE_CASES = [
    "probe_logit_grad-hutchinson", "probe_logit_grad-rankk", "probe_logit_grad-mc",
    "core_topk-exact", "sq_matmul", "shared_sq", "lm_head_probe-hutchinson",
]  # fmt: skip


def _compile_backends():
    why = ("Inductor compiles the traced kernels for CUDA tensors only; on the CPU the op's "
           "inputs are CPU tensors run by the interpreter")  # fmt: skip
    return ["eager", "aot_eager", pytest.param(
        "inductor", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=why))]


@pytest.mark.parametrize("backend", _compile_backends())
@pytest.mark.parametrize("name", COMPILE_CASES)
def test_compile_fullgraph_matches_reference(dev, name, backend):
    torch._dynamo.reset()
    dt = F64 if name.startswith("probe_logit_grad-mc") else F32
    args = _op_args(name, dt, dev)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    op = _op(name)

    def f(*ts):
        full = list(args)
        for i, t in zip(tensors, ts):
            full[i] = t * 1  # a graph op before the custom op
        out = op(*full)
        return tuple(o * 2 for o in out) if isinstance(out, tuple) else out * 2

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    out = compiled(*[args[i] for i in tensors])
    eager = f(*[args[i] for i in tensors])
    ref = _reference(name, args)
    ref = tuple(2 * r for r in ref) if isinstance(ref, tuple) else 2 * ref
    # the compiled function launches the same kernels as the eager call: the same bits
    for o, e in zip(out if isinstance(out, tuple) else (out,), eager if isinstance(eager, tuple)
                    else (eager,)):  # fmt: skip
        assert torch.equal(o, e), name
    _assert_close(out, ref, f"{name} compiled ({backend}) vs the torch reference")


def test_compile_fullgraph_through_the_public_ops(dev):
    """``fimfast.ops.*(backend="triton")`` compiles into one graph: the registry resolves to the
    launcher, whose op is a node of the graph."""
    torch._dynamo.reset()
    g, a = _op_args("sq_matmul", F32, dev)
    z = _op_args("probe_logit_grad-hutchinson", F32, dev)[0]

    def f(g, a, z):
        sq = ops.sq_matmul(g * 1, a, backend="triton")
        dz = ops.probe_logit_grad(z, "hutchinson", SEED, OFFSET, 2, backend="triton")
        return sq + 1, dz * 2

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(g, a, z)
    _assert_close(out[0], ops.sq_matmul(g, a, backend="torch") + 1, "sq_matmul compiled")
    ref = ops.probe_logit_grad(z, "hutchinson", SEED, OFFSET, 2, backend="torch") * 2
    _assert_close(out[1], ref, "probe_logit_grad compiled")


@pytest.mark.parametrize("backend", _compile_backends())
def test_compile_accumulate_updates_the_caller_states(dev, backend):
    torch._dynamo.reset()
    states, grads, _, beta, scale = _op_args("accumulate_-ema", BF16, dev)
    expected = [s.clone() for s in states]
    ops.accumulate_(expected, grads, "ema", beta, scale, backend="torch")

    def f(states, grads):
        torch.ops.fimfast_triton.accumulate_(states, grads, "ema", beta, scale)
        return states[0] + 1  # a graph op after the mutation sees it

    out = torch.compile(f, backend=backend, fullgraph=True)(states, grads)
    for s, e in zip(states, expected):
        _assert_close(s, e, f"accumulate_ compiled ({backend}): state in place")
    assert not states[2].is_contiguous()  # the non-contiguous state was updated in place
    _assert_close(out, expected[0] + 1, "accumulate_ compiled: the result after the mutation")


@pytest.mark.parametrize("name,dt", [p for p in PARAMS if p.values[0].startswith("accumulate_")])
def test_accumulate_op_matches_reference(dev, name, dt):
    states, grads, mode, beta, scale = _op_args(name, dt, dev)
    expected = [s.clone() for s in states]
    ops.accumulate_(expected, grads, mode, beta, scale, backend="torch")
    torch.ops.fimfast_triton.accumulate_(states, grads, mode, beta, scale)
    for s, e in zip(states, expected):
        _assert_close(s, e, name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on CPU-only machines")
def test_interpreted_ops_stay_whole_in_the_graph(dev):
    """Under the interpreter AOT dispatch keeps the custom op as one node (see the docstring)."""
    from functorch.compile import aot_function

    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm.code)
        return gm

    g, a = _op_args("sq_matmul", F32, dev)
    out = aot_function(lambda g, a: torch.ops.fimfast_triton.sq_matmul(g, a), capture)(g, a)
    assert "torch.ops.fimfast_triton.sq_matmul.default" in graphs[0]
    assert "triton_kernel_wrapper" not in graphs[0]
    _assert_close(out, ops.sq_matmul(g, a, backend="torch"), "sq_matmul through AOT dispatch")


_TRACE_SCRIPT = r"""
import json, sys, torch
from functorch.compile import aot_function
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
sys.path.insert(0, sys.argv[1])
from test_triton_custom_ops import _op_args
from fimfast.ops.triton import accumulate, core_topk, lm_head_probe  # registers the ops
from fimfast.ops.triton import probe_logit_grad, shared_sq, sq_matmul

class Traced(Exception):
    pass

def trace(name, dynamic):
    op = getattr(torch.ops.fimfast_triton, name.partition("-")[0]).default
    leaves, spec = tree_flatten(_op_args(name, torch.float32, "cpu"))
    pos = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor)]
    def f(*ts):
        full = list(leaves)
        for i, t in zip(pos, ts):
            full[i] = t
        return op(*tree_unflatten(full, spec))
    graph = []
    def capture(gm, _inputs):
        graph.append(gm)
        def run(*_):  # the kernels need a GPU to run: stop after the trace
            raise Traced
        return run
    try:
        aot_function(f, capture, dynamic=dynamic)(*[leaves[i] for i in pos])
    except Traced:
        pass
    nodes = list(graph[0].graph.nodes)
    kernels = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in nodes
               if "triton_kernel_wrapper_functional" in str(n.target)]
    whole = [str(n.args[0]) if "auto_functionalized" in str(n.target) else str(n.target)
             for n in nodes if "auto_functionalized" in str(n.target) or "fimfast" in str(n.target)]
    return {"kernels": kernels, "whole": whole}

out = {}
for name in ("sq_matmul", "shared_sq", "core_topk-exact", "core_topk-power",
             "probe_logit_grad-hutchinson", "lm_head_probe-hutchinson", "accumulate_-sum"):
    for dynamic in (False, True):
        out[f"{name} dynamic={dynamic}"] = trace(name, dynamic)
print("RESULT" + json.dumps(out))
"""


@pytest.mark.timeout(600)
def test_compiled_graph_traces_the_kernels(dev):
    """With the interpreter off (a GPU's registration), AOT dispatch traces each op's body into
    one ``triton_kernel_wrapper_functional`` node per kernel, with static and dynamic shapes;
    ``accumulate_`` (host-side address table) stays one ``auto_functionalized`` node. Built on the
    CPU without running: the compiled kernels need a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _TRACE_SCRIPT, os.path.dirname(os.path.abspath(__file__))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=550,
    )  # fmt: skip
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, f"the trace failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    import json

    res = json.loads(line[0][len("RESULT"):])
    expected = {
        "sq_matmul": ["_sq_matmul_kernel"],
        "shared_sq": ["_shared_sq_kernel"],
        "core_topk-exact": ["_exact_kernel"],
        "core_topk-power": ["_power_kernel"],
        "probe_logit_grad-hutchinson": ["_probe_logit_grad_kernel"],
        "lm_head_probe-hutchinson": ["_rows_kernel", "_weight_kernel"],
        "accumulate_-sum": [],
    }
    for key, got in res.items():
        name = key.split(" ")[0]
        assert got["kernels"] == expected[name], (key, got)
        whole = ["fimfast_triton.accumulate_.default"] if name == "accumulate_-sum" else []
        assert got["whole"] == whole, (key, got)


def test_ops_refuse_what_their_kernels_do_not_hold(dev):
    """The launchers send these to the reference; the ops themselves say why they cannot."""
    from fimfast.ops.triton import core_topk, lm_head_probe

    g = torch.Generator().manual_seed(0)
    p = torch.softmax(_rnd(g, 2, core_topk.MAX_C + 1, dtype=F64), -1).to(dev)
    with pytest.raises(ValueError, match=r"C=8193 classes"):
        torch.ops.fimfast_triton.core_topk(p, 2, "exact", 5)
    with pytest.raises(ValueError, match=r"k must be in \[1, C-1\]"):
        torch.ops.fimfast_triton.core_topk(p[:, :4], 4, "exact", 5)
    h, W = _rnd(g, 3, lm_head_probe.MAX_D + 1).to(dev), _rnd(g, 7, lm_head_probe.MAX_D + 1).to(dev)
    with pytest.raises(ValueError, match=r"d=65"):
        torch.ops.fimfast_triton.lm_head_probe(h, W, None, "dg", 0, 0)
    from fimfast.ops.triton import arch

    g, a = _op_args("sq_matmul", F64, dev)
    G, A = _op_args("shared_sq", F64, dev)
    old, arch.TARGET_CC = arch.TARGET_CC, (8, 0)  # what an sm_80 GPU would see
    try:
        with pytest.raises(ValueError, match=r"sq_matmul: a float64 tl.dot"):
            torch.ops.fimfast_triton.sq_matmul(g, a)
        with pytest.raises(ValueError, match=r"shared_sq: a float64 tl.dot"):
            torch.ops.fimfast_triton.shared_sq(G, A)
        _assert_close(ops.sq_matmul(g, a, backend="triton"), ops.sq_matmul(g, a, backend="torch"),
                      "sq_matmul float64 on sm_80: the reference")  # fmt: skip
    finally:
        arch.TARGET_CC = old
    with pytest.raises(ValueError, match=r"mode must be 'sum' or 'ema'"):
        torch.ops.fimfast_triton.accumulate_([torch.zeros(3, device=dev)],
                                             [torch.ones(3, device=dev)], "max", 0.0, 1.0)


def test_ops_have_no_derivative(dev):
    g, a = _op_args("sq_matmul", F32, dev)
    out = torch.ops.fimfast_triton.sq_matmul(g.requires_grad_(), a)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()
    # the launcher (the backend's entry) detaches, as the kernels always did
    assert not ops.sq_matmul(g, a, backend="triton").requires_grad


def test_triton_backend_needs_triton_op(monkeypatch):
    """torch < 2.6 has no torch.library.triton_op: the backend is unavailable, with the reason."""
    from fimfast.ops import registry

    monkeypatch.setattr(registry, "_PROBED", {})
    monkeypatch.delattr(torch.library, "triton_op")
    ok, why = registry.backend_status("triton", torch.device("cuda"))
    assert not ok and "needs torch>=2.6 (torch.library.triton_op)" in why
    with pytest.raises(ops.BackendUnavailableError, match="triton_op"):
        ops.sq_matmul(torch.ones(2, 3), torch.ones(2, 4), backend="triton")
