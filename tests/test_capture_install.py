"""Capture.install / uninstall (what Capture.installed and the per-sample step enter): a failed
install or a failing forward leaves no hook, patched forward or watch behind, and a failed step
leaves the estimate unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fimfast
from fimfast import hooks, layers


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3))


def _clean(model: nn.Module) -> bool:
    """No hook of any kind and no patched forward on any module."""
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        and "forward" not in m.__dict__
        for m in model.modules()
    )


def test_a_failed_install_removes_what_it_installed(monkeypatch):
    model = _mlp()
    params = list(model.parameters())
    cap = hooks.Capture(model, params, layers.rule_for)
    mods = hooks.targets(model, params, layers.rule_for)
    assert len(mods) == 3
    installs = []
    rule = mods[1][1]
    original = type(rule).install

    def install(self, module, c):
        if module is mods[2][0]:
            raise RuntimeError("planted install failure")
        installs.append(module)
        return original(self, module, c)

    monkeypatch.setattr(type(rule), "install", install)
    with pytest.raises(RuntimeError, match="planted install failure"):
        cap.install(mods)
    assert installs == [mods[0][0], mods[1][0]]  # two were installed before the failure ...
    assert _clean(model) and not cap.active  # ... and removed


def test_install_then_uninstall_captures_and_leaves_nothing():
    model = _mlp()
    params = list(model.parameters())
    x = torch.randn(6, 5)
    cap = hooks.Capture(model, params, layers.rule_for)
    undo = cap.install()
    assert cap.active and not _clean(model)
    try:
        out = model(x)
    finally:
        cap.uninstall(undo)
    assert _clean(model) and not cap.active
    assert len(cap.calls) == 3
    torch.testing.assert_close(out, model(x))  # the captured forward computes the same logits


def test_a_forward_failing_in_a_step_leaves_no_hook_and_the_estimate_unchanged():
    model = _mlp()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    est = fimfast.DiagFisher(model, "empirical", seed=0)
    est.step((x, y))
    first = est.result()
    before = [first[k].clone() for k in first]

    def boom(module, args):
        raise RuntimeError("planted forward failure")

    h = model[2].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="planted forward failure"):
            est.step((x, y))
    finally:
        h.remove()
    assert _clean(model)
    after = est.result()
    assert after.meta["count"] == first.meta["count"] == 8 and after.meta["steps"] == 1
    for a, k in zip(before, after):
        torch.testing.assert_close(after[k], a, rtol=0, atol=0)
    est.step((x, y))  # the next step runs as usual: the sum of the same batch twice
    again = est.result()
    assert again.meta["count"] == 16 and _clean(model)
    for a, k in zip(before, again):
        torch.testing.assert_close(again[k], 2 * a, rtol=1e-6, atol=1e-7)
