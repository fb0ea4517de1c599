"""Adversarial checks, sixth round: ``fimfast metrics`` (and the demo's metrics, the same
function) on result files whose numbers cannot be compared with the reference: non-finite
entries (Spearman's ranks would put a NaN last and answer a finite correlation) and files of
another run than the reference (another reduction, experiment, seed, batches or rows: their
``rel_l2`` and ``ratio_of_means`` would mix the estimator's error with a change of scale or of
data). Each is refused, naming the file and what differs; files of the same run are compared as
before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fimfast import cli
from fimfast.experiments import metrics, store

RUN = {"experiment": "digits_mlp", "reduction": "sum", "seed": 3, "num_batches": 2,
       "batch_size": 8, "rows": 16}
G = {"a.weight": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
     "a.bias": np.array([0.5, 1.5], np.float32)}


def _write(path: Path, arrays: dict, fim_type: str = "exact", **meta) -> Path:
    return store.save_result(path, arrays, {"fim_type": fim_type, **{**RUN, **meta}})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_entry_is_refused_naming_file_and_parameter(tmp_path, capsys, bad):
    gt = _write(tmp_path / "gt.npz", G)
    w = G["a.weight"].copy()
    w[0, 0] = bad  # ranks: a NaN sorts last, the correlation stays finite (-0.2 here)
    est = _write(tmp_path / "est.npz", {"a.weight": w, "a.bias": G["a.bias"]}, "hutchinson")
    assert cli.main(["metrics", str(est), "--gt", str(gt)]) == 2
    err = capsys.readouterr().err
    assert "est.npz" in err and "a.weight" in err and "not finite" in err
    assert not (tmp_path / "metrics.csv").exists()
    # the reference too
    assert cli.main(["metrics", str(gt), "--gt", str(est)]) == 2
    assert "a.weight" in capsys.readouterr().err


@pytest.mark.parametrize("key,value", [("reduction", "mean"), ("experiment", "mnist_mlp"),
                                       ("seed", 4), ("num_batches", 3), ("batch_size", 4),
                                       ("rows", 15)])
def test_a_file_of_another_run_is_refused(tmp_path, capsys, key, value):
    gt = _write(tmp_path / "gt.npz", G)
    # a "mean" file of the same run is the sum / 16: rel_l2 0.94, ratio_of_means 1/16, cosine 1
    scaled = {k: v / 16 for k, v in G.items()}
    est = _write(tmp_path / "est.npz", scaled, "hutchinson", **{key: value})
    assert cli.main(["metrics", str(est), "--gt", str(gt)]) == 2
    err = capsys.readouterr().err
    assert "est.npz" in err and key in err and repr(value) in err
    with pytest.raises(ValueError, match=key):
        metrics.compare_files([store.load_result(est)], store.load_result(gt))


def test_files_of_the_same_run_are_compared(tmp_path):
    gt = _write(tmp_path / "gt.npz", G)
    est = _write(tmp_path / "est.npz", {k: 2 * v for k, v in G.items()}, "hutchinson_dg",
                 seconds_per_batch=0.1, estimator_seed=99, options={"num_probes": 4})
    rows = metrics.compare_files([store.load_result(est)], store.load_result(gt))
    top = rows[0]
    assert top["param"] == "ALL"
    assert abs(top["rel_l2"] - 1.0) < 1e-12 and abs(top["ratio_of_means"] - 2.0) < 1e-12
    assert abs(top["spearman"] - 1.0) < 1e-12
    # a hand-made file that does not say its run is compared as before
    bare = store.save_result(tmp_path / "bare.npz", G, {"fim_type": "exact"})
    assert metrics.compare_files([store.load_result(bare)], store.load_result(gt))[0][
        "rel_l2"] == 0.0
