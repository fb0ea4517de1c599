"""The structured Fisher on layouts the other structured tests do not use: exact against the
float64 brute force of its definition, or refused naming the module.

* KFAC (``expand``, ``reduce``) and EKFAC's refitted diagonal against tests/kfac_brute.py for a
  Linear on ``(N, A, B, D)`` inputs, a Linear called twice on inputs of different shapes, a
  convolution of rectangular kernel with stride, dilation and no bias (also channels_last), a
  convolution called twice, and a token model (batch-first ``nn.TransformerEncoderLayer`` with a
  padding mask, ``ignore_index`` labels, a first sample without a valid token); several batches of
  different sizes, ``reduction="mean"`` and ``max_batches``; EXACT and EMPIRICAL.
* A layer whose first dimension only has the batch's size (a sequence-first
  ``nn.TransformerEncoderLayer`` with ``T == N``, a Linear applied to a table of class embeddings
  with as many rows as the batch) or an operation that mixes the samples (a shift, a cumulative
  sum along the batch): before, ``kfac``, ``ekfac`` and ``quasi_diag`` took the other samples'
  gradients at a position as that position's sample's own (the quasi-diagonal of the class-table
  model off by 1.66 against entries of 1.87); now refused, naming the module, with nothing added.
  The dense family stays exact on them (float64 oracle).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from kfac_brute import dense_exact
from kfac_brute import kfac as brute

import fimfast
from fimfast.structured import FisherAccumulator

C = 3


def _close(got, want, tol=1e-10):
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert scale > 0 and err <= tol * scale, f"max error {err:.3e} vs scale {scale:.3e}"


class _NABD(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(6, 5), nn.Linear(5, C)

    def forward(self, x):  # (N, A, B, 6)
        return self.o(torch.tanh(self.a(x)).mean((1, 2)))


class _TwiceShapes(nn.Module):
    """One Linear called on ``(N, 6)`` and on ``(N, 3, 6)`` inputs."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(6, 6), nn.Linear(6, C)

    def forward(self, x):
        w = torch.arange(1.0, 4.0, dtype=x.dtype)[None, :, None]
        h2 = self.a(torch.tanh(x).unsqueeze(1).expand(-1, 3, -1) * w).mean(1)
        return self.o(torch.tanh(self.a(x) + h2))


class _TwiceConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.o = nn.Conv2d(2, 2, 3, padding=1), nn.Linear(50, C)

    def forward(self, x):
        return self.o(torch.tanh(self.c(torch.tanh(self.c(x)))).flatten(1))


def _conv(channels_last=False):
    m = nn.Sequential(nn.Conv2d(2, 3, (2, 3), padding=(1, 0), stride=(1, 2), dilation=(2, 1),
                                bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 2, C))
    return m.to(memory_format=torch.channels_last) if channels_last else m


MODELS = {  # model, input shape of one sample
    "nabd": (_NABD, (2, 3, 6)),
    "twice_shapes": (_TwiceShapes, (6,)),
    "conv": (_conv, (2, 5, 5)),
    "conv_channels_last": (lambda: _conv(True), (2, 5, 5)),
    "twice_conv": (_TwiceConv, (2, 5, 5)),
}


def _batches(shape, sizes=(4, 3, 5), channels_last=False):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in sizes:
        x = torch.randn((n,) + shape, generator=g, dtype=torch.float64)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, C, (n,), generator=g)))
    return out


@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
@pytest.mark.parametrize("rep", ["kfac-expand", "kfac-reduce", "ekfac"])
@pytest.mark.parametrize("name", list(MODELS))
def test_kronecker_against_the_brute_force(name, rep, fim_type):
    """Two batches of 4 and 3 samples (``max_batches=2`` of three), ``reduction="mean"``."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().double()
    data = _batches(shape, channels_last=name.endswith("channels_last"))
    rep, _, approx = rep.partition("-")
    got = fimfast.fisher(model, data, fim_type, representation=rep, reduction="mean",
                         kfac_approx=approx or "expand", max_batches=2)
    basis = [(ua, ug) for ua, ug in zip(got.UA, got.UG)] if rep == "ekfac" else None
    want = brute(copy.deepcopy(model), data[:2], approx or "expand", fim_type, "mean",
                 basis=basis)
    _close(got.to_dense().double(), want)


class _Tok(nn.Module):
    """Batch-first token model with a padding mask; the attention's and norms' parameters frozen
    (the brute force covers the Linear layers)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.i, self.o = nn.Linear(4, 4), nn.Linear(4, C)
        self.l = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
        for m in (self.l.self_attn, self.l.norm1, self.l.norm2):
            m.requires_grad_(False)

    def forward(self, inputs_embeds, attention_mask):
        return self.o(self.l(self.i(inputs_embeds), src_key_padding_mask=attention_mask == 0))


def _tokens(N, T, seed):
    g = torch.Generator().manual_seed(seed)
    am = torch.ones(N, T, dtype=torch.long)
    am[-1, -2:] = 0
    lab = torch.randint(0, C, (N, T), generator=g)
    lab[am == 0] = -100
    lab[0] = -100  # the first sample has no valid token
    return {"inputs_embeds": torch.randn(N, T, 4, generator=g, dtype=torch.float64),
            "attention_mask": am, "labels": lab}


@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_token_model_with_masks_against_the_brute_force(approx, fim_type):
    model = _Tok().double().eval()
    data = [_tokens(3, 4, 0), _tokens(2, 5, 1)]
    got = fimfast.fisher(model, data, fim_type, representation="kfac", reduction="mean",
                         kfac_approx=approx)
    want = brute(copy.deepcopy(model), data, approx, fim_type, "mean",
                 logits=lambda m, b: m(b["inputs_embeds"], b["attention_mask"]),
                 labels=lambda b: b["labels"], weights=lambda b: b["attention_mask"])
    _close(got.to_dense().double(), want)


# -- layers whose first dimension is not the batch, operations that mix the samples ---------- #
class _ClassTable(nn.Module):
    """Logits against a projected table of class embeddings (``C`` rows, no batch dimension)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f, self.p = nn.Linear(5, 4), nn.Linear(6, 4)
        self.table = nn.Parameter(torch.randn(C, 6), requires_grad=False)

    def forward(self, x):
        return torch.tanh(self.f(x)) @ self.p(self.table).T


class _SeqFirst(nn.Module):
    """``nn.TransformerEncoderLayer(batch_first=False)`` on ``(T, N, E)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0)
        self.o = nn.Linear(4, C)

    def forward(self, x):
        return self.o(self.l(x.transpose(0, 1)).mean(0))


class _Mixed(nn.Module):
    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.o, self.how = nn.Linear(5, 4), nn.Linear(4, C), how

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.roll(h, 1, 0) if self.how == "roll" else torch.cumsum(h, 0) / 3
        return self.o(h)


MIXED = {  # model, input of 3 samples, the module named
    "class_table": (_ClassTable, (3, 5), "p"),
    "seq_first": (_SeqFirst, (3, 3, 4), "l.linear1"),
    "roll": (lambda: _Mixed("roll"), (3, 5), "a"),
    "cumsum": (lambda: _Mixed("cumsum"), (3, 5), "a"),
}


@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag"])
@pytest.mark.parametrize("name", list(MIXED))
def test_samples_not_apart_refused(name, rep):
    make, shape, module = MIXED[name]
    model = make().double()
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(shape, generator=g, dtype=torch.float64),
             torch.randint(0, C, (3,), generator=g))
    acc = FisherAccumulator(model, "monte_carlo", rep, "sum", seed=0)
    with pytest.raises(ValueError, match=rf"module '{module}' .*reaches the output positions "
                                         r"of other samples"):
        acc.update(batch)
    assert acc.stream.count == 0 and acc.stream.offset == 0 and all(s.empty for s in acc.sums)
    with pytest.raises(ValueError, match=rf"module '{module}'"):
        fimfast.fisher(model, [batch], "exact", representation=rep, reduction="sum")


@pytest.mark.parametrize("name", list(MIXED))
def test_samples_not_apart_dense_is_exact(name):
    """The same models in the dense family: the Fisher of the function that runs."""
    make, shape, _ = MIXED[name]
    model = make().double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, C, (3,))
    got = fimfast.fisher(model, [(x, y)], "exact", representation="dense", reduction="sum")
    _close(got.to_dense().double(), dense_exact(model, [x]))



class _MixEven(nn.Module):
    """Mixes the samples (a shift along the batch) only in batches of an even size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.o = nn.Linear(5, 4), nn.Linear(4, C)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.o(torch.roll(h, 1, 0) if x.shape[0] % 2 == 0 else h)


@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag"])
def test_a_later_batch_that_mixes_is_refused_and_adds_nothing(rep):
    """A batch of another layout is checked again (its graph has the shift): refused, with the
    sums and the random stream as they were; going on gives, bit for bit, the matrix of the
    other batches."""
    model = _MixEven().double()
    g = torch.Generator().manual_seed(3)
    good = [(torch.randn(3, 5, generator=g, dtype=torch.float64),
             torch.randint(0, C, (3,), generator=g)) for _ in range(2)]
    bad = (torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randint(0, C, (4,)))

    def run(with_bad):
        acc = FisherAccumulator(model, "monte_carlo", rep, "mean", seed=1)
        for phase in (["factors", "refit"] if rep == "ekfac" else ["factors"]):
            if phase == "refit":
                acc.start_refit()
            acc.update(good[0])
            if with_bad:
                with pytest.raises(ValueError, match=r"module 'a' .*other samples"):
                    acc.update(bad)
            acc.update(good[1])
        return acc.result().to_dense()

    want = run(False)
    assert float(want.abs().max()) > 0
    assert torch.equal(run(True), want)


# -- operations --------------------------------------------------------------------------------- #
class _EmbLnAttn(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e, self.ln = nn.Embedding(7, 4, padding_idx=0), nn.LayerNorm(4)
        self.a, self.c = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, C)

    def forward(self, ids):
        h = self.ln(self.e(ids))
        return self.c(self.a(h, h, h, need_weights=False)[0].mean(1))


REPS = ("dense", "block_diag", "low_rank", "quasi_diag", "kfac", "ekfac")


@pytest.mark.parametrize("rep", REPS)
def test_operations_against_the_dense_matrix(rep, tmp_path):
    """MONTE_CARLO on an embedding (``padding_idx``), LayerNorm and attention model: every
    operation equals the same operation on ``to_dense()`` in float64, also after a file round
    trip; a complex vector is refused, naming it (its imaginary part was dropped by a cast)."""
    model = _EmbLnAttn().double()
    g = torch.Generator().manual_seed(4)
    batch = (torch.randint(0, 7, (6, 3), generator=g), torch.randint(0, C, (6,), generator=g))
    Fm = fimfast.fisher(model, [batch], "monte_carlo", representation=rep, reduction="mean",
                        seed=1, num_probes=2)
    Fm.save(tmp_path / "f.safetensors")
    D = Fm.to_dense().double()
    P = D.shape[0]
    v = torch.randn(P, generator=g, dtype=torch.float64)
    for M in (Fm, fimfast.structured.load(tmp_path / "f.safetensors")):
        _close(M.to_dense().double(), D, 0)
        _close(M.mv(v), D @ v)
        dv = M.mv(M.unflat(v))
        _close(torch.cat([dv[n].reshape(-1) for n in M.names]), D @ v)
        _close(M.vTMv(v), v @ D @ v)
        _close(M.trace(), D.trace())
        _close(M.frobenius_norm(), D.norm())
        _close(torch.cat([t.reshape(-1) for t in M.diag().values()]), D.diagonal())
        for d in (1e-2, 1.0):
            Dd = D + d * torch.eye(P, dtype=D.dtype)
            _close(M.solve(v, damping=d), torch.linalg.solve(Dd, v), 1e-8)
            _close(M.inverse(damping=d).to_dense().double(), torch.linalg.inv(Dd), 1e-8)
        for bad in (v.to(torch.complex128), M.unflat(v.to(torch.complex128))):
            with pytest.raises(ValueError, match="v must be real; got dtype torch.complex128"):
                M.mv(bad)
        with pytest.raises(ValueError, match="v must be real"):
            M.solve(v.to(torch.complex128), damping=1.0)


@pytest.mark.parametrize("fim_type", ["monte_carlo", "hutchinson"])
@pytest.mark.parametrize("name", ["nabd", "conv"])
def test_random_factors_with_the_same_draws(name, fim_type):
    """MONTE_CARLO and HUTCHINSON on the ``(N, A, B, D)`` Linear and the strided, dilated
    convolution: KFAC's factors and EKFAC's refit equal the float64 oracle built from the same
    draws (tests/adversarial_structured.py), two batches, ``reduction="mean"``."""
    import adversarial_structured as ast

    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().double()
    data = _batches(shape, sizes=(4, 3))
    kw = {"seed": 5, "num_probes": 2}
    Fk = fimfast.fisher(model, data, fim_type, "kfac", "mean", **kw)
    Fe = fimfast.fisher(model, data, fim_type, "ekfac", "mean", **kw)
    refit = {info["weight"]: (Fe.UA[i], Fe.UG[i]) for i, info in enumerate(Fe.layers)}
    ref, D = ast.kfac(model, data, fim_type, 5, 2, "mean", refit=refit)
    for i, info in enumerate(Fk.layers):
        a, g = ref[info["weight"]]
        _close(Fk.A[i].double(), a)
        _close(Fk.G[i].double(), g)
        _close(Fe.D[i].double(), D[info["weight"]])


def test_ekfac_draws_have_the_matrix_as_covariance():
    """``sample`` of EKFAC and of KFAC's inverse (an EKFAC): the covariance of 4000 draws
    within 5 standard errors of the matrix (a Gaussian's: ``Var(x_i x_j) = S_ii S_jj + S_ij^2``);
    a count of draws that is not an integer ``>= 1`` is refused, naming ``n``."""
    model = _EmbLnAttn().double()
    g = torch.Generator().manual_seed(4)
    batch = (torch.randint(0, 7, (6, 3), generator=g), torch.randint(0, C, (6,), generator=g))
    E = fimfast.fisher(model, [batch], "exact", representation="ekfac", reduction="mean")
    K = fimfast.fisher(model, [batch], "exact", representation="kfac", reduction="mean")
    for M in (E, K.inverse(damping=0.1)):
        n, D = 4000, M.to_dense()
        S = M.sample(n, generator=torch.Generator().manual_seed(0))
        se = ((torch.outer(D.diagonal(), D.diagonal()) + D**2) / n).sqrt()
        err = (S.T @ S / n - D).abs()
        assert float(D.abs().max()) > 0
        assert bool((err <= 5 * se + 1e-12).all()), float((err / (se + 1e-30)).max())
        for bad in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match=r"n must be an integer >= 1; got"):
                M.sample(bad)


class _Freq(nn.Module):
    def __init__(self, scale: bool):
        super().__init__()
        torch.manual_seed(0)
        self.e, self.c = nn.Embedding(5, 4, scale_grad_by_freq=scale), nn.Linear(4, C)

    def forward(self, ids):
        return self.c(torch.tanh(self.e(ids)).mean(1))


@pytest.mark.parametrize("rep", REPS)
def test_scale_grad_by_freq_is_the_fisher_of_the_lookup(rep):
    """``nn.Embedding(scale_grad_by_freq=True)`` computes the same function as without it; its
    flag only divides autograd's gradient of the table by token counts over the whole batch.
    Before, the dense family took those gradients (dense off by 0.11 against entries of 0.94,
    and different for the same samples batched otherwise); now every representation equals the
    lookup's, and the flag is put back, also after a batch that fails."""
    model, plain = _Freq(True).double(), _Freq(False).double()
    g = torch.Generator().manual_seed(4)
    ids, y = torch.randint(0, 5, (4, 3), generator=g), torch.randint(0, C, (4,), generator=g)
    want = fimfast.fisher(plain, [(ids, y)], "exact", representation=rep, reduction="sum")
    for batches in ([(ids, y)], [(ids[i:i + 1], y[i:i + 1]) for i in range(4)]):
        got = fimfast.fisher(model, batches, "exact", representation=rep, reduction="sum")
        _close(got.to_dense().double(), want.to_dense().double(), 1e-12)
        assert model.e.scale_grad_by_freq
    if rep == "dense":
        _close(want.to_dense(), dense_exact(plain, [ids]))
    with pytest.raises(ValueError):
        fimfast.fisher(model, [(ids, y[:2])], "exact", representation=rep)
    assert model.e.scale_grad_by_freq


@pytest.mark.parametrize("fim_type", ["exact", "empirical", "monte_carlo", "hutchinson"])
def test_scale_grad_by_freq_in_the_diagonal(fim_type):
    """The same for ``representation="diag"`` (a ``DiagFisher`` pass, whose generic path took the
    divided gradients: off by 0.026 against entries of 0.94): equal to the lookup's diagonal (the
    same draws for the random types), for the batch whole and, for EXACT and EMPIRICAL, split per
    sample; the flag put back."""
    model, plain = _Freq(True).double(), _Freq(False).double()
    g = torch.Generator().manual_seed(4)
    ids, y = torch.randint(0, 5, (4, 3), generator=g), torch.randint(0, C, (4,), generator=g)
    want = fimfast.fisher(plain, [(ids, y)], fim_type, representation="diag", reduction="sum",
                          seed=1)
    splits = [[(ids, y)]] if fim_type in ("monte_carlo", "hutchinson") else \
        [[(ids, y)], [(ids[i:i + 1], y[i:i + 1]) for i in range(4)]]
    for batches in splits:
        got = fimfast.fisher(model, batches, fim_type, representation="diag", reduction="sum",
                             seed=1)
        assert model.e.scale_grad_by_freq
        for k, v in want.items():
            _close(got[k].double(), v.double(), 1e-12)


def test_apart_verdict_is_kept_per_model_for_fresh_streams(monkeypatch):
    """The samples-apart check runs once per model structure and layout, also for passes on a
    fresh stream (``refit_ekfac``, as benchmarks/kfac_cputime.py times it), not at every call."""
    from fimfast.structured import apart, capture, engine, refit_ekfac
    from fimfast.types import FIMType, Options

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    data = [(torch.randn(4, 6), torch.randint(0, 3, (4,)))]
    kf = fimfast.fisher(model, data, "exact", "kfac")
    params = [p for p in model.parameters() if p.requires_grad]
    layers = capture.layers_of(model, kf.names, params, "ekfac")
    probes = []
    real = apart.batched_grad
    monkeypatch.setattr(apart, "batched_grad", lambda *a: probes.append(1) or real(*a))
    outs = [refit_ekfac(kf, model, data, engine.Stream(FIMType.EXACT, Options(), 0), layers,
                        "mean") for _ in range(3)]
    assert len(probes) <= 1  # probed at most once (the kfac call may have probed already)
    for o in outs[1:]:
        assert torch.equal(o.to_dense(), outs[0].to_dense())


class _InnerGrad(nn.Module):
    """An input-gradient feature: ``autograd.grad(..., create_graph=True)`` inside the forward
    (the graph it builds reads ``a.weight`` again on a path that bypasses ``a``'s output)."""

    def __init__(self, maml: bool = False):
        super().__init__()
        self.maml, self.on = maml, True
        self.a, self.e, self.o = nn.Linear(4, 4), nn.Linear(4, 1), nn.Linear(4, 3)

    def forward(self, x):
        if not self.on:  # no inner backward: every layer on its own output's path
            h = torch.tanh(self.a(x))
            return self.o(h + 0.1 * self.e(h))
        if self.maml:  # an inner step on the weight itself
            gW, = torch.autograd.grad((torch.tanh(self.a(x)) ** 2).sum(), self.a.weight,
                                      create_graph=True)
            return self.o(torch.tanh(F.linear(x, self.a.weight - 0.1 * gW, self.a.bias)))
        xx = x.detach().requires_grad_(True)
        g, = torch.autograd.grad(self.e(torch.tanh(self.a(xx))).sum(), xx, create_graph=True)
        return self.o(torch.tanh(self.a(x)) + g)


@pytest.mark.parametrize("maml", [False, True])
@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag"])
def test_create_graph_backward_in_the_forward_is_refused_state_kept(rep, maml):
    """kfac / ekfac / quasi_diag of a model whose forward runs a backward with create_graph=True
    were silently off (quasi_diag's diagonal 15% off the exact diagonal): refused, naming the
    cause, with an accumulator's sums kept; the dense family stays exact."""
    torch.manual_seed(0)
    model = _InnerGrad(maml).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    with pytest.raises(ValueError, match="create_graph=True"):
        fimfast.fisher(model, [(x, y)], "exact", rep)
    if rep != "ekfac":  # an accumulator's sums are kept through the refused batch
        acc = FisherAccumulator(model, "exact", rep)
        model.on = False
        acc.update((x, y))
        ref = FisherAccumulator(model, "exact", rep).add([(x, y)]).result().to_dense()
        model.on = True
        with pytest.raises(ValueError, match="create_graph=True"):
            acc.update((x[:3], y[:3]))
        assert torch.equal(acc.result().to_dense(), ref)
    dense = fimfast.fisher(model, [(x, y)], "exact", "dense").to_dense()
    diag = fimfast.fisher(model, [(x, y)], "exact", "diag")
    flat = torch.cat([diag[n].reshape(-1) for n, _ in model.named_parameters()])
    assert float(flat.abs().sum()) > 0
    torch.testing.assert_close(dense.diagonal(), flat, rtol=1e-10, atol=1e-14)
