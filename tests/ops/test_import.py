"""Importing fimfast is cheap and safe: no triton, no fimfast._C, no CUDA; hidden or broken
backends fall back quietly in the automatic choice and fail loudly when named."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fimfast.ops import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str, **env: str) -> None:
    full = {**os.environ, "PYTHONPATH": ROOT, **env}
    for k in ("FIMFAST_BACKEND", "FIMFAST_DISABLE_EXT", "FIMFAST_DISABLE_TRITON"):
        if k not in env:
            full.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_loads_nothing_heavy():
    _run("""
        import sys
        import fimfast
        import torch
        assert "triton" not in sys.modules, "import fimfast imported triton"
        assert "fimfast._C" not in sys.modules, "import fimfast loaded fimfast._C"
        assert not torch.cuda.is_initialized(), "import fimfast initialised CUDA"
        fimfast.available_backends()  # probing the backends imports triton but loads nothing
        assert not torch.cuda.is_initialized()
    """)


_FALLBACK = """
import sys
import torch
import fimfast
from fimfast import ops


def check(hidden, reason):
    st = fimfast.available_backends()
    assert not st[hidden]["available"], st
    assert reason in st[hidden]["reason"], st[hidden]["reason"]
    z = torch.randn(3, 5)
    out = ops.probe_logit_grad(z, "hutchinson", 1, 0, 2)  # automatic choice: falls back
    ref = ops.probe_logit_grad(z, "hutchinson", 1, 0, 2, backend="torch")
    torch.testing.assert_close(out, ref)
    s = [torch.zeros(4)]
    ops.accumulate_(s, [torch.ones(4)])
    assert torch.equal(s[0], torch.ones(4))
    try:
        ops.probe_logit_grad(z, "hutchinson", 1, 0, backend=hidden)
    except fimfast.BackendUnavailableError as exc:
        assert reason in str(exc), str(exc)
    else:
        raise AssertionError("an unavailable explicit backend did not raise")
"""


def test_env_hides_triton_and_the_extension():
    _run(_FALLBACK + """
check("triton", "FIMFAST_DISABLE_TRITON")
check("cpp", "FIMFAST_DISABLE_EXT")
check("cuda", "FIMFAST_DISABLE_EXT")
assert "triton" not in sys.modules and "fimfast._C" not in sys.modules
""", FIMFAST_DISABLE_TRITON="1", FIMFAST_DISABLE_EXT="1", TRITON_INTERPRET="1")


def test_unimportable_triton_and_missing_extension():
    # a None entry in sys.modules makes the import raise ImportError, as a missing package or .so
    _run("import sys\nsys.modules['triton'] = None\nsys.modules['fimfast._C'] = None\n"
         + _FALLBACK + """
check("triton", "triton cannot be imported")
check("cpp", "fimfast._C is not available")
check("cuda", "fimfast._C is not available")
""", TRITON_INTERPRET="1")


def test_env_backend_selects_and_explicit_wins(monkeypatch):
    monkeypatch.setenv("FIMFAST_BACKEND", "torch")
    name, _ = registry.resolve("sq_matmul", None, torch.device("cpu"))
    assert name == "torch"
    monkeypatch.setenv("FIMFAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FIMFAST_BACKEND"):
        registry.resolve("sq_matmul", None, torch.device("cpu"))
    monkeypatch.delenv("FIMFAST_BACKEND")
    name, _ = registry.resolve("sq_matmul", "torch", torch.device("cpu"))
    assert name == "torch"


@pytest.mark.parametrize("op", sorted(registry._IMPLS))
def test_automatic_cpu_choice_is_the_measured_order(op, monkeypatch):
    monkeypatch.delenv("FIMFAST_BACKEND", raising=False)
    name, _ = registry.resolve(op, None, torch.device("cpu"))
    first = next(b for b in registry._AUTO_CPU[op]
                 if registry.backend_status(b, torch.device("cpu"))[0])
    assert name == first


def test_automatic_choice_is_remembered_until_the_registry_changes(monkeypatch):
    monkeypatch.delenv("FIMFAST_BACKEND", raising=False)
    cpu = torch.device("cpu")
    first = registry.resolve("sq_matmul", None, cpu)
    assert registry.resolve("sq_matmul", None, cpu) is first  # remembered
    impls = dict(registry._IMPLS["sq_matmul"])
    order = registry._AUTO_CPU["sq_matmul"]
    try:  # the reference put first: the remembered choice must not survive the change
        monkeypatch.setitem(registry._AUTO_CPU, "sq_matmul", ("torch", *order))
        registry.register("sq_matmul", "torch", impls["torch"])
        name, fn = registry.resolve("sq_matmul", None, cpu)
        assert name == "torch"
        assert fn is registry._load(impls["torch"])
    finally:
        registry._IMPLS["sq_matmul"] = impls
        registry._AUTO_CHOICE.clear()


def _impl(op: str, backend: str):
    return registry._load(registry._IMPLS[op][backend])


def test_bound_keeps_the_automatic_choice_and_reads_the_environment_every_call(monkeypatch):
    """ops.probe_logit_grad's dispatch (registry.bound): the automatic choice is kept, and a
    FIMFAST_BACKEND set afterwards, or an explicit backend, still decides (and still raises)."""
    from fimfast import ops

    op, cpu, z = "probe_logit_grad", torch.device("cpu"), torch.randn(3, 4)
    monkeypatch.delenv("FIMFAST_BACKEND", raising=False)
    auto = registry.resolve(op, None, cpu)[1]
    assert registry.bound(op, None, cpu) is auto
    assert registry.bound(op, "auto", cpu) is auto  # kept: the same again
    monkeypatch.setenv("FIMFAST_BACKEND", "torch")
    assert registry.bound(op, None, cpu) is _impl(op, "torch")
    monkeypatch.setenv("FIMFAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FIMFAST_BACKEND"):
        ops.probe_logit_grad(z, "hutchinson", 0, 0)
    monkeypatch.setenv("FIMFAST_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.probe_logit_grad(z, "hutchinson", 0, 0)
    monkeypatch.setenv("FIMFAST_BACKEND", "auto")
    assert registry.bound(op, None, cpu) is auto
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.probe_logit_grad(z, "hutchinson", 0, 0, backend="cuda")
    assert registry.bound(op, "torch", cpu) is _impl(op, "torch")
    got = ops.probe_logit_grad(z, "hutchinson", 5, 7)
    want = ops.probe_logit_grad(z, "hutchinson", 5, 7, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bound_forgets_its_choice_when_the_registry_changes(monkeypatch):
    op, cpu = "probe_logit_grad", torch.device("cpu")
    monkeypatch.delenv("FIMFAST_BACKEND", raising=False)
    impls, order = dict(registry._IMPLS[op]), registry._AUTO_CPU[op]
    first = registry.bound(op, None, cpu)
    try:
        monkeypatch.setitem(registry._AUTO_CPU, op, ("torch", *order))
        registry.register(op, "torch", impls["torch"])
        assert registry.bound(op, None, cpu) is _impl(op, "torch")
    finally:
        registry._IMPLS[op] = impls
        monkeypatch.setitem(registry._AUTO_CPU, op, order)
        registry._AUTO_CHOICE.clear()
    assert registry.bound(op, None, cpu) is first


def test_bound_reads_triton_interpret_where_the_automatic_order_has_triton(monkeypatch):
    """With triton in the automatic order on the CPU, TRITON_INTERPRET decides on every call."""
    op, cpu = "probe_logit_grad", torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not registry.backend_status("triton", cpu)[0]:
        pytest.skip("triton is unavailable here")
    monkeypatch.delenv("FIMFAST_BACKEND", raising=False)
    try:
        monkeypatch.setitem(registry._AUTO_CPU, op, ("triton", "torch"))
        registry._AUTO_CHOICE.clear()
        registry._AUTO_BOUND.clear()
        assert registry.bound(op, None, cpu) is _impl(op, "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert registry.bound(op, None, cpu) is _impl(op, "torch")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert registry.bound(op, None, cpu) is _impl(op, "triton")
    finally:
        registry._AUTO_CHOICE.clear()
        registry._AUTO_BOUND.clear()
