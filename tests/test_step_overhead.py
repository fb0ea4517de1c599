"""The per-step fast paths: the parameter walk, the fused square-and-add of one-probe steps, and
the single host sync of the row checks. Each is checked against a plain reference."""

from __future__ import annotations

import pytest
import torch

import fimfast
from benchmarks.opcount import OpCounter
from fimfast import batch as batchlib
from fimfast import finite, likelihoods, ops
from fimfast.estimator import trainable_parameters
from fimfast.step import Squares


def _reference_params(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class _Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = self.a  # the same module twice
        self.c = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), None)
        self.emb = torch.nn.Embedding(5, 4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.weight.requires_grad_(False)
        self.register_parameter("none", None)
        self.scale = torch.nn.Parameter(torch.ones(()))


@pytest.mark.parametrize(
    "model",
    [
        _Shared(),
        torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2,
            enable_nested_tensor=False,
        ),
        torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten()),
    ],
    ids=["shared_tied_frozen", "transformer", "conv_bn"],
)
def test_trainable_parameters_is_named_parameters_order(model):
    names, params = trainable_parameters(model)
    ref = _reference_params(model)
    assert names == [n for n, _ in ref]
    assert len(params) == len(ref) and all(p is q for p, (_, q) in zip(params, ref))


class _WithUnused(torch.nn.Module):
    """``extra`` takes part in batches of odd size only: in the others its estimate is zero,
    and an exponential average still decays it."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.extra = torch.nn.Linear(3, 4)

    def forward(self, x):
        z = self.body(x)
        return z + self.extra(x[:, :3]) if x.shape[0] % 2 else z


def _mlp(dtype=torch.float64, unused=False):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    return (_WithUnused(m) if unused else m).to(dtype)


def _oracle(model, batches, seed, reduction, ema):
    """The one-probe Hutchinson estimate folded by hand in float64: the same probes (the same
    generator counters), squares, sums, means and bias-corrected EMA."""
    names, params = trainable_parameters(model)
    acc = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    offset, count, t = 0, 0, 0
    for x, _y in batches:
        z = model(x)
        u = ops.probe_logit_grad(z.detach(), "hutchinson", seed, offset, 1, backend="torch")[0]
        grads = torch.autograd.grad(z, params, u.to(z.dtype), allow_unused=True)
        est = [
            torch.zeros_like(a) if g is None else g.double() ** 2 for a, g in zip(acc, grads)
        ]
        offset += likelihoods.counters_used(1, z.shape[0], z.shape[1])
        count += z.shape[0]
        t += 1
        if ema is None:
            acc = [a + e for a, e in zip(acc, est)]
        else:
            est = [e / z.shape[0] for e in est] if reduction == "mean" else est
            acc = [ema * a + (1 - ema) * e for a, e in zip(acc, est)]
    if ema is not None:
        return dict(zip(names, [a / (1 - ema**t) for a in acc]))
    if reduction == "mean":
        return dict(zip(names, [a / count for a in acc]))
    return dict(zip(names, acc))


def _batches(dtype, sizes=(5, 4, 7, 2)):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g))
        for n in sizes
    ]


@pytest.mark.parametrize("reduction,ema", [("sum", None), ("mean", None), ("sum", 0.9),
                                           ("mean", 0.7)])
@pytest.mark.parametrize("unused", [False, True])
def test_one_probe_steps_fold_squares_exactly(reduction, ema, unused):
    model = _mlp(unused=unused)
    batches = _batches(torch.float64)
    est = fimfast.DiagFisher(model, "hutchinson", reduction=reduction, ema=ema, seed=3)
    for b in batches:
        est.step(b)
    got = dict(est.result())
    want = _oracle(model, batches, 3, reduction, ema)
    assert list(got) == list(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-15)
    if unused:
        assert torch.count_nonzero(got["extra.weight"]) == 12


def test_one_probe_steps_square_low_precision_gradients_in_float32():
    model = _mlp(torch.bfloat16)
    batches = _batches(torch.bfloat16)
    est = fimfast.DiagFisher(model, "hutchinson", seed=3)
    for b in batches:
        est.step(b)
    got = dict(est.result())
    want = _oracle(model, batches, 3, "sum", None)
    for n in want:
        assert got[n].dtype == torch.float32
        # bf16 gradients squared in float32 are exact: only the summation order rounds
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-6, atol=0)


def test_squares_value_object():
    g = [torch.tensor([1.0, -2.0]), None, torch.tensor([3.0], dtype=torch.float64)]
    sq = Squares(g, [True, False, False], [torch.float32, torch.float32, torch.float64], 0.5)
    out = sq.squares([(2,), (3,), (1,)], [torch.device("cpu")] * 3)
    assert out[0] is g[0]  # owned: squared in place
    torch.testing.assert_close(out[0], torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(out[1], torch.zeros(3))
    torch.testing.assert_close(out[2], torch.tensor([4.5], dtype=torch.float64))
    assert g[2].item() == 3.0  # not owned: left alone
    with pytest.raises(ValueError, match="factors, owned and dtypes"):
        Squares(g, [True], [torch.float32])
    # owned given as a function: asked once, on first use only
    calls = []
    lazy = Squares([torch.tensor([3.0])], lambda: calls.append(1) or [True], [torch.float32], 2.0)
    assert calls == []
    assert lazy.squares()[0].tolist() == [18.0] and lazy.owned == [True] and calls == [1]
    with pytest.raises(ValueError, match="owned gave 2 flags for 1 factors"):
        Squares([torch.ones(1)], lambda: [True, True], [torch.float32]).squares()
    with pytest.raises(ValueError, match=r"factors\[0\] is None"):
        Squares([None], [False], [torch.float32]).squares()


def test_rows_check_labels_and_finiteness_in_two_kernels(monkeypatch):
    z = torch.randn(6, 5)
    y = torch.tensor([0, 4, 2, 1, 3, 0])
    batchlib.rows(z, y, None, "categorical", -100, True)  # the row indices are kept from here
    if finite._host():  # the extension's one call reads both tensors: no operator at all
        with OpCounter() as c:
            rows = batchlib.rows(z, y, None, "categorical", -100, True)
        assert rows.all_valid and rows.count == 6 and rows.labels is y
        assert not c.ops, c.ops
        monkeypatch.setattr(finite, "_HOST", ())  # and the torch path, as without it:
    with OpCounter() as c:
        rows = batchlib.rows(z, y, None, "categorical", -100, True)
    assert rows.all_valid and rows.count == 6
    # the label range and one sum of the logits (of a detached alias); on the CPU their scalars
    # are read as they are (no stack: a read costs no synchronisation there); nothing else runs
    reads = c.ops.pop("aten._local_scalar_dense.default")
    assert reads == 3 and c.ops.pop("aten.detach.default") == 1, c.ops
    assert c.ops == {"aten.aminmax.default": 1, "aten.sum.default": 1}, c.ops


@pytest.mark.parametrize("one_read", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("ldtype", [torch.uint8, torch.int32, torch.int64])
def test_label_range_and_finiteness_values(one_read, dtype, ldtype):
    y = torch.tensor([3, 0, 7, 2], dtype=ldtype)
    for bad in (None, float("nan"), float("inf"), -float("inf")):
        z = torch.randn(4, 9).to(dtype)
        if bad is not None:
            z[1, 4] = bad
        with OpCounter() as c:
            got = batchlib.label_range_and_finite(y, z, one_read, host=False)
        assert got == (0, 7, bad is None), (bad, got)
        if one_read:  # one host read: a tolist() of one stacked tensor, no item()
            assert c.ops["aten._local_scalar_dense.default"] == 0, c.ops
            assert c.ops["aten.stack.default"] == 1, c.ops
    # entries finite, sum not: reported as not finite (the general path tells an overflow apart)
    z = torch.full((2, 3), 3e38, dtype=dtype)
    got = batchlib.label_range_and_finite(y[:2], z, one_read, host=False)
    assert got[2] == (dtype == torch.float64)
    if ldtype != torch.uint8:  # negative labels read back negative (sign-extended)
        neg = torch.tensor([-100, 5, -3], dtype=ldtype)
        got = batchlib.label_range_and_finite(neg, torch.zeros(3, 6, dtype=dtype), one_read)
        assert got == (-100, 5, True)
    big = torch.tensor([2**40, 1]) if ldtype == torch.int64 else None
    if big is not None:
        got = batchlib.label_range_and_finite(big, torch.zeros(2, 4, dtype=dtype), one_read)
        assert got == (1, 2**40, True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rows_refuse_non_finite_logits_with_valid_labels(bad):
    z = torch.randn(6, 5)
    z[4, 2] = bad
    with pytest.raises(ValueError, match="1 non-finite value"):
        batchlib.rows(z, torch.zeros(6, dtype=torch.long), None, "categorical", -100, True)


def test_rows_accept_logits_whose_sum_overflows():
    z = torch.full((4, 3), 3e38)  # every entry finite, the float32 sum is not
    rows = batchlib.rows(z, torch.tensor([0, 1, 2, 0]), None, "categorical", -100, True)
    assert rows.count == 4


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_rows_label_dtypes_and_range(dtype):
    z = torch.randn(3, 4)
    rows = batchlib.rows(z, torch.tensor([0, 3, 1], dtype=dtype), None, "categorical", -100, True)
    assert rows.labels.tolist() == [0, 3, 1]
    with pytest.raises(ValueError, match="labels"):
        batchlib.rows(z, torch.tensor([0, 4, 1], dtype=dtype), None, "categorical", -100, True)
