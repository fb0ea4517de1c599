"""benchmarks/bench_hutchinson_floor.py on a tiny workload: every variant timed in every round,
the paired ratios and differences reported, the hooks removed and the extension's fold put
back."""

from __future__ import annotations

import torch

from benchmarks import bench_hutchinson_floor
from fimfast import prepared


def test_every_variant_runs_and_the_model_is_left_as_it_was(tmp_path):
    fold = prepared._host()[2]
    res = bench_hutchinson_floor.main(["--workload", "a", "--size", "tiny", "--rounds", "3",
                                       "--out", str(tmp_path / "r")])
    want = {"floor", "floor:lean", "floor+sgd", "floor+optim", "step", "bare", "bare:noacc",
            "bare:hook-fold", "bare:hook-noop"} | ({"step:addcmul"} if fold else set())
    assert set(res["variants"]) == want
    assert res["variants"]["floor"]["ratio_median"] == 1.0
    assert all(v["median_us"] > 0 for v in res["variants"].values())
    assert "bare - bare:noacc" in res and ("step - step:addcmul" in res) == bool(fold)
    assert (tmp_path / "r.json").exists()
    assert prepared._HOST[2] is fold


def test_the_hooks_are_gone_after_the_run():
    seen = []
    real = torch.Tensor.register_hook

    def spy(self, hook):
        h = real(self, hook)
        seen.append((self, h))
        return h

    torch.Tensor.register_hook = spy
    try:
        bench_hutchinson_floor.run("a", 2, size="tiny")
    finally:
        torch.Tensor.register_hook = real
    assert seen
    for p, _ in seen:
        assert not p._backward_hooks


def test_variants_picks_the_floor_and_those_named():
    res = bench_hutchinson_floor.run("a", 2, size="tiny", only=("bare", "bare:noacc"))
    assert set(res["variants"]) == {"floor", "bare", "bare:noacc"}
    assert set(k for k in res if " - " in k) == {"bare - bare:noacc", "bare:noacc - floor"}
