"""Which per-sample steps keep their squared products for the state to fold: those whose
``sq_matmul`` runs on the ``cpp`` backend (:func:`fimfast.persample.engine._folds`), decided from
the bound op at every step, as the registry resolves it."""

from __future__ import annotations

import pytest
import torch

from fimfast.ops import registry
from fimfast.persample.engine import _folds

CPU = torch.device("cpu")


def _resolved_cpp(backend):
    try:
        return registry.resolve("sq_matmul", backend, CPU)[0] == "cpp"
    except Exception:  # noqa: BLE001 - a backend that cannot run here folds nothing
        return False


@pytest.mark.parametrize("backend", [None, "auto", "torch", "cpp", "triton", "cuda"])
def test_folds_as_the_registry_resolves(backend):
    assert _folds(backend, CPU) is _resolved_cpp(backend)


def test_folds_follow_the_environment(monkeypatch):
    """``FIMFAST_BACKEND`` is read at every step: a bound choice does not outlive it."""
    monkeypatch.delenv("FIMFAST_BACKEND", raising=False)
    auto = _folds(None, CPU)
    assert auto is _resolved_cpp(None)
    monkeypatch.setenv("FIMFAST_BACKEND", "torch")
    assert _folds(None, CPU) is False
    monkeypatch.delenv("FIMFAST_BACKEND")
    assert _folds(None, CPU) is auto


def test_cpp_folds_where_the_extension_runs():
    ok, _ = registry.backend_status("cpp", CPU)
    assert _folds("cpp", CPU) is ok
    assert _folds("torch", CPU) is False
