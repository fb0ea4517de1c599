"""benchmarks/bench_gpt2.py in its tiny configuration: every method runs, the figures are written,
and the closed-form checks on the tied head hold (seconds)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytest.importorskip("transformers")

from benchmarks import bench_gpt2  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2") / "tiny.json"
    res = bench_gpt2.main(["--config", "tiny", "--batch", "2", "--seq-len", "12", "--rounds", "2",
                           "--threads", "1", "--json", str(path)])
    return res, path


def test_tiny_run_writes_every_figure(tiny):
    res, path = tiny
    assert json.loads(path.read_text())["config"]["rows"] == 2 * 11
    md = path.with_suffix(".md").read_text()
    have_cl = importlib.util.find_spec("curvlinops") is not None
    for name in bench_gpt2.DEFAULT_METHODS:
        r = res["methods"][name]
        if name.startswith("cl_") and not have_cl:
            assert r["status"] == "error", r
            continue
        assert r["status"] == "ok", (name, r)
        assert len(r["times_s"]) == 2 and r["time_s"] > 0 and r["peak_extra_mb"] is not None
        assert r["ops_per_call"] > r["views_per_call"] >= 0
        assert f"| {name} | " in md
    assert res["methods"]["train"]["ratio_to_train"] == 1.0
    # EXACT: V columns per position with a label
    assert res["exact_not_run"]["backward_columns_per_sequence"] == 11 * 512
    assert res["provenance"]["torch_threads"] == 1 and res["provenance"]["fimfast_git_sha"]


def test_tiny_run_checks_the_tied_head_in_closed_form(tiny):
    """EMPIRICAL is deterministic: its tied-weight rows absent from the batch equal
    sum_r p_rv^2 h_rj^2 to float32 rounding; the random estimators' sums over those rows are near
    sum_r p_rv (1 - p_rv) h_rj^2 (hundreds of rows: a one-draw error of a few percent)."""
    checks = tiny[0]["checks"]
    assert checks["free_vocabulary_rows"] > 400
    for name in bench_gpt2.FIMFAST:
        c = checks[name]
        assert c["finite"] and c["nonnegative"] and c["steps"] == 4, (name, c)  # 1 + 1 + 2
    assert checks["empirical"]["rel_err_free_rows"] < 1e-6
    for name in ("hutchinson", "hutchinson_lm_head", "monte_carlo", "monte_carlo_seq"):
        assert checks[name]["rel_err_sum_free_rows"] < 0.2, (name, checks[name])
    # same seed, same signs: the head path is the unfused estimate to float32 rounding
    assert abs(checks["hutchinson"]["rel_err_sum_free_rows"]
               - checks["hutchinson_lm_head"]["rel_err_sum_free_rows"]) < 1e-5


def test_seq_len_beyond_the_positions_is_refused():
    with pytest.raises(ValueError, match="--seq-len 64 exceeds the 32 positions"):
        bench_gpt2.build("tiny", 2, 64)
