"""benchmarks/bench_persample_fixed.py: a fit and a phase table per workload, the timed phases
nested within the step, every wrapped function put back afterwards (also when the step raises)."""

from __future__ import annotations

import pytest

from benchmarks import bench_persample_fixed as bench


def _wrapped():
    return [getattr(owner, name) for owner, name, _ in bench._phase_fns()]


def test_rows_of_a_small_cnn_and_the_functions_put_back():
    before = _wrapped()
    lines, prof = bench.run("resnet_bn", "empirical", [2, 4], steps=3, profile_steps=2)
    assert _wrapped() == before
    assert sum(" | fit | " in line for line in lines) == 1
    labels = [label for _, _, label in bench._phase_fns()]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    for label in (*labels, "step", "forward and its checks"):
        assert label in rows
    assert "ATen operators" in prof and "resnet_bn empirical N=4" in prof


def test_phases_nest_within_the_step():
    import torch

    import fimfast
    from benchmarks.bench_persample_cost import small_cnn

    torch.manual_seed(0)
    model, batch = small_cnn("groupnorm_cnn", 2)
    est = fimfast.DiagFisher(model, "empirical")
    est.step(batch)
    res = bench._phases(lambda: est.step(batch), 3)
    assert all(v >= 0 for v in res.values())
    est_label = "estimate (after the forward and its checks)"
    assert res[est_label] <= res["step"] and res["rules' terms and squares"] <= res[est_label]
    assert res["convolutions' unfolded patches"] > 0 and res["norms' terms"] > 0


def test_wrapped_functions_are_put_back_when_the_step_raises():
    before = _wrapped()

    def boom():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        bench._phases(boom, 2)
    assert _wrapped() == before
