"""Attacks on what sits above the diagonal engine: the structured representations on models the
other structured tests do not use (against a float64 oracle of per-row Jacobians), the state of
the accumulators under bad input and changed models, saved states, and the workflows' inputs.

Every refusal is checked to leave the accumulated state bit for bit as it was."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fimfast
from fimfast.structured import FisherAccumulator

# -- a float64 oracle ------------------------------------------------------------------------- #


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]  # tied ones once


def _rows(model, batch, call):
    """``[(J (C, P), z (C,), label)]`` of the valid rows of one batch."""
    z, y, mask = call(model, batch)
    ps = _params(model)
    idx = [(n,) for n in range(z.shape[0])] if z.dim() == 2 else \
        [(n, t) for n in range(z.shape[0]) for t in range(z.shape[1])]
    out = []
    for i in idx:
        if int(y[i]) == -100 or (mask is not None and z.dim() == 3 and mask[i] == 0):
            continue
        J = torch.stack([torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(torch.autograd.grad(z[i][c], ps, retain_graph=True,
                                                allow_unused=True), ps)])
            for c in range(z.shape[-1])])
        out.append((J, z[i].detach(), int(y[i])))
    return out


def _oracle(model, batches, fim_type, reduction, call):
    F, R = 0.0, 0
    for b in batches:
        for J, z, y in _rows(model, b, call):
            p = torch.softmax(z, -1)
            if fim_type == "exact":
                F = F + J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
            else:
                g = J.T @ (nn.functional.one_hot(torch.tensor(y), len(p)).double() - p)
                F = F + torch.outer(g, g)
            R += 1
    return F / R if reduction == "mean" else F


def _plain(model, b):
    return model(b[0]), b[1], None


def _mapping(model, b):
    return model(b["input_ids"]), b["labels"], b["attention_mask"]


class _Tied(nn.Module):  # an output head tied to the embedding; token logits
    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(7, 5), nn.Linear(5, 5), nn.Linear(5, 7)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


class _Twice(nn.Module):  # one Linear called twice
    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.h(torch.tanh(self.a(torch.tanh(self.a(x)))))


class _Encoder(nn.Module):  # embedding with padding_idx, a Transformer layer, token logits
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(9, 6, padding_idx=0)
        self.layer = nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, batch_first=True)
        self.h = nn.Linear(6, 4)

    def forward(self, x):
        return self.h(self.layer(self.e(x)))


class _Conv(nn.Module):  # strided, padded and dilated convolutions
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 3, 2, dilation=2)
        self.h = nn.Linear(3, 3)

    def forward(self, x):
        return self.h(torch.tanh(self.c2(torch.tanh(self.c(x)))).mean((2, 3)))


class _Tokens(nn.Module):  # token logits whose tokens share a layer output (a cumsum)
    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.a(input_ids))
        return self.h(h + h.cumsum(1))


def _token_batch(N, T, g):
    mask = torch.ones(N, T, dtype=torch.long)
    mask[0, -2:] = 0
    y = torch.randint(0, 3, (N, T), generator=g)
    y[-1, 0] = -100
    return {"input_ids": torch.randn(N, T, 4, generator=g, dtype=torch.float64),
            "attention_mask": mask, "labels": y}


def _case(name):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(1)
    if name == "tied":
        y = torch.tensor([[1, 2, -100, 3], [0, 1, 2, 3], [4, 5, 6, -100]])
        return _Tied().double(), [(torch.randint(0, 7, (3, 4), generator=g), y),
                                  (torch.randint(0, 7, (2, 4), generator=g),
                                   torch.randint(0, 7, (2, 4), generator=g))]
    if name == "twice":
        return _Twice().double(), [(torch.randn(n, 4, generator=g, dtype=torch.float64),
                                    torch.randint(0, 3, (n,), generator=g)) for n in (3, 5)]
    if name == "encoder":
        x = torch.randint(0, 9, (2, 3), generator=g)
        x[0, 1] = 0  # a padding token
        return _Encoder().double().eval(), [(x, torch.randint(0, 4, (2, 3), generator=g)),
                                            (torch.randint(0, 9, (1, 3), generator=g),
                                             torch.randint(0, 4, (1, 3), generator=g))]
    return _Conv().double(), [(torch.randn(n, 2, 7, 7, generator=g, dtype=torch.float64),
                               torch.randint(0, 3, (n,), generator=g)) for n in (2, 3)]


def _blocks(model):
    """The module blocks of docs/structured.md (names sharing everything before the last dot)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in _params(model)]
    out, off = {}, 0
    for n, s in zip(names, sizes):
        out.setdefault(n.rsplit(".", 1)[0], []).append((off, off + s))
        off += s
    return [(v[0][0], v[-1][1]) for v in out.values()]


@pytest.mark.parametrize("name", ["tied", "twice", "encoder", "conv"])
@pytest.mark.parametrize("fim_type,reduction", [("exact", "sum"), ("empirical", "mean")])
def test_dense_family_and_quasi_diag_against_the_oracle(name, fim_type, reduction):
    model, batches = _case(name)
    O = _oracle(model, batches, fim_type, reduction, _plain)
    assert O.norm() > 1e-3 and (O - torch.diag(torch.diag(O))).norm() > 1e-4  # not vacuous
    P = O.shape[0]
    v = torch.randn(P, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for rep in ("dense", "block_diag", "low_rank", "quasi_diag"):
        if rep == "quasi_diag" and name == "tied":
            with pytest.raises(ValueError, match="shared by modules"):
                fimfast.fisher(model, batches, fim_type, rep, reduction)
            continue
        F = fimfast.fisher(model, batches, fim_type, rep, reduction)
        D = F.to_dense()
        if rep == "block_diag":
            ref = torch.zeros_like(O)
            for i, j in _blocks(model):
                ref[i:j, i:j] = O[i:j, i:j]
        elif rep == "quasi_diag":
            ref = torch.where(D != 0, O, torch.zeros_like(O))
            assert torch.allclose(torch.diag(D), torch.diag(O), rtol=1e-9, atol=1e-13)
        else:
            ref = O
        assert torch.allclose(D, ref, rtol=1e-9, atol=1e-12), (rep, (D - ref).norm())
        assert torch.allclose(F.mv(v), D @ v, rtol=1e-9, atol=1e-12)
        assert math.isclose(float(F.vTMv(v)), float(v @ D @ v), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(F.trace(), float(torch.trace(D)), rel_tol=1e-9)
        assert math.isclose(F.frobenius_norm(), float(D.norm()), rel_tol=1e-9)
        want = torch.linalg.solve(D + 0.1 * torch.eye(P, dtype=D.dtype), v)  # arrowheads too
        assert torch.allclose(F.solve(v, damping=0.1), want, rtol=1e-8, atol=1e-10)


def _kfac_oracle(model, batches, layers, fim_type, reduction, call, approx):
    """``{layer: (A, G)}`` from the definitions of docs/structured.md ("KFAC"), every call of a
    layer adding its positions, attention-mask weights on (N, T, I) inputs."""
    mods = dict(model.named_modules())
    seen: dict = {}
    hooks = [mods[n].register_forward_hook(
        lambda m, i, o, n=n: seen.setdefault(n, []).append((i[0], o))) for n in layers]
    A = {n: 0.0 for n in layers}
    M = {n: 0.0 for n in layers}
    G = {n: 0.0 for n in layers}
    R = 0
    try:
        for b in batches:
            seen.clear()
            z, y, mask = call(model, b)
            N = z.shape[0]
            for n in layers:
                parts, ws = [], []
                for a, _ in seen[n]:
                    a1 = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)
                    a1 = a1.reshape(N, -1, a1.shape[-1])
                    parts.append(a1)
                    ws.append(mask.double() if mask is not None and a1.shape[1] == mask.shape[1]
                              else torch.ones(a1.shape[:2], dtype=a1.dtype))
                a1, w = torch.cat(parts, 1), torch.cat(ws, 1)
                if approx == "expand":
                    A[n] = A[n] + torch.einsum("nt,nti,ntj->ij", w, a1, a1)
                    M[n] = M[n] + w.sum()
                else:
                    ab = (w[..., None] * a1).sum(1) / w.sum(1, keepdim=True)
                    A[n], M[n] = A[n] + ab.T @ ab, M[n] + N
            idx = [(i,) for i in range(N)] if z.dim() == 2 else \
                [(i, t) for i in range(N) for t in range(z.shape[1])]
            for r in idx:
                if int(y[r]) == -100 or (mask is not None and z.dim() == 3 and mask[r] == 0):
                    continue
                R += 1
                p = torch.softmax(z[r].detach(), -1)
                eye = torch.eye(len(p), dtype=p.dtype)
                cols = [p[c].sqrt() * (eye[c] - p) for c in range(len(p))] \
                    if fim_type == "exact" else [eye[int(y[r])] - p]
                for u in cols:
                    for n in layers:
                        outs = [o for _, o in seen[n]]
                        gs = torch.autograd.grad((u * z[r]).sum(), outs, retain_graph=True)
                        gs = [g[r[0]].reshape(-1, g.shape[-1]) for g in gs]
                        if approx == "expand":
                            G[n] = G[n] + sum(g.T @ g for g in gs)
                        else:
                            s = sum(g.sum(0) for g in gs)
                            G[n] = G[n] + torch.outer(s, s)
    finally:
        for h in hooks:
            h.remove()
    return {n: (A[n] / M[n], G[n] / R if reduction == "mean" else G[n]) for n in layers}


@pytest.mark.parametrize("name", ["twice", "tokens"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fim_type,reduction", [("exact", "mean"), ("empirical", "sum")])
def test_kfac_against_its_definition(name, approx, fim_type, reduction):
    """A Linear called twice (positions of both calls), and token logits with an attention mask,
    ``ignore_index`` and tokens sharing a layer output: ``F.mv`` on each layer's ``[W, b]`` is
    ``G V A`` of the factors computed from their definitions."""
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(2)
    if name == "twice":
        model, batches = _case("twice")
        call = _plain
    else:
        model = _Tokens().double()
        batches, call = [_token_batch(3, 4, g), _token_batch(2, 4, g)], _mapping
    F = fimfast.fisher(model, batches, fim_type, "kfac", reduction, kfac_approx=approx)
    ref = _kfac_oracle(model, batches, ["a", "h"], fim_type, reduction, call, approx)
    for layer, (A, G) in ref.items():
        m = getattr(model, layer)
        V = torch.randn(G.shape[0], A.shape[0], generator=g, dtype=torch.float64)
        v = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        v[f"{layer}.weight"], v[f"{layer}.bias"] = V[:, :-1].clone(), V[:, -1].clone()
        out = F.mv(v)
        got = torch.cat([out[f"{layer}.weight"], out[f"{layer}.bias"][:, None]], 1)
        want = G @ V @ A
        assert want.norm() > 1e-3
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (layer, (got - want).norm())
        assert m.weight.shape[0] == G.shape[0]


# -- state under bad input and changed models ---------------------------------------------- #


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.nan_to_num(7.0, 8.0, 9.0), b.nan_to_num(7.0, 8.0, 9.0))
    return a == b


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _replace(m):
    m[2].weight = nn.Parameter(m[2].weight.detach().clone())


def _add(m):
    m.add_module("extra", nn.Linear(3, 3))


def _freeze(m):
    m[0].weight.requires_grad_(False)


def _to_double(m):
    m.double()


@pytest.mark.parametrize("rep", ["dense", "block_diag", "low_rank", "kfac", "quasi_diag"])
@pytest.mark.parametrize("change", [_replace, _add, _freeze, _to_double])
def test_accumulator_refuses_a_model_whose_parameters_changed(rep, change):
    """A parameter replaced by a new tensor of the same shape was silently left out of the
    batches after the change by the dense family (its block kept only the first batch's part);
    an added module was ignored. Now every change of the trainable parameters is refused, naming
    ``model``, and nothing of the batch is added."""
    model = _mlp()
    acc = FisherAccumulator(model, "exact", rep, "sum")
    acc.update(_batch())
    before = copy.deepcopy(acc.state_dict())
    change(model)
    x, y = _batch(seed=1)
    if change is _to_double:
        x = x.double()
    with pytest.raises(ValueError, match="model: its trainable parameters changed"):
        acc.update((x, y))
    assert _same(before, acc.state_dict())


def test_accumulator_keeps_working_with_an_unchanged_model():
    model = _mlp()
    acc = FisherAccumulator(model, "exact", "dense", "sum")
    for s in range(3):
        acc.update(_batch(seed=s))
    model.train()  # a mode change is no parameter change
    acc.update(_batch(seed=3))
    want = fimfast.fisher(model, [_batch(seed=s) for s in range(4)], "exact", "dense", "sum")
    assert torch.equal(acc.result().to_dense(), want.to_dense())


@pytest.mark.parametrize("chunk", [None, 3])
def test_low_rank_over_max_rows_leaves_the_rows_as_they_were(chunk):
    """A batch refused for ``max_rows`` counted its rows anyway (and, split into chunks, kept its
    first chunks), so a later batch that fits was refused too."""
    model = _mlp()
    acc = FisherAccumulator(model, "exact", "low_rank", "sum", max_rows=20, pair_chunk=chunk)
    acc.update(_batch(5, 0))  # 15 rows
    before = copy.deepcopy(acc.state_dict())
    with pytest.raises(ValueError, match="max_rows=20"):
        acc.update(_batch(5, 1))  # 30 rows
    assert _same(before, acc.state_dict()) and acc.acc.nrows == 15
    acc.update(_batch(1, 2))  # 18 rows: fits
    want = fimfast.fisher(model, [_batch(5, 0), _batch(1, 2)], "exact", "low_rank", "sum")
    assert torch.allclose(acc.result().to_dense(), want.to_dense(), rtol=1e-5, atol=1e-7)


def _broken_diag_states(sd):
    for what in ("seed", "offset", "shape", "nan", "count"):
        bad = copy.deepcopy(sd)
        if what in ("seed", "offset"):
            del bad[what]
        elif what == "shape":
            bad["state"]["values"]["0.weight"] = torch.zeros(2, 2)
        elif what == "nan":
            bad["state"]["values"]["0.weight"] = bad["state"]["values"]["0.weight"] * math.nan
        else:
            bad["state"]["count"] = -1
        yield what, bad


def test_diag_fisher_load_state_dict_is_all_or_nothing():
    """A saved state without its seed or offset replaced the state and then raised a KeyError;
    values of the wrong shape or with NaN were taken as they were."""
    model = _mlp()
    src = fimfast.DiagFisher(model, "exact", seed=0)
    src.step(_batch())
    sd = src.state_dict()
    for what, bad in _broken_diag_states(sd):
        est = fimfast.DiagFisher(model, "exact", seed=1)
        est.step(_batch(3, 1))
        before = copy.deepcopy(est.state_dict())
        with pytest.raises(ValueError, match="state_dict"):
            est.load_state_dict(bad)
        assert _same(before, est.state_dict()), what
    est.load_state_dict(sd)
    assert torch.equal(est.result().to_vector(), src.result().to_vector())


@pytest.mark.parametrize("rep", ["kfac", "dense", "block_diag", "ekfac"])
def test_accumulator_load_state_dict_is_all_or_nothing(rep):
    model = _mlp()
    src = FisherAccumulator(model, "exact", rep, "sum", seed=0)
    src.update(_batch())
    sd = src.state_dict()
    key = {"kfac": "sums", "ekfac": "sums", "dense": "sum", "block_diag": "block_sums"}[rep]
    for what in ("missing", "count", "shape"):
        bad = copy.deepcopy(sd)
        if what == "missing":
            del bad[key]
        elif what == "count":
            del bad["stream"]["count"]
        else:
            bad[key] = bad[key][:1]
        acc = FisherAccumulator(model, "exact", rep, "sum", seed=0)
        acc.update(_batch(3, 1))
        before = copy.deepcopy(acc.state_dict())
        with pytest.raises(ValueError, match="state"):
            acc.load_state_dict(bad)
        assert _same(before, acc.state_dict()), what
    acc.load_state_dict(sd)
    assert _same(acc.state_dict(), sd)


# -- workflows' inputs ------------------------------------------------------------------------ #


def _fisher(reduction="mean"):
    model = _mlp()
    return model, fimfast.diag_fisher(model, [_batch()], "exact", reduction=reduction)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_workflows_refuse_a_non_finite_fisher(bad):
    """A NaN passed the workflows' ``< 0`` test: EWC's penalty, a merge and a Laplace posterior
    became NaN, and a failed ``consolidate`` is now refused before it adds a term."""
    model, F = _fisher()
    d = dict(F)
    d["2.bias"] = d["2.bias"].clone()
    d["2.bias"][1] = bad
    broken = fimfast.DiagFIM(d, F.meta)
    with pytest.raises(ValueError, match=r"fisher\['2.bias'\] has 1 non-finite"):
        fimfast.EWC(model, broken)
    ewc = fimfast.EWC(model, F)
    before = copy.deepcopy(ewc.state_dict())
    with pytest.raises(ValueError, match=r"fisher\['2.bias'\]"):
        ewc.consolidate(broken)
    assert _same(before, ewc.state_dict()) and ewc.num_terms == 1
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    anchor["0.bias"][0] = bad
    with pytest.raises(ValueError, match=r"anchor\['0.bias'\]"):
        ewc.consolidate(F, anchor)
    with pytest.raises(ValueError, match=r"fisher\['2.bias'\]"):
        fimfast.DiagLaplace(model, broken)
    with pytest.raises(ValueError, match=r"fishers\[1\]\['2.bias'\]"):
        fimfast.fisher_merge([model, copy.deepcopy(model)], [F, broken])
    with pytest.raises(ValueError, match=r"fisher\['2.bias'\]"):
        fimfast.sensitivity.prune_mask(model, broken, sparsity=0.5)


def test_diag_fim_refuses_mixed_reductions_and_non_finite_scalars():
    _, F = _fisher("mean")
    _, S = _fisher("sum")
    with pytest.raises(ValueError, match="reduction='sum'.*reduction='mean'"):
        F + S
    with pytest.raises(ValueError, match="reduction"):
        S - F
    assert torch.equal((F + F).to_vector(), 2 * F.to_vector())
    for s in (math.nan, math.inf, torch.tensor(math.inf)):
        with pytest.raises(ValueError, match="scalar must be finite"):
            F * s
        with pytest.raises(ValueError, match="scalar must be finite"):
            F / s
    v = torch.randn(F.numel())
    K = fimfast.fisher(_mlp(), [_batch()], "exact", "kfac")
    for M in (F, K):
        with pytest.raises(ValueError, match="damping must be a number >= 0 and finite"):
            M.solve(v, damping=math.inf)
        with pytest.raises(ValueError, match="damping"):
            M.inverse(damping=math.inf)


def test_a_structured_file_is_not_read_as_a_diagonal(tmp_path):
    """``DiagFIM.load`` read a KFAC file as a diagonal whose entries were the factors."""
    model = _mlp()
    path = tmp_path / "k.safetensors"
    fimfast.fisher(model, [_batch()], "exact", "kfac").save(str(path))
    with pytest.raises(ValueError, match="structured Fisher file.*'kfac'"):
        fimfast.DiagFIM.load(str(path))
    with pytest.raises(ValueError, match="structured Fisher file"):
        fimfast.load_fisher(str(path), model=model)
    assert isinstance(fimfast.structured.load(str(path)), fimfast.structured.KFACFIM)


def test_kfac_accumulator_refuses_use_after_result_consume():
    """``result(consume=True)`` hands KFAC's sums over as the result's factors (scaled and
    mirrored in place); a later batch was added into them, so the next result was off by about
    half and the first one changed under its holder."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 20), nn.Tanh(), nn.Linear(20, 3))  # > 192 columns
    acc = FisherAccumulator(model, "exact", "kfac", "sum")
    acc.update((torch.randn(5, 200), torch.randint(0, 3, (5,))))
    sd = acc.state_dict()
    F = acc.result(consume=True)
    A = F.A[0].clone()
    for call in (lambda: acc.update((torch.randn(5, 200), torch.randint(0, 3, (5,)))),
                 acc.result, acc.state_dict):
        with pytest.raises(ValueError, match="consume=True"):
            call()
    assert torch.equal(F.A[0], A)
    acc.load_state_dict(sd)  # new sums: usable again
    assert torch.allclose(acc.result().A[0], A)


# -- training callbacks ----------------------------------------------------------------------- #

_HF = __import__("importlib").util.find_spec("transformers") is not None and \
    __import__("importlib").util.find_spec("accelerate") is not None


@pytest.mark.skipif(not _HF, reason="the Trainer needs transformers and accelerate")
def test_hf_callback_reused_for_a_second_training_estimates_the_second_model(tmp_path):
    """A callback reused for the next task (a new Trainer, another model) kept the first
    training's DiagFisher, bound to the first model: the second Fisher was the first model's,
    its ``when="end"`` pass added to the first pass, and the file got the second model's
    fingerprint."""
    from test_integrations import _args, _batches, _hf_data, _tiny_bert
    from transformers import Trainer

    from fimfast.integrations.hf import FisherCallback

    rows = _hf_data()
    loader = _batches(rows)
    end = FisherCallback("exact", when="end", dataloader=loader, max_batches=2, save_path=False)
    step = FisherCallback("empirical", when="step", every_n_steps=2, save_path=False)
    for seed in (0, 1):
        model = _tiny_bert(seed)
        Trainer(model=model, args=_args(tmp_path / str(seed)), train_dataset=rows,
                callbacks=[end, step]).train()
        model.eval()
        ref = fimfast.diag_fisher(model, loader[:2], "exact", reduction="mean")
        assert end.fisher.meta["count"] == 16 and end.fisher.allclose(ref, rtol=1e-5, atol=1e-9)
        assert end.estimator.model is model and step.estimator.model is model
        assert step.estimator.state.steps == 2  # this training's two steps only
    with pytest.raises(ValueError, match="reduction"):
        FisherCallback("exact", reduction="avg")  # checked when made, not after training


_PL = __import__("importlib").util.find_spec("lightning") or \
    __import__("importlib").util.find_spec("pytorch_lightning")


@pytest.mark.skipif(_PL is None, reason="needs lightning or pytorch_lightning")
def test_lightning_callback_reused_for_a_second_fit_estimates_the_second_model(tmp_path):
    from test_integrations import _pl
    from torch.utils.data import DataLoader, TensorDataset

    from fimfast.integrations.lightning import FisherCallback

    pl = _pl()

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    end = FisherCallback("exact", dataloader=[(x[:16],), (x[16:],)], save_path=False)
    step = FisherCallback("empirical", when="step", every_n_steps=2, save_path=False)
    for seed in (0, 1):
        torch.manual_seed(seed)
        module = Net()
        pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(tmp_path), callbacks=[end, step]).fit(
            module, DataLoader(TensorDataset(x, y), batch_size=16))
        module.eval()
        ref = fimfast.diag_fisher(module, [(x[:16],), (x[16:],)], "exact", reduction="mean")
        assert end.fisher.meta["count"] == 32 and end.fisher.allclose(ref, rtol=1e-5, atol=1e-9)
        assert step.estimator.model is module and step.estimator.state.steps == 1


def test_workflow_arguments_must_be_finite():
    """``lam=inf`` made the EWC penalty inf (NaN at the anchor), an infinite merge weight or
    ``eps`` made every merged parameter NaN, and ``avg_bits=nan`` was taken as a budget."""
    model, F = _fisher()
    with pytest.raises(ValueError, match="lam must be a number >= 0 and finite"):
        fimfast.EWC(model, F, lam=math.inf)
    other = copy.deepcopy(model)
    with pytest.raises(ValueError, match="weights must be >= 0, finite"):
        fimfast.fisher_merge([model, other], [F, F], weights=[math.inf, 1.0])
    with pytest.raises(ValueError, match="eps must be a number >= 0 and finite"):
        fimfast.fisher_merge([model, other], [F, F], eps=math.inf)
    for bad in (math.nan, math.inf, "4"):
        with pytest.raises(ValueError, match="avg_bits must be a finite number"):
            fimfast.sensitivity.allocate_bits(model, F, avg_bits=bad)
    assert fimfast.sensitivity.allocate_bits(model, F, avg_bits=torch.tensor(4.0)).avg_bits <= 4


def test_fisher_checks_counts_and_the_options_diag_does_not_take():
    """``max_rows`` was read only once exceeded (a string raised a TypeError), ``max_batches=0``
    read as an empty loader and ``1.5`` was taken; ``representation="diag"`` dropped
    ``kfac_approx``, ``rank``, ``pair_chunk`` and ``max_rows`` without a word."""
    model, data = _mlp(), [_batch()]
    for name, bad in (("max_rows", 0), ("max_rows", "10"), ("max_rows", True),
                      ("max_batches", 0), ("max_batches", 1.5)):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1 or None"):
            fimfast.fisher(model, data, "exact", "low_rank", **{name: bad})
    with pytest.raises(ValueError, match="max_batches must be"):
        FisherAccumulator(model, "exact", "kfac").add(data, max_batches=-1)
    for name, value in (("kfac_approx", "reduce"), ("rank", 2), ("pair_chunk", 4),
                        ("max_rows", 10)):
        with pytest.raises(ValueError, match=f"{name}: not options of representation='diag'"):
            fimfast.fisher(model, data, "exact", "diag", **{name: value})
    with pytest.raises(ValueError, match="distributed must be"):
        fimfast.fisher(model, data, "exact", "diag", distributed="yes")
    F = fimfast.fisher(model, data, "exact", "diag", distributed="none")
    want = fimfast.diag_fisher(model, data, "exact", reduction="mean")
    assert torch.equal(F.to_vector(), want.to_vector())


def _ekfac_oracle(model, batches, layers, call, UA, UG, reduction):
    """EKFAC's ``D = sum_q (U_G^T M_q U_A)^2`` with ``M_q = sum_t g_{q,t} [a_t, 1]^T`` the exact
    per-pair gradient (every position of every call, padded ones included) (EXACT columns)."""
    mods = dict(model.named_modules())
    seen: dict = {}
    hooks = [mods[n].register_forward_hook(
        lambda m, i, o, n=n: seen.setdefault(n, []).append((i[0], o))) for n in layers]
    D, R = [0.0] * len(layers), 0
    try:
        for b in batches:
            seen.clear()
            z, y, mask = call(model, b)
            idx = [(i,) for i in range(z.shape[0])] if z.dim() == 2 else \
                [(i, t) for i in range(z.shape[0]) for t in range(z.shape[1])]
            for r in idx:
                if int(y[r]) == -100 or (mask is not None and z.dim() == 3 and mask[r] == 0):
                    continue
                R += 1
                p = torch.softmax(z[r].detach(), -1)
                eye = torch.eye(len(p), dtype=p.dtype)
                for c in range(len(p)):
                    u = p[c].sqrt() * (eye[c] - p)
                    for k, n in enumerate(layers):
                        gs = torch.autograd.grad((u * z[r]).sum(), [o for _, o in seen[n]],
                                                 retain_graph=True)
                        Mq = sum(g[r[0]].reshape(-1, g.shape[-1]).T @ torch.cat(
                            [a[r[0]].reshape(-1, a.shape[-1]),
                             torch.ones(a[r[0]].reshape(-1, a.shape[-1]).shape[0], 1,
                                        dtype=a.dtype)], 1)
                            for g, (a, _) in zip(gs, seen[n]))
                        D[k] = D[k] + (UG[k].T @ Mq @ UA[k]) ** 2
    finally:
        for h in hooks:
            h.remove()
    return [d / R if reduction == "mean" else d for d in D]


@pytest.mark.parametrize("name", ["twice", "tokens"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ekfac_refit_against_its_definition(name, reduction):
    """The refitted diagonal is that of the true per-pair gradients in the Kronecker basis, for a
    Linear called twice and for token logits whose padded positions still carry gradient (a
    cumsum mixes the tokens) while the attention mask leaves them out of ``A``."""
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(2)
    if name == "twice":
        (model, batches), call = _case("twice"), _plain
    else:
        model, call = _Tokens().double(), _mapping
        batches = [_token_batch(3, 4, g), _token_batch(2, 4, g)]
    F = fimfast.fisher(model, batches, "exact", "ekfac", reduction)
    ref = _ekfac_oracle(model, batches, ["a", "h"], call, F.UA, F.UG, reduction)
    for got, want in zip(F.D, ref):
        assert want.norm() > 1e-4
        assert torch.allclose(got.reshape(want.shape), want, rtol=1e-9, atol=1e-13)


class _TiedClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(7, 5), nn.Linear(5, 5), nn.Linear(5, 7)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x).mean(1))))


def test_fisher_merge_of_tied_weights_merges_the_shared_tensor(tmp_path):
    """``state_dict()`` lists a tied weight under both names, the Fisher under one: the other
    name was plain-averaged, and loading the merge (``out=`` a module, or ``load_state_dict``)
    wrote that average over the Fisher-weighted tensor."""
    torch.manual_seed(0)
    a = _TiedClassifier()
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p))
    data = [(torch.randint(0, 7, (6, 3)), torch.randint(0, 7, (6,)))]
    Fa, Fb = (fimfast.diag_fisher(m, data, "exact", reduction="mean") for m in (a, b))
    fa, fb = Fa["emb.weight"] + 1e-8, Fb["emb.weight"] + 1e-8
    want = (fa * a.emb.weight + fb * b.emb.weight).detach() / (fa + fb)
    assert not torch.allclose(want, (a.emb.weight + b.emb.weight).detach() / 2, atol=1e-3)
    merged = fimfast.fisher_merge([a, b], [Fa, Fb])
    assert torch.allclose(merged["emb.weight"], want, atol=1e-6)
    assert torch.equal(merged["head.weight"], merged["emb.weight"])
    out = fimfast.fisher_merge([a, b], [Fa, Fb], out=copy.deepcopy(a))
    assert torch.allclose(out.emb.weight, want, atol=1e-6) and out.head.weight is out.emb.weight
    path = fimfast.fisher_merge([a, b], [Fa, Fb], out=str(tmp_path / "m.safetensors"))
    from safetensors.torch import load_file

    assert torch.allclose(load_file(path)["head.weight"], want, atol=1e-6)


@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag"])
def test_sums_that_overflow_are_refused_when_read(rep):
    """Inputs of 1e20 keep the logits finite (a Tanh saturates) while their squares overflow
    float32: KFAC's input factor was returned with infinite entries (its ``mv`` NaN), the
    quasi-diagonal's squares ``g^2 a^2`` were ``0 * inf`` (NaN), and EKFAC's ``start_refit``
    scaled the sums in place before its eigendecomposition failed. (The dense family's
    gradients are 0 there: finite, and exact.)"""
    model = _mlp()
    acc = FisherAccumulator(model, "exact", rep, "sum", seed=0)
    acc.update((torch.randn(5, 4) * 1e20, torch.randint(0, 3, (5,))))
    before = copy.deepcopy(acc.state_dict())
    read = acc.start_refit if rep == "ekfac" else acc.result
    with pytest.raises(ValueError, match="not finite"):
        read()
    assert _same(before, acc.state_dict()) and acc.phase == "factors"


@pytest.mark.parametrize("fim_type", ["exact", "empirical", "monte_carlo"])
def test_diag_estimate_with_overflowed_squares_is_refused_when_read(fim_type):
    """The same inputs of 1e20: the per-sample squares of the first layer's weights were
    ``0 * inf`` and ``result()`` returned NaN for them (true value 0, as the dense Fisher says)."""
    model = _mlp()
    batch = (torch.randn(5, 4) * 1e20, torch.randint(0, 3, (5,)))
    est = fimfast.DiagFisher(model, fim_type, seed=0)
    est.step(batch)
    with pytest.raises(ValueError, match=r"estimate of \['0.weight'\] has non-finite"):
        est.result()
    D = fimfast.fisher(model, [batch], fim_type, "dense", "sum", seed=0).to_dense()
    assert torch.isfinite(D).all()
