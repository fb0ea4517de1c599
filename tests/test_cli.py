"""The ``fimfast`` command: run, viz, metrics, demo and bench, on a tiny test-only experiment."""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tiny_experiment as tiny
import torch
from tolerances import METRICS_ABS

import fimfast
from fimfast import cli
from fimfast.experiments import Experiment, register, runner, store, unregister
from fimfast.experiments.store import META_KEY, load_result, result_name

ROOT = Path(__file__).resolve().parent.parent
ALL_TYPES = [t.value for t in fimfast.FIMType]


@pytest.fixture(autouse=True)
def _tiny():
    tiny.register_tiny()
    yield
    tiny.unregister_tiny()


def _run(out: Path, *extra: str, types: str = "exact,hutchinson,empirical") -> int:
    return cli.main(
        [
            "run",
            tiny.NAME,
            "--fim-types",
            types,
            "--num-batches",
            "2",
            "--batch-size",
            "8",
            "--seed",
            "3",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def _name(
    t: str, nb: int = 2, bs: int = 8, seed: int = 3, reduction: str = "sum", tag: str = ""
) -> str:
    return result_name(tiny.NAME, t, nb, bs, seed, reduction, tag)


def _write(path: Path, arrays: dict, fim_type: str = "exact", **meta) -> Path:
    return store.save_result(path, arrays, {"fim_type": fim_type, "experiment": "hand", **meta})


# -- run ---------------------------------------------------------------------------------------- #
def test_run_writes_one_file_per_type_with_arrays_and_metadata(tmp_path, capsys):
    assert _run(tmp_path, types="all") == 0
    names = sorted(p.name for p in tmp_path.glob("*.npz"))
    assert names == sorted(_name(t) for t in ALL_TYPES)
    model = tiny.prepare(3).model
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for t in ALL_TYPES:
        with np.load(tmp_path / _name(t), allow_pickle=False) as z:
            files = set(z.files)
            meta = json.loads(str(z[META_KEY][()]))
            for n, s in shapes.items():
                assert z[n].shape == s and z[n].dtype == np.float32
                assert np.isfinite(z[n]).all() and (z[n] >= 0).all()
        assert files == set(shapes) | {META_KEY}
        assert meta["fim_type"] == t
        assert meta["experiment"] == tiny.NAME
        assert (meta["num_batches"], meta["batch_size"], meta["seed"]) == (2, 8, 3)
        assert meta["rows"] == 16 and meta["reduction"] == "sum"
        assert meta["model"] == "MLP 64-8-10 sigmoid" and meta["dataset"] == "400 digits"
        assert meta["fimfast_version"] == fimfast.__version__
        assert meta["seconds_per_batch"] > 0 and meta["options"]["seed"] == meta["estimator_seed"]
        assert meta["options"]["top_k"] == (1 if t == "hutchinson_rank1" else 2)
        assert "train_accuracy" in meta["training"]
    out = capsys.readouterr().out
    assert out.count("wrote ") == len(ALL_TYPES)


@pytest.mark.parametrize("fim_type", ["exact", "hutchinson", "monte_carlo"], ids=str)
def test_run_equals_the_library_on_the_same_batches(tmp_path, fim_type):
    assert _run(tmp_path, "--reduction", "mean", types=fim_type) == 0
    setup = tiny.prepare(3)
    ref = fimfast.diag_fisher(
        setup.model,
        setup.batches(2, 8, 3),
        fim_type,
        reduction="mean",
        seed=runner.type_seed(3, fim_type),
    )
    got = load_result(tmp_path / _name(fim_type, reduction="mean"))
    assert list(got.arrays) == list(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(got.arrays[k], v.numpy())


def test_run_options_reach_the_estimator_and_metadata(tmp_path):
    assert (
        _run(
            tmp_path,
            "--num-probes",
            "3",
            "--top-k",
            "4",
            "--rankk-solver",
            "power",
            types="hutchinson_rankk",
        )
        == 0
    )
    meta = load_result(tmp_path / _name("hutchinson_rankk", tag="probes3_k4_power30")).meta
    assert meta["options"]["num_probes"] == 3 and meta["options"]["top_k"] == 4
    assert meta["options"]["rankk_solver"] == "power"
    assert meta["cli_options"] == {"num_probes": 3, "top_k": 4, "rankk_solver": "power"}


def test_resume_skips_finished_files_and_redoes_missing_or_bad_ones(tmp_path, capsys):
    assert _run(tmp_path) == 0
    first = {p.name: p.read_bytes() for p in tmp_path.glob("*.npz")}
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")}
    capsys.readouterr()
    assert _run(tmp_path, "--resume") == 0
    out = capsys.readouterr().out
    assert out.count("skip ") == 3 and "wrote" not in out
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")} == mtimes
    # a missing file is recomputed, identically (each type has its own seed)
    (tmp_path / _name("hutchinson")).unlink()
    (tmp_path / _name("empirical")).write_bytes(b"not a zip file")
    assert _run(tmp_path, "--resume") == 0
    out = capsys.readouterr().out
    assert out.count("skip ") == 1 and out.count("wrote ") == 2 and "redo" in out
    for name in (_name("hutchinson"), _name("empirical")):
        a = load_result(tmp_path / name).arrays
        b = np.load(__import__("io").BytesIO(first[name]), allow_pickle=False)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # other options that change an estimate: a file of its own; the earlier one stays as it was
    hutch = (tmp_path / _name("hutchinson")).read_bytes()
    assert _run(tmp_path, "--resume", "--num-probes", "2", types="hutchinson,exact") == 0
    out = capsys.readouterr().out
    assert f"skip  {tmp_path / _name('exact')}" in out  # EXACT does not depend on --num-probes
    assert out.count("wrote ") == 1
    assert (
        load_result(tmp_path / _name("hutchinson", tag="probes2")).meta["options"]["num_probes"]
        == 2
    )
    assert (tmp_path / _name("hutchinson")).read_bytes() == hutch
    # options that change only rounding (backend, class chunk) do not make a file stale
    assert _run(tmp_path, "--resume", "--class-chunk", "3", "--backend", "torch") == 0
    out = capsys.readouterr().out
    assert out.count("skip ") == 3 and "wrote" not in out
    # a file whose metadata disagrees with its name is redone
    f = load_result(tmp_path / _name("exact"))
    _write(tmp_path / _name("exact"), f.arrays, **{**f.meta, "reduction": "mean"})
    assert _run(tmp_path, "--resume", types="exact") == 0
    assert "written with other options" in capsys.readouterr().out


def test_option_tags_name_only_what_changes_an_estimate():
    tag = runner.option_tag
    assert [tag(t, {}) for t in ALL_TYPES] == [""] * len(ALL_TYPES)
    opts = {"num_probes": 3, "top_k": 4, "rankk_solver": "power", "lr_power_itrs": 7}
    assert tag("exact", opts) == "" and tag("empirical", opts) == ""
    assert tag("monte_carlo", opts) == "probes3" and tag("hutchinson_dg", opts) == "probes3"
    assert tag("hutchinson_rankk", opts) == "probes3_k4_power7"
    assert tag("hutchinson_rank1", opts) == "probes3_power7"  # RANK1 keeps k = 1
    assert tag("hutchinson_rankk", {"backend": "torch", "class_chunk": 2}) == ""
    assert tag("hutchinson_rankk", {"lr_power_itrs": 7}) == ""  # the exact solver has no steps
    assert _name("hutchinson", reduction="mean", tag="probes2") == (
        f"{tiny.NAME}_hutchinson_nb2_bs8_seed3_mean_probes2.npz"
    )


def test_result_files_and_model_cache_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert _run(tmp_path, types="hutchinson") == 0
    finally:
        os.umask(old)
    written = [*tmp_path.glob("*.npz"), *tmp_path.glob("*.safetensors")]
    assert len(written) == 2
    for p in written:
        assert p.stat().st_mode & 0o777 == 0o640, (p, oct(p.stat().st_mode))
    old = os.umask(0o002)
    try:
        p = _write(tmp_path / "x.npz", {"w": np.ones(3, np.float32)})
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o664
    assert store.new_file_mode() == 0o666 & ~old


def test_top_k_too_large_is_refused_before_training(tmp_path, capsys):
    def prepare(*a, **k):
        raise AssertionError("the experiment was prepared (trained) before the check")

    register(Experiment("ten_classes", "test", prepare, num_classes=10), replace=True)
    try:
        code = cli.main(["run", "ten_classes", "--top-k", "50", "--out", str(tmp_path)])
        assert code == 2
        err = capsys.readouterr().err
        assert "argument --top-k:" in err and "at most C-1 = 9" in err and "got 50" in err
        assert "fim_opts" not in err
        # the demo checks the same, before training
        code = cli.main(
            ["demo", "--experiment", "ten_classes", "--top-k", "10", "--out", str(tmp_path)]
        )
        assert code == 2 and "argument --top-k:" in capsys.readouterr().err
        # without hutchinson_rankk, --top-k is unused and not checked
        with pytest.raises(AssertionError, match="prepared"):
            cli.main(["run", "ten_classes", "--top-k", "50", "--fim-types", "exact"])
    finally:
        unregister("ten_classes")
    # an experiment that does not declare C: checked once prepared, before any estimate
    code = _run(tmp_path, "--top-k", "10", types="exact,hutchinson_rankk")
    assert code == 2
    err = capsys.readouterr().err
    assert "argument --top-k:" in err and "C-1 = 9" in err
    assert not list(tmp_path.glob("*.npz"))


def test_resume_loads_the_cached_network(tmp_path):
    assert _run(tmp_path, types="hutchinson") == 0
    cache = tmp_path / f"{tiny.NAME}_seed3_model.safetensors"
    assert cache.is_file()
    assert _run(tmp_path, types="exact") == 0
    assert load_result(tmp_path / _name("exact")).meta["training"]["from_cache"] is True


def test_ctrl_c_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    real = runner.estimate
    calls = []

    def interrupted(setup, fim_type, *a, **k):
        calls.append(fim_type)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(setup, fim_type, *a, **k)

    monkeypatch.setattr(runner, "estimate", interrupted)
    assert _run(tmp_path) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".npz") == [_name("exact")]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    load_result(tmp_path / _name("exact"))  # the finished one is complete


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def savez(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(store.np, "savez", savez)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "x.npz", {"w": np.ones(3, np.float32)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fim-types", "exact,bogus"], "fim-types"),
        (["--num-batches", "0"], "num-batches"),
        (["--batch-size", "x"], "batch-size"),
        (["--reduction", "median"], "reduction"),
    ],
    ids=["bad-type", "zero-batches", "bad-batch-size", "bad-reduction"],
)
def test_run_rejects_bad_arguments(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", tiny.NAME, "--out", str(tmp_path), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_run_rejects_unknown_experiment(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "no_such_experiment"])
    err = capsys.readouterr().err
    assert "no_such_experiment" in err and "mnist_mlp" in err


def test_run_rejects_a_batch_larger_than_the_data(tmp_path, capsys):
    code = cli.main(
        [
            "run",
            tiny.NAME,
            "--batch-size",
            "500",
            "--num-batches",
            "1",
            "--fim-types",
            "hutchinson",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "batch_size must be <= 400" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.npz"))


# -- reading files ------------------------------------------------------------------------------ #
def test_corrupted_or_pickled_files_are_refused(tmp_path, capsys):
    good = _write(tmp_path / "good.npz", {"w": np.ones(3, np.float32)})
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(good.read_bytes()[:40])
    pickled = tmp_path / "pickled.npz"
    np.savez(
        pickled,
        w=np.array([{"evil": 1}], dtype=object),
        **{META_KEY: np.array(json.dumps({"format": store.FORMAT}))},
    )
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, w=np.ones(3))
    text = tmp_path / "README.md"
    text.write_text("# not a result file\n")
    cases = [
        (text, "not a .npz file (it does not start with the zip signature"),
        (corrupt, "not a valid .npz"),
        (pickled, "pickled"),
        (foreign, "not a fimfast result file"),
        (tmp_path / "missing.npz", "no such file"),
    ]
    for path, message in cases:
        with pytest.raises(store.ResultFileError, match=re.escape(message)):
            load_result(path)
        assert cli.main(["metrics", str(path), "--gt", str(good)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(path) in err
        assert cli.main(["viz", str(path), "--out", str(tmp_path / "v.png")]) == 2
        err = capsys.readouterr().err
        assert message in err
        if path is not pickled:
            assert "pickled Python objects" not in err
    assert zipfile.is_zipfile(good)


# -- metrics ------------------------------------------------------------------------------------ #
def test_metrics_known_answers(tmp_path, capsys):
    g = {
        "a.weight": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
        "a.bias": np.array([1.0, 1.0], np.float32),
    }
    gt = _write(tmp_path / "gt.npz", g, "exact")
    double = _write(tmp_path / "double.npz", {k: 2 * v for k, v in g.items()}, "hutchinson_dg")
    rev = _write(
        tmp_path / "rev.npz",
        {
            "a.weight": np.array([[4.0, 3.0], [2.0, 1.0]], np.float32),
            "a.bias": np.array([1.0, 1.0], np.float32),
        },
        "empirical",
    )
    out = tmp_path / "m" / "metrics.json"
    assert cli.main(["metrics", str(double), str(rev), "--gt", str(gt), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hutchinson_dg" in printed and "a.weight" in printed
    rows = json.loads(out.read_text())["rows"]
    by = {(r["type"], r["param"]): r for r in rows}
    d = by[("hutchinson_dg", "ALL")]
    assert d["numel"] == 6
    for k, v in {"rel_l2": 1.0, "cosine": 1.0, "spearman": 1.0, "ratio_of_means": 2.0}.items():
        assert abs(d[k] - v) < METRICS_ABS, k
    w = by[("empirical", "a.weight")]
    # a = (4,3,2,1), g = (1,2,3,4): ||a-g|| = sqrt(20), ||g|| = sqrt(30), a.g = 20
    assert abs(w["rel_l2"] - np.sqrt(20 / 30)) < METRICS_ABS
    assert abs(w["cosine"] - 20 / 30) < METRICS_ABS
    assert abs(w["spearman"] + 1.0) < METRICS_ABS
    assert abs(w["ratio_of_means"] - 1.0) < METRICS_ABS
    b = by[("empirical", "a.bias")]
    assert b["rel_l2"] == 0.0 and b["spearman"] is None  # constant vectors: no rank correlation
    csv_rows = (out.with_suffix(".csv")).read_text().splitlines()
    assert csv_rows[0] == "file,type,param,numel,rel_l2,cosine,spearman,ratio_of_means"
    assert len(csv_rows) == 1 + len(rows) == 1 + 2 * 3


def test_metrics_leave_out_the_reference_and_print_three_significant_digits(tmp_path, capsys):
    g = {"w": np.array([1.0, 2.0, 3.0, 4.0], np.float32)}
    gt = _write(tmp_path / "exact.npz", g, "exact")
    est = _write(tmp_path / "est.npz", {"w": g["w"] * np.float32(1.25)}, "hutchinson")
    assert cli.main(["metrics", str(gt), str(est), "--gt", str(gt), "--overall-only"]) == 0
    out = capsys.readouterr().out
    assert f"left out {gt}: it is the reference" in out
    table = out.split("-\n", 1)[1].split("wrote")[0]  # the rows, below the header's rule
    assert "exact.npz" not in table and "exact " not in table
    rows = json.loads((tmp_path / "metrics.json").read_text())["rows"]
    assert {r["type"] for r in rows} == {"hutchinson"}
    line = next(x for x in table.splitlines() if x.startswith("est.npz"))
    # rel_l2 0.25, cosine 1, spearman 1, ratio 1.25: all with three significant digits
    assert line.split()[-4:] == ["0.250", "1.00", "1.00", "1.25"]
    assert cli.main(["metrics", str(gt), "--gt", str(gt)]) == 2
    assert "other than the reference" in capsys.readouterr().err
    from fimfast.experiments.metrics import format_table

    t = format_table([{"a": 1e-7, "b": 123456.0, "c": float("nan"), "d": 3}], "abcd")
    assert t.splitlines()[2].split() == ["1.00e-7", "1.23e+5", "nan", "3"]


def test_metrics_default_output_and_layout_mismatch(tmp_path, capsys):
    gt = _write(tmp_path / "gt.npz", {"w": np.ones(4, np.float32)})
    est = _write(tmp_path / "est.npz", {"w": np.ones(4, np.float32)}, "hutchinson")
    assert cli.main(["metrics", str(est), "--gt", str(gt), "--overall-only"]) == 0
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "metrics.json").is_file()
    other = _write(tmp_path / "other.npz", {"v": np.ones(4, np.float32)}, "hutchinson")
    assert cli.main(["metrics", str(other), "--gt", str(gt)]) == 2
    assert "differ from the reference" in capsys.readouterr().err
    shaped = _write(tmp_path / "shaped.npz", {"w": np.ones((2, 2), np.float32)}, "hutchinson")
    assert cli.main(["metrics", str(shaped), "--gt", str(gt)]) == 2
    assert "shape" in capsys.readouterr().err
    assert cli.main(["metrics", str(est), "--gt", str(gt), "--out", str(tmp_path / "m.txt")]) == 2
    assert "--out must end in .csv or .json" in capsys.readouterr().err


# -- viz ---------------------------------------------------------------------------------------- #
def test_viz_writes_a_png_with_several_files_overlaid(tmp_path, capsys):
    assert _run(tmp_path, types="exact,hutchinson") == 0
    zeros = _write(
        tmp_path / "zeros.npz",
        {n: np.zeros_like(a) for n, a in load_result(tmp_path / _name("exact")).arrays.items()},
        "empirical",
    )
    png = tmp_path / "plots" / "hist.png"
    files = [str(tmp_path / _name("exact")), str(tmp_path / _name("hutchinson")), str(zeros)]
    assert cli.main(["viz", *files, "--out", str(png)]) == 0
    assert str(png) in capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 300 and img.std() > 0
    assert cli.main(["viz", files[0]]) == 0
    assert (tmp_path / "histograms.png").is_file()


def _hist_lines(fig):
    """{(panel title, legend label): patch} of every histogram outline of a figure."""
    out = {}
    for ax in fig.axes:
        for patch in ax.patches:
            out[(ax.get_title().split("  ")[0], patch.get_label())] = patch
    return out


def test_each_estimator_has_one_colour_in_every_figure_and_exact_is_on_top(tmp_path):
    from matplotlib.colors import to_rgba

    from fimfast.experiments import plots

    rng = np.random.default_rng(0)
    arrays = {"w": rng.random((4, 5)).astype(np.float32) + 0.1}
    made = {
        t: load_result(_write(tmp_path / f"{t}.npz", arrays, t))
        for t in ("hutchinson", "exact", "empirical")
    }
    for order in (["hutchinson", "exact", "empirical"], ["empirical", "hutchinson", "exact"]):
        fig = plots.histogram_figure([made[t] for t in order])
        lines = _hist_lines(fig)
        for t in order:
            for panel in ("all parameters", "w"):
                assert to_rgba(lines[(panel, t)].get_edgecolor()) == to_rgba(plots.COLORS[t])
        ref = lines[("w", "exact")]
        assert ref.get_zorder() > max(lines[("w", t)].get_zorder() for t in order if t != "exact")
        offset, dashes = ref.get_linestyle()  # dashed, so curves on top of it stay visible
        assert dashes is not None and len(dashes) == 2
        assert lines[("w", "hutchinson")].get_linestyle() in ("solid", "-", (0, None))
        assert [t.get_text() for t in fig.legends[0].get_texts()] == order
    out = tmp_path / "conv.png"
    plots.convergence({"empirical": [(1, 0.5), (2, 0.4)], "hutchinson": [(1, 1.0)]}, out)
    assert out.is_file()
    fig = plots._figure(1, 1)  # the convergence figure uses the same colours: check its lines
    ax = fig.add_subplot(1, 1, 1)
    st = plots._style("hutchinson")
    ax.plot([1], [1], color=st["color"])
    assert to_rgba(ax.lines[0].get_color()) == to_rgba(plots.COLORS["hutchinson"])
    assert len(set(plots.COLORS.values())) == len(plots.COLORS) == len(ALL_TYPES)


def test_histogram_axis_is_clipped_and_zeros_are_counted_once(tmp_path):
    from fimfast.experiments import plots

    rng = np.random.default_rng(1)
    w = (10.0 ** rng.uniform(-6, -2, 20000)).astype(np.float32)
    w[:5] = 1e-35  # a few tiny values far below the bulk
    w[5:105] = 0.0  # 100 zeros
    files = [
        load_result(_write(tmp_path / f"{t}.npz", {"w": w}, t))
        for t in ("exact", "hutchinson", "empirical")
    ]
    fig = plots.histogram_figure(files)
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert -6.1 < lo < -5.9 and abs(hi - np.log10(w.max())) < 1e-6
    label = ax.get_xlabel()
    assert label.count("100 zero entries") == 1 and "in every file" in label
    below = int((np.log10(w[w > 0]) < lo).sum())
    assert f"{below} entries below 10^{lo:.1f} not shown in every file" in label
    assert 180 <= below <= 220  # the 1% quantile: about 200 of the 19,895 positive entries
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["exact", "hutchinson", "empirical"]  # no counts repeated in the legend
    # different zero counts are listed per file, once
    w2 = w.copy()
    w2[105:110] = 0.0
    files[2] = load_result(_write(tmp_path / "e2.npz", {"w": w2}, "empirical"))
    label = plots.histogram_figure(files).axes[0].get_xlabel()
    assert "zero entries (no log): exact 100, hutchinson 100, empirical 105" in label


# -- demo --------------------------------------------------------------------------------------- #
def test_demo_on_the_tiny_experiment_writes_everything(tmp_path, capsys):
    code = cli.main(
        [
            "demo",
            "--experiment",
            tiny.NAME,
            "--num-batches",
            "4",
            "--batch-size",
            "8",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--top-k",
            "2",
        ]
    )
    out = capsys.readouterr().out
    checks = json.loads((tmp_path / "checks.json").read_text())
    # seeded: on 4 tiny batches every claim holds (EMPIRICAL's bias shows in its paired traces,
    # z beyond 3, before its error curve flattens)
    assert [c["result"] for c in checks["claims"]] == ["PASS"] * 6, checks
    assert code == 0
    for word in ("Metrics against EXACT", "Claims:", "Bounds per parameter", "demo finished"):
        assert word in out
    for t in ALL_TYPES:
        assert (tmp_path / result_name(tiny.NAME, t, 4, 8, 42, "mean")).is_file()
    for f in (
        "histograms.png",
        "convergence.png",
        "convergence.csv",
        "metrics.csv",
        "metrics.json",
        "checks.json",
    ):
        assert (tmp_path / f).stat().st_size > 0, f
    conv = (tmp_path / "convergence.csv").read_text().splitlines()
    assert conv[0] == "type,batches,windows,rel_l2_rms,rel_l2_first,ratio_of_means_first"
    assert len(conv) == 1 + 7 * 3  # 7 estimators x B in (1, 2, 4)
    assert len(checks["bounds"]) == 4  # 2 Linear layers x (weight, bias)
    # without EMPIRICAL and the bounds, every claim holds: exit status 0
    out_ok = tmp_path / "ok"
    code = cli.main(
        [
            "demo",
            "--experiment",
            tiny.NAME,
            "--num-batches",
            "4",
            "--batch-size",
            "8",
            "--out",
            str(out_ok),
            "--no-progress",
            "--fim-types",
            "hutchinson,monte_carlo,hutchinson_sqrt",
        ]
    )
    checks = json.loads((out_ok / "checks.json").read_text())
    assert [c["result"] for c in checks["claims"]] == ["PASS"] * 4 and code == 0


def test_demo_bounds_are_judged_by_the_noise_of_their_estimates():
    """DG, RANKK and RANK1 are random estimates of the bounds: a pair out of order by less than
    Z_MAX standard errors of its per-batch differences is noise (the claim INCONCLUSIVE), beyond
    them it contradicts the claim (FAIL, the demo's exit status 1)."""
    from types import SimpleNamespace

    from fimfast import FIMType
    from fimfast.experiments import demo

    rng = np.random.default_rng(0)
    exact = 1.0 + 0.1 * rng.standard_normal(64)

    z = rng.standard_normal(64)
    z = (z - z.mean()) / z.std(ddof=1)  # the per-batch differences: shift + noise * z

    def run(shift, noise):
        per = {FIMType.EXACT: exact, FIMType.HUTCHINSON_DG: exact * 2,
               FIMType.HUTCHINSON_RANKK: exact + shift + noise * z,
               FIMType.HUTCHINSON_RANK1: exact * 0.5}
        results = {t: SimpleNamespace(batch_param_traces=[{"w": float(x)} for x in v])
                   for t, v in per.items()}
        loaded = [SimpleNamespace(meta={"fim_type": t.value}, arrays={"w": np.array([v.sum()])})
                  for t, v in per.items()]
        return demo._bounds(loaded, results)[0]["ok"]

    assert run(-0.1, 0.1) == "yes"
    assert run(0.01, 0.5) == "noise"  # RANKK above EXACT by 0.16 standard errors
    assert run(0.05, 0.1) == "NO"  # by 4
    assert demo._verdict(True, False) == "PASS" and demo._verdict(False, True) == "FAIL"
    assert demo._verdict(False, False) == "INCONCLUSIVE"


def test_demo_window_errors_match_a_direct_computation(tmp_path):
    from fimfast.experiments import demo, metrics

    exact_cum: list[np.ndarray] = []
    rng = np.random.default_rng(0)
    g = [rng.random(5) for _ in range(4)]
    a = [x * rng.uniform(0.5, 1.5, 5) for x in g]
    hook_e = demo._Cumulative(exact_cum)
    for i, v in enumerate(g, 1):
        hook_e(i, v)
    w = demo._Windows([1, 2, 4], exact_cum)
    for i, v in enumerate(a, 1):
        w(i, v)
    rows = {r["batches"]: r for r in w.rows()}
    want2 = [
        metrics.compare(a[0] + a[1], g[0] + g[1])["rel_l2"],
        metrics.compare(a[2] + a[3], g[2] + g[3])["rel_l2"],
    ]
    assert rows[2]["windows"] == 2
    assert abs(rows[2]["rel_l2_rms"] - np.sqrt(np.mean(np.square(want2)))) < METRICS_ABS
    assert abs(rows[2]["rel_l2_first"] - want2[0]) < METRICS_ABS
    assert abs(rows[4]["rel_l2_first"] - metrics.compare(sum(a), sum(g))["rel_l2"]) < METRICS_ABS
    assert demo.snapshot_points(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert demo.snapshot_points(10) == [1, 2, 4, 8, 10]


def test_bad_dataset_checksum_is_refused_by_run(tmp_path, monkeypatch, capsys):
    from fimfast.experiments import data

    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(b"\x1f\x8b not mnist")
    monkeypatch.setattr(data, "mnist_path", lambda: fake)
    code = cli.main(["run", "mnist_mlp", "--num-batches", "1", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "SHA-256" in err and data.MNIST_SHA256 in err and "refusing to unpickle" in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.npz"))


# -- help, entry points, bench ------------------------------------------------------------------ #
def test_help_texts(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "viz", "metrics", "demo", "bench"):
        assert cmd in out
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    for word in (
        "mnist_mlp",
        "mnist_cnn",
        "minilm_text",
        "digits_mlp",
        "--resume",
        "allow_pickle",
        "hutchinson_rankk",
    ):
        assert word in out
    assert cli.main([]) == 2


def test_python_dash_m_entry_points(monkeypatch, capsys):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "fimfast.cli", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0 and fimfast.__version__ in r.stdout, r.stderr
    monkeypatch.setattr(sys, "argv", ["fimfast", "--version"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("fimfast", run_name="__main__")  # python -m fimfast
    assert e.value.code == 0 and fimfast.__version__ in capsys.readouterr().out


def test_bench_without_the_benchmarks_module(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["bench"]) == 2
    assert "benchmarks module is not available" in capsys.readouterr().err


def test_unknown_option_is_reported_by_the_subcommand(capsys):
    for argv, usage in (
        (["run", tiny.NAME, "--bogus"], "usage: fimfast run "),
        (["viz", "a.npz", "--bogus"], "usage: fimfast viz "),
        (["demo", "--bogus", "1"], "usage: fimfast demo "),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(usage), err
        assert "unrecognized arguments: --bogus" in err
        assert "usage: fimfast [-h]" not in err


def test_run_and_demo_say_where_their_defaults_differ(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    demo = " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    run = " ".join(capsys.readouterr().out.split())
    assert "(default mean; `fimfast run`: sum)" in demo
    assert "(default sum; `fimfast demo`: mean)" in run
    assert "(default 1; `fimfast run`: torch's choice)" in demo
    assert "(default torch's choice; `fimfast demo`: 1)" in run
    assert "Defaults that differ from `fimfast run`" in demo
    # both take the same estimator options, declared once
    for flag in (
        "--num-probes",
        "--top-k",
        "--rankk-solver",
        "--lr-power-itrs",
        "--backend",
        "--class-chunk",
    ):
        assert flag in demo and flag in run


def test_bench_forwards_its_arguments(tmp_path, monkeypatch):
    pkg = tmp_path / "benchmarks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(
        "import sys, pathlib\npathlib.Path('args.txt').write_text(' '.join(sys.argv[1:]))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["bench", "--", "--quick", "x"]) == 0
    assert (tmp_path / "args.txt").read_text() == "--quick x"
    # as documented: the arguments after `bench` go to the benchmarks as they are
    assert cli.main(["bench", "--quick", "--threads", "1"]) == 0
    assert (tmp_path / "args.txt").read_text() == "--quick --threads 1"
    assert cli.main(["bench", "--", "--help"]) == 0
    assert (tmp_path / "args.txt").read_text() == "--help"
    with pytest.raises(SystemExit) as e:  # fimfast's own help for the command
        cli.main(["bench", "--help"])
    assert e.value.code == 0


def test_torch_global_rng_untouched_by_a_run(tmp_path):
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    assert _run(tmp_path, types="hutchinson") == 0
    np.testing.assert_array_equal(torch.rand(3).numpy(), want.numpy())


def test_threads_option_is_recorded_and_given_back(tmp_path):
    before = torch.get_num_threads()
    assert _run(tmp_path, "--threads", "1", types="hutchinson") == 0
    assert torch.get_num_threads() == before
    assert load_result(tmp_path / _name("hutchinson")).meta["threads"] == 1
