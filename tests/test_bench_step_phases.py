"""benchmarks/bench_step_phases.py: rows for every wrapped function, nested within the step, and
every wrapped function put back afterwards (also when the step raises)."""

from __future__ import annotations

import pytest

import fimfast
from benchmarks import bench_step_phases
from fimfast import guard, hutchinson, prepared, state


def test_phases_of_a_hutchinson_step_nest_within_the_step(tmp_path):
    before = (hutchinson.vjp, prepared._one_probe, state.State.add_squares, guard.StepKept.__exit__)
    out = tmp_path / "phases.json"
    res = bench_step_phases.main(["--workload", "a", "--size", "tiny", "--steps", "3",
                                  "--json", str(out)])
    assert out.exists()
    names = {s.split(":")[1] for s in bench_step_phases.DEFAULT_WRAP["hutchinson"]}
    assert names | {"step", "model forward", "cold op", "warm op"} == set(res)
    assert all(v >= 0 for v in res.values())
    # nested: the guard holds the backward, the step holds everything
    assert res["vjp"] + res["StepKept.__exit__"] + res["State.add_squares"] <= res["step"]
    assert res["_one_probe"] > 0 and res["ParamWalk.of"] > 0  # the prepared step ran
    assert (hutchinson.vjp, prepared._one_probe, state.State.add_squares,
            guard.StepKept.__exit__) == before


def test_wrapped_functions_are_put_back_when_the_step_raises(monkeypatch):
    before = hutchinson.vjp

    def boom(self, b):
        raise RuntimeError("boom")

    monkeypatch.setattr(fimfast.DiagFisher, "step", boom)
    with pytest.raises(RuntimeError, match="boom"):
        bench_step_phases.run("a", "hutchinson", 1, "tiny", ["fimfast.hutchinson:vjp"])
    assert hutchinson.vjp is before


def test_phases_of_a_small_cnn_step():
    res = bench_step_phases.main(["--workload", "resnet_bn", "--type", "empirical",
                                  "--steps", "2"])
    names = {s.split(":")[1] for s in bench_step_phases.DEFAULT_WRAP["conv"]}
    assert names - {"GroupedInput.sq"} <= set(res)  # no depthwise convolution in resnet_bn
    assert res["_tap_grads"] > 0 and res["_NormRule.terms"] > 0
    assert res["_tap_grads"] + res["_chunk"] <= res["step"]
