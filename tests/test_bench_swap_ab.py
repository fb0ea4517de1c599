"""benchmarks/bench_swap_ab.py: the old function (read from the other tree's file) runs in the
old steps and the new one in the new steps, one of each per round, and the new one is put back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_swap_ab
from fimfast import ops
from fimfast.persample import prepared as prepared_ps
from fimfast.persample import replay

ROOT = Path(bench_swap_ab.__file__).resolve().parents[1]


def test_pair_reads_the_old_function_from_the_other_tree(tmp_path):
    (tmp_path / "fimfast" / "ops").mkdir(parents=True)
    src = (ROOT / "fimfast" / "ops" / "__init__.py").read_text()
    (tmp_path / "fimfast" / "ops" / "__init__.py").write_text(src + "\nOLD_TREE = True\n")
    owner, name, old, new = bench_swap_ab._pair("fimfast.ops:probe_logit_grad", tmp_path)
    assert owner is ops and name == "probe_logit_grad" and new is ops.probe_logit_grad
    assert old is not new and old.__globals__.get("OLD_TREE") is True
    owner, name, old, new = bench_swap_ab._pair("fimfast.persample.replay:Replay.capture", ROOT)
    assert owner is replay.Replay and new is replay.Replay.__dict__["capture"]
    assert old is not new and old.__qualname__ == "Replay.capture"


def test_each_round_runs_one_old_and_one_new_step(monkeypatch):
    calls: list[str] = []
    new = ops.probe_logit_grad

    def tagged(tag):
        def fn(*args, **kwargs):
            calls.append(tag)
            return new(*args, **kwargs)
        return fn

    monkeypatch.setattr(ops, "probe_logit_grad", new)  # put back after the test
    swaps = [(ops, "probe_logit_grad", tagged("old"), tagged("new"))]
    # EMPIRICAL draws its score columns through ops.probe_logit_grad once the extension's one
    # call of the prepared step is off (with it, as a one-probe HUTCHINSON step of this model, it
    # calls the extension's kernel directly: fimfast/persample/prepared.py, fimfast/prepared.py)
    monkeypatch.setattr(prepared_ps, "_HOST", [None, None])
    res = bench_swap_ab.run("a", "empirical", 4, swaps, size="tiny")
    assert ops.probe_logit_grad is swaps[0][3]  # the new one is left in place
    assert calls.count("old") == calls.count("new") == 4 + 3  # rounds and warm-up rounds
    assert all(set(calls[2 * i: 2 * i + 2]) == {"old", "new"} for i in range(7))
    assert res["rounds"] == 4 and res["diff_q25_us"] <= res["diff_median_us"] <= res["diff_q75_us"]


@pytest.mark.parametrize("fim_type", ["empirical"])
def test_main_writes_the_figures(tmp_path, fim_type):
    out = tmp_path / "ab.json"
    got = bench_swap_ab.main(["--old-tree", str(ROOT), "--swap", "fimfast.batch:batch_size",
                              "--types", fim_type, "--rounds", "2", "--size", "tiny",
                              "--json", str(out)])
    assert json.loads(out.read_text()) == got and got[0]["fim_type"] == fim_type
