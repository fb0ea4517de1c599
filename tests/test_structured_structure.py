"""The per-model structure the Kronecker family keeps between calls
(fimfast/structured/structure.py): reused while the model is unchanged, rebuilt when a parameter
is frozen or replaced, a module or buffer added, the model moved to another dtype, a lookup's
``max_norm`` set; never keeping the model alive; results equal to those of a model met for the
first time."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import fimfast
from fimfast.structured import structure

N, D, C = 12, 6, 4


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).to(dtype)


def _data(seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, D, generator=g, dtype=dtype), torch.randint(0, C, (N,), generator=g))]


def _kfac(model, data, rep="kfac"):
    return fimfast.fisher(model, data, "monte_carlo", rep, seed=3)


def _same(F, G):
    a, b = F._tensors(), G._tensors()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert F.names == G.names and F.layers == G.layers


@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag"])
def test_second_call_reuses_the_structure_and_equals_a_fresh_model(rep):
    model, data = _mlp(), _data()
    first = _kfac(model, data, rep)
    s = structure.of(model)
    second = _kfac(model, data, rep)
    assert structure.of(model) is s and s.layers is not None
    _same(first, second)
    _same(second, _kfac(copy.deepcopy(model), data, rep))  # a model never met


def test_frozen_parameter_rebuilds_the_layers():
    model, data = _mlp(), _data()
    _kfac(model, data)
    s = structure.of(model)
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"module '0' \(Linear\) has a frozen weight or bias"):
        _kfac(model, data)
    model[0].bias.requires_grad_(False)
    F = _kfac(model, data)
    assert structure.of(model) is not s
    assert F.names == ["2.weight", "2.bias"] and [i["name"] for i in F.layers] == ["2"]
    ref = copy.deepcopy(model)
    _same(F, _kfac(ref, data))


def test_replaced_parameter_and_added_module_rebuild():
    model, data = _mlp(), _data()
    before = _kfac(model, data)
    model[0].weight = nn.Parameter(2 * model[0].weight.detach())
    F = _kfac(model, data)
    assert not torch.allclose(F.A[1], before.A[1])  # the new weight's inputs to layer 2
    _same(F, _kfac(copy.deepcopy(model), data))
    model.append(nn.Linear(C, C).double())
    F = _kfac(model, data)
    assert [i["name"] for i in F.layers] == ["0", "2", "3"]
    _same(F, _kfac(copy.deepcopy(model), data))


def test_dtype_move_rebuilds_and_changes_the_result_dtype():
    model, data = _mlp(dtype=torch.float32), _data(dtype=torch.float32)
    assert _kfac(model, data).dtype == torch.float32
    key = structure.of(model).key
    model.double()  # the same Parameter objects, new dtype
    assert structure.fingerprint(model)[0] != key
    F = _kfac(model, _data())
    assert F.dtype == torch.float64
    _same(F, _kfac(copy.deepcopy(model), _data()))


def test_device_is_part_of_the_key():
    model = _mlp()
    key = structure.of(model).key
    model.to("meta")  # no other device here: the meta device
    assert structure.fingerprint(model)[0] != key


def test_the_cache_does_not_keep_the_model_alive():
    model, data = _mlp(), _data()
    _kfac(model, data)
    assert model in structure._CACHE
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_model_that_is_one_layer_is_not_kept_in_its_own_entry():
    torch.manual_seed(0)
    model = nn.Linear(D, C).double()
    data = _data()
    F = _kfac(model, data)
    s = structure.of(model)
    assert s.layers is None and model not in s.modules
    _same(F, _kfac(model, data))
    ref = weakref.ref(model)
    del model, s
    gc.collect()
    assert ref() is None


class _Counting(nn.Module):
    """A buffer its forward writes in place only from the second call on (a guard that learnt
    on a first call which buffers are written would not have copied it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(D, C).double()
        self.register_buffer("seen", torch.zeros(()))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 1:
            self.seen.add_(1)
        return self.lin(torch.tanh(x))


def test_each_call_copies_every_buffer_on_its_first_step():
    model, data = _Counting(), _data()
    _kfac(model, data)
    s = structure.of(model)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        _kfac(model, data)
    assert structure.of(model) is s
    assert float(model.seen) == 0.0


class _Walked(nn.Sequential):
    """Counts the walks of its modules (``modules()`` and ``named_modules()`` of the model)."""

    walks = 0

    def named_modules(self, *args, **kwargs):
        type(self).walks += 1
        return super().named_modules(*args, **kwargs)


def test_a_call_on_a_kept_structure_walks_no_module():
    """The guards (module list, buffer list) and the capture read the structure's lists: a call
    on a model met before walks its modules not at all, with a buffer to guard too."""
    torch.manual_seed(0)
    model = _Walked(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, C)).double()
    model[1].requires_grad_(False)
    model.eval()
    data = _data()
    first = _kfac(model, data)
    s = structure.of(model)
    _Walked.walks = 0
    _same(_kfac(model, data), first)
    assert structure.of(model) is s and _Walked.walks == 0
    model[1].train()  # the capture still refuses batch statistics, read from the kept list
    with pytest.raises(ValueError, match="batch statistics"):
        _kfac(model, data)


def test_added_buffer_and_max_norm_rebuild_the_guards():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, D), nn.Flatten(), nn.Linear(2 * D, C)).double()
    ids = torch.randint(0, 10, (N, 2))
    data = [(ids, torch.randint(0, C, (N,)))]
    _kfac(model, data)
    s = structure.of(model)
    model[0].max_norm = 0.5  # its forward renormalises the rows it reads from now on
    before = model[0].weight.detach().clone()
    _kfac(model, data)
    assert structure.of(model) is not s and structure.of(model).tables == [model[0]]
    assert torch.equal(model[0].weight, before), "the renormalised rows were not put back"
    s = structure.of(model)
    model[2].register_buffer("extra", torch.zeros(1))
    _kfac(model, data)
    assert structure.of(model) is not s
    assert [q for _, _, q in structure.of(model).buffers] == ["2.extra"]


def test_options_validated_once_per_items_still_refuse_a_bool_seed():
    """Validated options are kept by their items and the items' types: ``seed=True`` after
    ``seed=1`` is still refused, and a result's ``meta["options"]`` is its own dict."""
    model, data = _mlp(), _data()
    F = fimfast.fisher(model, data, "monte_carlo", "kfac", seed=1)
    with pytest.raises(ValueError, match=r"fim_opts\['seed'\] must be an integer or None"):
        fimfast.fisher(model, data, "monte_carlo", "kfac", seed=True)
    F.meta["options"]["seed"] = 99
    G = fimfast.fisher(model, data, "monte_carlo", "kfac", seed=1)
    assert G.meta["options"]["seed"] == 1
    with pytest.raises(ValueError, match="unknown key"):
        fimfast.fisher(model, data, "monte_carlo", "kfac", seed=1, bogus=2)


@pytest.mark.parametrize("ext", [True, False])
def test_the_check_without_a_walk_sees_what_the_key_holds(monkeypatch, ext):
    """Between calls the entry is reused after a check of what the last walk read (no walk):
    a dtype or device move, a module's class, a parameter resized in place or frozen, a lookup's
    ``max_norm`` all make a new entry, as the key does; a buffer replaced by another tensor
    walks again and keeps the entry (the key is the same). Without the compiled extension every
    call walks, with the same answers."""
    if not ext:
        monkeypatch.setattr(structure, "_holds", lambda: None)
    walks = []
    fp = structure.fingerprint
    monkeypatch.setattr(structure, "fingerprint",
                        lambda *a, **k: walks.append(1) or fp(*a, **k))

    def fresh(model, s):
        n = len(walks)
        t = structure.of(model)
        assert (len(walks) > n) == (t is not s or not ext)
        return t

    model = _mlp(dtype=torch.float32)
    s = structure.of(model)
    assert fresh(model, s) is s
    model.double()
    t = fresh(model, s)
    assert t is not s and t.key != s.key
    s = t
    assert fresh(model, s) is s
    model.to("meta")
    t = fresh(model, s)
    assert t is not s
    model = _mlp()
    s = structure.of(model)
    model[1].__class__ = type("MyTanh", (nn.Tanh,), {})
    s, t = structure.of(model), s
    assert s is not t
    model[2].weight.data = torch.zeros(C, 9, dtype=torch.float64)  # resized in place
    s, t = structure.of(model), s
    assert s is not t and s.params[2].shape == (C, 9)
    model[2].bias.requires_grad_(False)
    s, t = structure.of(model), s
    assert s is not t and s.names == ["0.weight", "0.bias", "2.weight"]
    model.register_buffer("b", torch.zeros(2))
    s = structure.of(model)
    n = len(walks)
    model.b = torch.ones(2)  # another tensor in the same place
    assert structure.of(model) is s and len(walks) == n + 1
    assert structure.of(model) is s and len(walks) == n + 1 + (not ext)
    emb = nn.Sequential(nn.Embedding(10, D), nn.Linear(D, C))
    s = structure.of(emb)
    emb[0].max_norm = 1.0
    assert structure.of(emb) is not s and structure.of(emb).tables == [emb[0]]


def test_the_layout_checks_run_again_for_another_layout():
    """A matrix's layout checks (its layers tile the parameters) are done once per layout
    (names, shapes, layer descriptions): a layout met before passes without them, any other is
    checked, also under the same parameter names."""
    from fimfast.structured.kron import KFACFIM

    F = _kfac(_mlp(), _data())
    A, G = F.A, F.G
    same = KFACFIM(F.names, F.shapes, F.layers, A, G)
    assert same._checked and same.layers == F.layers
    with pytest.raises(ValueError, match=r"the layers cover 56 of the 92 parameters"):
        KFACFIM(F.names, F.shapes, F.layers[:1], A[:1], G[:1])
    shifted = [F.layers[0], {**F.layers[1], "bias": None, "In": 8}]
    with pytest.raises(ValueError, match=r"the layers cover 88 of the 92 parameters"):
        KFACFIM(F.names, F.shapes, shifted, A[:1] + [A[1][:8, :8]], G)
