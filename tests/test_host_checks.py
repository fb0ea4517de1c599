"""The host functions of the compiled extension behind a step's fixed cost, each against its
Python path: the row checks (``label_range_finite``, ``all_finite``: fimfast/finite.py), the
reentrant-checkpoint walk (fimfast/hutchinson.py) and the parameter walk's check
(:class:`fimfast.parameters.ParamWalk`), with every change of a model's parameters that must make
the walk run again."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from largest_alloc import LargestAlloc
from torch import nn
from torch.utils.checkpoint import checkpoint

import fimfast
from fimfast import _ext, finite, hutchinson, parameters
from fimfast import batch as batchlib
from fimfast.parameters import ParamWalk, trainable_parameters

_BUILT = bool(glob.glob(os.path.join(os.path.dirname(finite.__file__), "_C*.so")))


def _need(name: str):
    fn = _ext.host_function(name)
    if fn is None:
        if _BUILT and os.environ.get("FIMFAST_DISABLE_EXT", "") != "1":
            pytest.fail(f"fimfast._C is built here but has no {name}: rebuild the extension")
        pytest.skip(f"fimfast._C with {name} is not built")
    return fn


def _reference(labels: torch.Tensor, logits: torch.Tensor) -> tuple[int, int, bool]:
    return int(labels.min()), int(labels.max()), bool(torch.isfinite(logits).all())


# ---- row checks ------------------------------------------------------------------------------

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INTS = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_non_finite_position_is_found(dtype, bad):
    fused, whole = _need("label_range_finite"), _need("all_finite")
    y = torch.tensor([3, 0, 6, 2, 5])
    clean = torch.randn(5, 7).to(dtype)
    assert fused(y, clean) == _reference(y, clean) == (0, 6, True)
    for i in range(clean.numel()):
        z = clean.clone()
        z.view(-1)[i] = bad
        assert fused(y, z) == _reference(y, z) == (0, 6, False), i
        assert not whole(z)
    # the largest finite values and the smallest subnormals are finite
    info = torch.finfo(dtype)
    edge = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, 0.0, -0.0], dtype=dtype)
    assert whole(edge) and fused(y, edge)[2]


@pytest.mark.parametrize("ldtype", INTS)
def test_label_range_of_every_integer_dtype(ldtype):
    fused = _need("label_range_finite")
    z = torch.randn(6, 4)
    lo = 0 if ldtype == torch.uint8 else -100  # ignore_index rows read as the minimum
    y = torch.tensor([2, lo, 3, 1, 3, 0]).to(ldtype)
    assert fused(y, z) == _reference(y, z)
    y = torch.tensor([7]).to(ldtype)
    assert fused(y, z[:1]) == (7, 7, True)
    if ldtype == torch.int64:
        big = torch.tensor([2**40, -(2**41), 5])
        assert fused(big, z[:3]) == (-(2**41), 2**40, True)


def test_strided_views_and_a_large_batch_are_read_right():
    fused, whole = _need("label_range_finite"), _need("all_finite")
    y = torch.arange(40).reshape(8, 5)
    z = torch.randn(5, 8, 3).transpose(0, 1)  # (8, 5, 3), not contiguous
    assert fused(y.t(), z.transpose(0, 1)) == _reference(y.t(), z) == (0, 39, True)
    z[7, 4, 2] = float("nan")
    assert fused(y[:, ::2], z) == _reference(y[:, ::2], z)
    neg = torch._neg_view(torch.tensor([1, 5, 3]))  # a lazily negated view
    assert fused(neg, z[5:]) == (-5, -1, False) and fused(neg, z[:3]) == (-5, -1, True)
    # above one task's grain the logits are read in parallel: a NaN in the last entry
    big = torch.randn(1 << 20, dtype=torch.bfloat16)
    assert whole(big)
    big[-1] = float("nan")
    assert not whole(big) and not fused(y, big)[2]


def _peak_growth(fn) -> int:
    """Bytes the peak resident memory grows by while ``fn`` runs (Linux)."""

    def hwm() -> int:
        with open("/proc/self/status") as f:
            return 1024 * int(next(ln for ln in f if ln.startswith("VmHWM:")).split()[1])

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak restarts from the resident memory of now
    before = hwm()
    fn()
    return hwm() - before


def test_an_expanded_tensor_is_read_without_a_temporary_of_its_shape():
    """The placeholder logits of an ``lm_head`` step are a zero-stride view: checked by
    reductions that read the view, never a copy of (tokens x vocabulary) entries."""
    fused, whole = _need("label_range_finite"), _need("all_finite")
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("peak resident memory needs Linux /proc/self/clear_refs")
    y = torch.zeros(512, dtype=torch.long)
    for fill, finite_ in ((0.0, True), (float("nan"), False), (-float("inf"), False)):
        z = torch.tensor([fill]).expand(512, 50_000)  # 100 MB if materialised
        with LargestAlloc() as m:
            assert whole(z) is finite_ and fused(y, z) == (0, 0, finite_)
        assert m.bytes < 1 << 16, (m.bytes, m.op, m.shape)
        grew = _peak_growth(lambda z=z: (whole(z), fused(y.expand(512), z)))
        assert grew < 20 << 20, grew
    z = torch.zeros(8, 4000).bfloat16()[:, ::2]  # strided, another dtype
    z[5, 7] = float("inf")
    assert not whole(z) and whole(z[:5])


def test_empty_inputs_as_the_torch_path():
    fused, whole = _need("label_range_finite"), _need("all_finite")
    assert whole(torch.empty(0, 3))
    assert fused(torch.tensor([1]), torch.empty(0, 3)) == (1, 1, True)
    with pytest.raises(RuntimeError, match="labels must not be empty"):
        fused(torch.empty(0, dtype=torch.long), torch.randn(2, 3))
    with pytest.raises(RuntimeError):  # the torch path refuses an empty range too
        finite.label_range_and_finite(torch.empty(0, dtype=torch.long), torch.randn(2, 3))


def test_bad_arguments_are_refused_naming_them():
    fused, whole = _need("label_range_finite"), _need("all_finite")
    with pytest.raises(RuntimeError, match="labels must be integer"):
        fused(torch.tensor([1.0]), torch.randn(1, 2))
    with pytest.raises(RuntimeError, match="logits must be floating point"):
        fused(torch.tensor([1]), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="all_finite: logits must be floating point"):
        whole(torch.ones(2, dtype=torch.int32))


def _rows_both_ways(monkeypatch, *args, **kwargs):
    """``rows(*args)`` with the extension's checks and on the torch path: (result, error)."""
    out = []
    for host in (finite._host(), ()):
        monkeypatch.setattr(finite, "_HOST", host)
        try:
            r = batchlib.rows(*args, **kwargs)
            out.append((r.index.tolist(), None if r.labels is None else r.labels.tolist(),
                        r.all_valid, None))
        except ValueError as exc:
            out.append((None, None, None, str(exc)))
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("ldtype", [torch.int32, torch.int64])
def test_rows_agree_with_the_torch_path(monkeypatch, dtype, ldtype):
    _need("label_range_finite")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g).to(dtype)
    y = torch.tensor([0, 4, 2, 1, 3, 0], dtype=ldtype)
    cases = [
        (z, y),  # every row valid: the fast path
        (z, torch.tensor([0, -100, 2, 1, -100, 4], dtype=ldtype)),  # ignore_index rows
        (z, torch.tensor([0, 5, 2, 1, 3, 0], dtype=ldtype)),  # a label out of range
        (z, None),  # no labels (HUTCHINSON): finiteness only
    ]
    for bad in (float("nan"), float("inf"), -float("inf")):
        zb = z.clone()
        zb[3, 1] = bad
        cases += [(zb, y), (zb, None)]
        ignored = torch.tensor([0, 1, 2, -100, 3, 0], dtype=ldtype)
        cases.append((zb, ignored))  # the non-finite row is ignored: accepted
    for logits, labels in cases:
        a, b = _rows_both_ways(monkeypatch, logits, labels, None, "categorical", -100, False)
        assert a == b, (logits, labels)
    # token-level logits with a padding mask, the NaN on a padded token
    z3 = torch.randn(2, 3, 4).to(dtype)
    z3[1, 2, 0] = float("nan")
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    a, b = _rows_both_ways(monkeypatch, z3, None, mask, "categorical", -100, False)
    assert a == b and a[3] is None and a[0] == [0, 1, 2, 3, 4]
    a, b = _rows_both_ways(monkeypatch, z3, None, None, "categorical", -100, False)
    assert a == b and "1 non-finite value" in a[3]


def test_rows_all_valid_says_yes_only_when_every_row_is_taken():
    _need("rows_all_valid")
    z, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    z3, y3 = torch.randn(2, 5, 3), torch.randint(0, 3, (2, 5))
    assert finite.rows_all_valid(z, y, -100) and finite.rows_all_valid(z3, y3, -100)
    assert finite.rows_all_valid(z.bfloat16(), y.int(), -100)
    nan = z.clone()
    nan[2, 1] = float("nan")
    no = [
        (nan, y, -100),  # a non-finite logit
        (z, torch.tensor([0, 3, 1, 2]), -100),  # a label out of range
        (z, torch.tensor([0, -1, 1, 2]), -100),  # a negative label
        (z, y, 1),  # ignore_index among the labels
        (z, y[:3], -100),  # labels of another shape
        (z, y.float(), -100),  # not class indices
        (z, y.bool(), -100),
        (z[:, :1], torch.zeros(4, dtype=torch.long), -100),  # one class
        (z.long(), y, -100),  # integer logits
        (z3, y3.reshape(-1), -100),  # token logits, flat labels
        (torch.randn(4, 3, 2, 2), y, -100),  # 4-D logits
        (torch.randn(0, 3), torch.empty(0, dtype=torch.long), -100),  # empty
    ]
    for args in no:
        assert not finite.rows_all_valid(*args), args
    # the rows it decides are those of the Python checks
    for logits, labels in ((z, y), (z3, y3)):
        r = batchlib.rows(logits, labels, None, "categorical", -100, True)
        assert r.all_valid and r.count == labels.numel() and r.labels.tolist() == labels.flatten(
            ).tolist()
        assert r.sample.tolist() == [i // (r.count // len(labels)) for i in range(r.count)]
        assert r.index.tolist() == list(range(r.count))


@pytest.mark.parametrize("mask", [None, torch.ones(2, 3)])
def test_rows_refuse_what_is_not_a_tensor_before_anything(mask):
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="logits must be a tensor; got list"):
        batchlib.rows([[0.0, 1.0]], y, mask, "categorical", -100, True)
    with pytest.raises(TypeError, match="labels must be a tensor; got list"):
        batchlib.rows(torch.randn(2, 3, 4), [[0, 1, 2]] * 2, mask, "categorical", -100, True)


def test_a_stale_extension_leaves_the_python_paths(monkeypatch):
    assert _ext.host_function("no_such_function") is None
    monkeypatch.setattr(finite, "_HOST", ())
    monkeypatch.setattr(hutchinson, "_WALK", [None])
    monkeypatch.setattr(parameters, "_HOLDS", [None])
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    est = fimfast.DiagFisher(net, "hutchinson", seed=1)
    est.step((x, y))
    walk = ParamWalk()
    assert walk.of(net)[1] is not walk.of(net)[1]  # a new walk at every call
    assert not hutchinson.has_reentrant_checkpoint(net(x))
    monkeypatch.undo()
    ref = fimfast.DiagFisher(net, "hutchinson", seed=1)
    ref.step((x, y))
    assert all(torch.equal(a, b) for a, b in zip(est.state.values, ref.state.values))


# ---- reentrant-checkpoint walk ---------------------------------------------------------------


class CheckpointFunction(torch.autograd.Function):
    """A library's copy of torch's reentrant checkpoint (only its name matters here)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class Doubler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def _graphs():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    h = lin(x)
    yield "plain", lin(h).tanh().sum(), False
    yield "reentrant", checkpoint(lin, h, use_reentrant=True).sum(), True
    yield "non-reentrant", checkpoint(lin, h, use_reentrant=False).sum(), False
    yield "library copy", CheckpointFunction.apply(h).sum() + h.sum(), True
    yield "other function", Doubler.apply(h).sum(), False
    # the segment behind a node shared by two paths
    inner = checkpoint(lambda t: t.exp(), h, use_reentrant=True)
    yield "diamond", (h * 2 + inner).sum(), True
    yield "deep", _deep(h), False
    yield "leaf", x, False
    yield "no graph", torch.randn(3), False


def _deep(h):
    for _ in range(300):
        h = h * 1.001 + h.sin()
    return h.sum()


def test_the_compiled_walk_decides_as_the_python_one():
    walk = _need("has_reentrant_checkpoint")
    for name, t, expected in _graphs():
        assert walk(t) is expected, name
        assert hutchinson._has_reentrant_checkpoint(t) is expected, name
        assert hutchinson.has_reentrant_checkpoint(t) is expected, name


# ---- parameter walk --------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.b(self.a(x).tanh()) * self.scale


def _change(net: _Net, how: str) -> None:
    with torch.no_grad():
        if how == "add parameter":
            net.a.register_parameter("extra", nn.Parameter(torch.zeros(1)))
        elif how == "replace parameter":
            net.a.weight = nn.Parameter(net.a.weight.clone())
        elif how == "delete parameter":
            del net.scale
            net.scale = torch.ones(2)  # now a plain attribute
        elif how == "rename parameter":
            net._parameters["renamed"] = net._parameters.pop("scale")
        elif how == "parameter dict replaced":
            net.a._parameters = dict(net.a._parameters)
        elif how == "add module":
            net.c = nn.Linear(2, 2)
        elif how == "replace module":
            net.b[0] = nn.Linear(4, 4)
        elif how == "module without parameters replaced":
            net.b[1] = nn.ReLU()
        elif how == "freeze":
            net.a.bias.requires_grad_(False)
        elif how == "unfreeze":
            net.b[0].bias.requires_grad_(True)
        elif how == "resize":
            net.scale.data = torch.ones(3)
        elif how == "tie":  # the same parameter under a second name: listed once
            net.tied = net.a.weight
        else:
            raise AssertionError(how)


CHANGES = ["add parameter", "replace parameter", "delete parameter", "rename parameter",
           "parameter dict replaced", "add module", "replace module",
           "module without parameters replaced", "freeze", "unfreeze", "resize", "tie"]


@pytest.mark.parametrize("how", CHANGES)
def test_the_walk_runs_again_after_every_change(how):
    _need("walk_holds")
    torch.manual_seed(0)
    net = _Net()
    net.b[0].bias.requires_grad_(False)
    walk = ParamWalk()
    names, params = walk.of(net)
    assert (names, params) == trainable_parameters(net)
    assert walk.of(net)[0] is names and walk.of(net)[1] is params  # nothing changed: no walk
    _change(net, how)
    names2, params2 = walk.of(net)
    assert names2 is not names and params2 is not params, how
    ref_names, ref_params = trainable_parameters(net)
    assert names2 == ref_names and all(p is q for p, q in zip(params2, ref_params))
    assert len(params2) == len(ref_params)
    assert walk.of(net)[1] is params2  # and holds again


def test_another_model_and_a_move_to_another_dtype():
    _need("walk_holds")
    net, other = _Net(), _Net()
    walk = ParamWalk()
    names, params = walk.of(net)
    assert walk.of(other)[1] is not params and walk.of(other)[1][0] is other.scale
    assert walk.of(net)[1][0] is net.scale
    params = walk.of(net)[1]
    net.double()  # the same parameter objects: the lists hold, and read the new dtype
    assert walk.of(net)[1] is params and params[0].dtype == torch.float64


def _state(est):
    return [v.clone() for v in est.state.values], est.state.count, est.state.steps


@pytest.mark.parametrize("how", ["freeze", "add parameter", "resize", "replace parameter"])
def test_a_step_after_a_change_is_refused_and_leaves_the_state(how):
    torch.manual_seed(0)
    net = _Net()
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    est = fimfast.DiagFisher(net, "hutchinson", seed=3)
    est.step((x, y))
    before = _state(est)
    _change(net, how)
    if how == "replace parameter":  # the same names and shapes: another tensor, same estimate
        est.step((x, y))
        return
    with pytest.raises(ValueError, match="trainable parameters changed"):
        est.step((x, y))
    after = _state(est)
    assert after[1:] == before[1:] and all(torch.equal(a, b) for a, b in zip(after[0], before[0]))


def test_steps_after_a_move_to_float64_equal_the_walk_at_every_step(monkeypatch):
    def run():
        torch.manual_seed(0)
        net = _Net()
        x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
        est = fimfast.DiagFisher(net, "empirical")
        est.step((x, y))
        net.double()
        est.step((x.double(), y))
        net.a.bias.requires_grad_(False)
        est.reset()
        est.step((x.double(), y))
        return est.result()

    cached = run()
    monkeypatch.setattr(parameters, "_HOLDS", [None])  # a walk at every step
    walked = run()
    assert list(cached) == list(walked) and "a.bias" not in cached
    for k in cached:
        assert torch.equal(cached[k], walked[k]), k
