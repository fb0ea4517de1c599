"""fimfast._env.get: os.environ.get read now, without the cost of a missing name."""

from __future__ import annotations

import os

import pytest

from fimfast import _env


@pytest.mark.parametrize(
    "name", ["FIMFAST_BACKEND", "FIMFAST_MEMORY_BUDGET_MB", "TRITON_INTERPRET"]
)
def test_get_follows_every_change(monkeypatch, name):
    monkeypatch.delenv(name, raising=False)
    assert _env.get(name) is None
    monkeypatch.setenv(name, "torch")
    assert _env.get(name) == "torch" == os.environ.get(name)
    monkeypatch.setenv(name, "cpp")  # a new value under a key already looked up
    assert _env.get(name) == "cpp"
    os.environ.pop(name)
    assert _env.get(name) is None
    os.environ[name] = "\u00e9t\u00e9"  # not ASCII: decoded as os.environ decodes it
    try:
        assert _env.get(name) == os.environ[name]
    finally:
        del os.environ[name]


def test_backend_and_budget_read_at_every_call(monkeypatch):
    monkeypatch.delenv("FIMFAST_BACKEND", raising=False)
    monkeypatch.delenv("FIMFAST_MEMORY_BUDGET_MB", raising=False)
    assert _env.backend() == "auto"
    assert _env.memory_budget_bytes() == 256 * 2**20
    monkeypatch.setenv("FIMFAST_BACKEND", " Torch ")
    monkeypatch.setenv("FIMFAST_MEMORY_BUDGET_MB", "0.5")
    assert _env.backend() == "torch"
    assert _env.memory_budget_bytes() == 2**19
    monkeypatch.setenv("FIMFAST_BACKEND", "")
    assert _env.backend() == "auto"
    monkeypatch.setenv("FIMFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FIMFAST_BACKEND"):
        _env.backend()
    monkeypatch.setenv("FIMFAST_MEMORY_BUDGET_MB", "-1")
    with pytest.raises(ValueError, match="FIMFAST_MEMORY_BUDGET_MB"):
        _env.memory_budget_bytes()


def test_replaced_environ_is_read_with_its_get(monkeypatch):
    monkeypatch.setattr(os, "environ", {"FIMFAST_BACKEND": "cpp"})
    assert _env.get("FIMFAST_BACKEND") == "cpp"
    assert _env.get("FIMFAST_DISABLE_EXT") is None
