"""Exact or refused, and side-effect free: ``fimfast.fisher`` in every representation on models
built the way users build them (the constructs of tests/test_audit_models.py).

Each case either equals its reference to 1e-10 or raises an error naming the module or argument:

* ``dense``, ``low_rank``, ``block_diag``, ``quasi_diag`` and ``diag``: the float64 oracle
  ``sum_r J_r^T M_r J_r`` (``M_r = I(z_r)`` for EXACT, ``e e^T`` with the observed score ``e``
  for EMPIRICAL; every row's Jacobian from the whole batch's graph) of the same model written
  plainly, restricted to the representation's entries;
* ``kfac`` and ``ekfac``: the same representation of the model written plainly (padding given at
  construction, a table already renormalised, no hooks, out-of-place operations).

The model's parameters, buffers and hooks are left as they were.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from cases import GRADIENT_HOOKS, MHAHead

import fimfast
from fimfast.structured.dense import module_blocks

REPS = ("diag", "quasi_diag", "kfac", "ekfac", "block_diag", "low_rank", "dense")
KRON = ("quasi_diag", "kfac", "ekfac")
TYPES = ("exact", "empirical")
N, D, C, V, E = 6, 5, 4, 11, 6


def _oracle(model, x, y, fim_type) -> torch.Tensor:
    """``sum_r J_r^T M_r J_r`` over the rows of ``model(x)`` (``(N, C)`` logits), float64."""
    ps = [p for p in model.parameters() if p.requires_grad]
    z = model(x)
    prob = torch.softmax(z.detach().double(), -1)
    out = 0
    for r in range(z.shape[0]):
        J = torch.stack([torch.cat([
            (torch.zeros_like(p) if g is None else g).double().reshape(-1)
            for p, g in zip(ps, torch.autograd.grad(z[r, c], ps, retain_graph=True,
                                                    allow_unused=True))])
            for c in range(z.shape[1])])
        if fim_type == "exact":
            M = torch.diag(prob[r]) - torch.outer(prob[r], prob[r])
        else:
            e = prob[r] - F.one_hot(y[r], z.shape[1]).double()
            M = torch.outer(e, e)
        out = out + J.T @ M @ J
    return out


def _mask(model, names, rep) -> torch.Tensor:
    """The entries of the oracle a representation keeps (its block layout, built from the module
    tree)."""
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    offs, o = {}, 0
    for n in names:
        offs[n], o = (o, o + sizes[n]), o + sizes[n]
    m = torch.zeros(o, o, dtype=torch.bool)
    if rep in ("dense", "low_rank"):
        return ~m
    if rep == "block_diag":
        for i, j in module_blocks(names):
            a, b = offs[names[i]][0], offs[names[j - 1]][1]
            m[a:b, a:b] = True
        return m
    m |= torch.eye(o, dtype=torch.bool)  # diag, quasi_diag: the diagonal ...
    if rep == "quasi_diag":  # ... and a Linear/Conv2d's weight-bias cross entries
        for mname, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)) and f"{mname}.bias" in offs:
                w0, w1 = offs[f"{mname}.weight"]
                b0, _ = offs[f"{mname}.bias"]
                w = torch.arange(w0, w1).reshape(mod.weight.shape[0], -1)
                b = (b0 + torch.arange(w.shape[0])).unsqueeze(1).expand_as(w)
                m[w.reshape(-1), b.reshape(-1)] = True
                m[b.reshape(-1), w.reshape(-1)] = True
    return m


def _matrix(F_, rep) -> torch.Tensor:
    if rep == "diag":
        return torch.diag(torch.cat([v.reshape(-1) for _, v in F_.items()]).double())
    return F_.to_dense().double()


def _fisher(model, batch, fim_type, rep):
    return fimfast.fisher(model, [batch], fim_type, representation=rep, reduction="sum", seed=3)


def _expected(plain, batch, fim_type, rep) -> torch.Tensor:
    if rep in ("kfac", "ekfac"):
        return _matrix(_fisher(plain, batch, fim_type, rep), rep)
    names = [n for n, p in plain.named_parameters() if p.requires_grad]
    return _oracle(plain, *batch, fim_type) * _mask(plain, names, rep)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-10) -> None:
    err = float((got - want).abs().max())
    scale = float(want.abs().max())
    assert scale > 0 and err <= tol * scale, f"max error {err:.3e} vs scale {scale:.3e}"



def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, D, generator=g, dtype=torch.float64),
            torch.randint(0, C, (N,), generator=g))


def _mlp(mid: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 7), mid or nn.Tanh(), nn.Linear(7, C)).double()



# -- train-mode dropout, in-place operations, tied and frozen parameters ---------------------- #
class _FixedMask(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, h):
        return h * self.mask


@pytest.mark.parametrize("rep", REPS)
def test_dropout_in_train_mode_is_the_sampled_network(rep):
    """Dropout in train mode: the Fisher of the sub-network the pass's forward sampled (the same
    mask as a forward of the model right after the same ``torch.manual_seed``)."""
    model, batch = _mlp(nn.Dropout(0.5)), _data()
    torch.manual_seed(5)
    mask = F.dropout(torch.ones(N, 7, dtype=torch.float64), 0.5)
    plain = _mlp(_FixedMask(mask))
    if rep == "ekfac":  # its two passes draw two masks
        return
    torch.manual_seed(5)
    _close(_matrix(_fisher(model, batch, "exact", rep), rep),
           _expected(plain, batch, "exact", rep))


class _InPlace(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.o = nn.Linear(D, 7).double(), nn.Linear(7, C).double()
        self.inplace = inplace

    def forward(self, x):
        h = self.a(x)
        h = h.mul_(2).tanh_() if self.inplace else (h * 2).tanh()
        return self.o(h)


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("rep", REPS)
def test_in_place_operations_on_layer_outputs(rep, fim_type):
    model, plain, batch = _InPlace(True), _InPlace(False), _data()
    _close(_matrix(_fisher(model, batch, fim_type, rep), rep),
           _expected(plain, batch, fim_type, rep))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(C, E).double()
        self.p = nn.Linear(D, E).double()

    def forward(self, x):
        return F.linear(torch.tanh(self.p(x)), self.e.weight) + self.e(torch.tensor([1])).sum()


@pytest.mark.parametrize("rep", REPS)
def test_tied_weights(rep):
    model, batch = _Tied(), _data()
    if rep in KRON:
        with pytest.raises(ValueError, match=r"module 'e'"):
            _fisher(model, batch, "exact", rep)
        return
    _close(_matrix(_fisher(model, batch, "exact", rep), rep), _expected(model, batch, "exact", rep))


@pytest.mark.parametrize("rep", REPS)
def test_frozen_parameters(rep):
    model, batch = _mlp(), _data()
    model[0].requires_grad_(False)
    _close(_matrix(_fisher(model, batch, "exact", rep), rep), _expected(model, batch, "exact", rep))
    model[2].bias.requires_grad_(False)
    if rep in KRON:
        with pytest.raises(ValueError, match=r"module '2'.*frozen"):
            _fisher(model, batch, "exact", rep)




# -- BatchNorm ----------------------------------------------------------------------------------- #
class _Normed(nn.Module):
    def __init__(self, affine: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(D, 7).double()
        self.bn = nn.BatchNorm1d(7, affine=affine).double()
        self.o = nn.Linear(7, C).double()

    def forward(self, x):
        return self.o(torch.tanh(self.bn(self.a(x))))


@pytest.mark.parametrize("rep", REPS)
def test_batchnorm_statistics_are_left_as_they_were(rep):
    """BatchNorm: the running statistics are put back after the pass (train mode: the dense
    family gives the Fisher of the batch-coupled function; eval mode: every representation)."""
    train = rep not in KRON
    model = _Normed(affine=train)
    model.train(train)
    model.bn.running_mean.add_(0.3)  # eval mode: statistics that are not the batch's
    batch = _data()
    stats = [b.clone() for b in model.bn.buffers()]
    got = _matrix(_fisher(model, batch, "exact", rep), rep)
    assert all(torch.equal(a, b) for a, b in zip(model.bn.buffers(), stats)), \
        "the running statistics were updated"
    assert model.training == train
    want = _expected(copy.deepcopy(model), batch, "exact", rep)
    _close(got, want)


@pytest.mark.parametrize("rep", KRON)
def test_batchnorm_with_batch_statistics_refused_by_the_kronecker_family(rep):
    """BatchNorm in train mode (or without running statistics) mixes the samples: a Kronecker
    factor, which takes the gradient at a sample's layer output as that sample's own, would miss
    the cross-sample terms. Refused, naming the module; the statistics are left as they were."""
    model = _Normed(affine=False)
    batch = _data()
    stats = [b.clone() for b in model.bn.buffers()]
    with pytest.raises(ValueError, match=r"module 'bn' \(BatchNorm1d\).*batch statistics"):
        _fisher(model, batch, "exact", rep)
    assert all(torch.equal(a, b) for a, b in zip(model.bn.buffers(), stats))
# -- max_norm lookups ------------------------------------------------------------------------- #
class _Renormed(nn.Module):
    """A lookup with ``max_norm`` (its forward renormalises the rows it reads, in place)."""

    def __init__(self, max_norm=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(V, E, max_norm=max_norm).double()
        self.o = nn.Linear(E, C).double()

    def forward(self, ids):
        return self.o(torch.tanh(self.e(ids).mean(1)))


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (N, 4), generator=g), torch.randint(0, C, (N,), generator=g)


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("rep", REPS)
def test_max_norm_table_is_left_as_it_was(rep, fim_type):
    """The Fisher of the renormalised table (what the forward computes with); the rows the
    forward renormalised are put back."""
    model = _Renormed()
    batch = _ids()
    before = model.e.weight.detach().clone()
    got = _matrix(_fisher(model, batch, fim_type, rep), rep)
    assert torch.equal(model.e.weight, before), "the table was left renormalised"
    plain = copy.deepcopy(model)
    with torch.no_grad():
        plain.e(batch[0])  # renormalise the rows the batch reads
    plain.e.max_norm = None
    _close(got, _expected(plain, batch, fim_type, rep))




class _BareRenormed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(V, E, dtype=torch.float64))
        self.o = nn.Linear(E, C).double()

    def forward(self, ids):
        return self.o(torch.tanh(F.embedding(ids, self.w, max_norm=1.0).mean(1)))


@pytest.mark.parametrize("rep", ("block_diag", "low_rank", "dense"))
def test_forward_writing_into_a_bare_parameter_is_refused(rep):
    """``F.embedding(..., max_norm=)`` on a bare parameter: no module to put its rows back, so
    the pass is refused after the forward, naming the parameter."""
    with pytest.raises(ValueError, match=r"trainable parameter\(s\) w in place"):
        _fisher(_BareRenormed(), _ids(), "exact", rep)
# -- gradient hooks ---------------------------------------------------------------------------- #
@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("hook", GRADIENT_HOOKS,
                         ids=["tensor", "module", "global"])
def test_gradient_hooks_do_not_change_the_fisher(hook, rep, fim_type):
    """Hooks that rescale gradients change what autograd reports, not the model's function:
    they are switched off for the pass and put back."""
    model, batch = _mlp(), _data()
    want = _expected(model, batch, fim_type, rep)
    handles = hook(model)
    try:
        got = _matrix(_fisher(model, batch, fim_type, rep), rep)
        assert model[0].weight._backward_hooks or model[2]._backward_hooks or \
            torch.nn.modules.module._global_backward_hooks, "a hook was not put back"
    finally:
        for h in handles:
            h.remove()
    _close(got, want)


# -- convolution and lookup attributes set after construction -------------------------------- #
def _conv_model(**conv):
    torch.manual_seed(0)
    c = nn.Conv2d(2, 3, 3, **conv).double()
    L = c(torch.zeros(1, 2, 5, 5, dtype=torch.float64)).numel()
    return nn.Sequential(c, nn.Tanh(), nn.Flatten(), nn.Linear(L, C)).double()


CONV_CHANGES = {  # attributes set after construction, and the same given at construction
    "padding": ({"padding": (0, 1)}, {"padding": (0, 1)}),
    "same": ({"padding": "same"}, {"padding": 1}),
    "ints": ({"padding": 1, "stride": 2, "dilation": 1}, {"padding": 1, "stride": 2}),
    "dilation": ({"dilation": 2, "padding": 2}, {"dilation": 2, "padding": 2}),
}


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("change", list(CONV_CHANGES))
def test_convolution_reads_its_attributes_as_torch_does(change, rep, fim_type):
    """``padding``, ``stride`` and ``dilation`` set after construction (ints, tuples, 'same')
    are read as ``Conv2d.forward`` reads them on every call."""
    after, given = CONV_CHANGES[change]
    plain = _conv_model(**given)
    model = copy.deepcopy(plain)
    model[0] = nn.Conv2d(2, 3, 3, padding=(1, 0)).double()
    model[0].load_state_dict(plain[0].state_dict())
    for k, v in after.items():
        setattr(model[0], k, v)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(N, 2, 5, 5, generator=g, dtype=torch.float64),
             torch.randint(0, C, (N,), generator=g))
    assert torch.equal(model(batch[0]), plain(batch[0]))
    _close(_matrix(_fisher(model, batch, fim_type, rep), rep),
           _expected(plain, batch, fim_type, rep))




@pytest.mark.parametrize("rep", KRON)
def test_padding_mode_set_after_the_first_batch_is_refused(rep):
    """A ``padding_mode`` other than zeros set after the accumulator's first batch (torch pads
    with it on every call) is refused, naming the module."""
    model = _conv_model(padding=1)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(N, 2, 5, 5, generator=g, dtype=torch.float64),
             torch.randint(0, C, (N,), generator=g))
    acc = fimfast.structured.FisherAccumulator(model, "exact", rep, "sum")
    acc.update(batch)
    model[0].padding_mode = "reflect"
    with pytest.raises(ValueError, match=r"module '0' \(Conv2d\).*padding_mode='reflect'"):
        acc.update(batch)
class _Lookup(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(V, E, padding_idx=padding_idx).double()
        self.o = nn.Linear(E, C).double()

    def forward(self, ids):
        return self.o(torch.tanh(self.e(ids).mean(1)))


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("rep", REPS)
def test_negative_padding_idx_set_after_construction(rep, fim_type):
    """``padding_idx = -1`` set after construction: torch's lookup counts it from the end of the
    table (that row gets no gradient); the representations read it the same way."""
    model, plain = _Lookup(), _Lookup(padding_idx=V - 1)
    model.e.padding_idx = -1
    plain.load_state_dict(model.state_dict())
    ids, y = _ids()
    ids[:, 0] = V - 1
    _close(_matrix(_fisher(model, (ids, y), fim_type, rep), rep),
           _expected(plain, (ids, y), fim_type, rep))




def test_negative_padding_idx_with_reduce():
    """The same with ``kfac_approx="reduce"`` (the per-sample sums of one-hot rows)."""
    model, plain = _Lookup(), _Lookup(padding_idx=V - 1)
    model.e.padding_idx = -1
    plain.load_state_dict(model.state_dict())
    ids, y = _ids()
    ids[:, 0] = V - 1
    got, want = (fimfast.fisher(m, [(ids, y)], "exact", representation="kfac", reduction="sum",
                                kfac_approx="reduce").to_dense() for m in (model, plain))
    _close(got, want)
# -- a forward that is not the class's -------------------------------------------------------- #
def _instance_forward(model):
    lin = model[2]
    lin.forward = lambda h: F.linear(h, 2 * lin.weight, lin.bias)


class _Doubled(nn.Linear):
    def forward(self, h):
        return F.linear(h, 2 * self.weight, self.bias)


def _subclass_forward(model):
    new = _Doubled(7, C).double()
    new.load_state_dict(model[2].state_dict())
    model[2] = new


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("patch", [_instance_forward, _subclass_forward],
                         ids=["instance", "subclass"])
def test_forward_other_than_the_class_rule(patch, rep, fim_type):
    """A supported module whose forward is another (set on the instance, or a subclass that
    overrides it) computes something the Kronecker capture was not written for: refused, naming
    the module; the dense family differentiates the forward that runs."""
    model = _mlp()
    patch(model)
    batch = _data()
    if rep in KRON:
        with pytest.raises(ValueError, match=r"module '2'.*forward"):
            _fisher(model, batch, fim_type, rep)
        return
    _close(_matrix(_fisher(model, batch, fim_type, rep), rep),
           _expected(model, batch, fim_type, rep))




@pytest.mark.parametrize("rep", KRON)
@pytest.mark.parametrize("when", ["before", "after_first_batch"])
def test_forward_set_after_the_first_batch(rep, when):
    """Also checked on every batch, attention included: a forward set on the instance after the
    accumulator's first batch is refused."""
    model = MHAHead(D, C)
    acc = fimfast.structured.FisherAccumulator(model, "exact", rep, "sum")
    if when == "after_first_batch":
        acc.update(_data())
    a = model.a
    a.forward = lambda q, k, v, **kw: nn.MultiheadAttention.forward(a, 0.5 * q, k, v, **kw)
    with pytest.raises(ValueError, match=r"module 'a' \(MultiheadAttention\).*forward"):
        acc.update(_data(1))


class _Complex(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(D, 7).double()
        self.w = nn.Parameter(torch.randn(C, 7, dtype=torch.complex128))

    def forward(self, x):
        return (torch.tanh(self.a(x)).to(self.w.dtype) @ self.w.T).abs()


@pytest.mark.parametrize("rep", REPS)
def test_complex_parameters_are_refused(rep):
    """The Fisher of real parameters only (as ``DiagFisher``): refused naming the parameter."""
    with pytest.raises(ValueError, match=r"parameter\(s\) w are complex"):
        _fisher(_Complex(), _data(), "exact", rep)
