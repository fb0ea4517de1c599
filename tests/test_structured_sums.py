"""The per-layer sums of the Kronecker family against ``F.unfold`` and per-sample gradients in
float64: a convolution's input factor from its input rows (fimfast/structured/convgram.py), the
channels-last patches, the convolution's ``G`` as one batched product, and EKFAC's squared
projected gradients by either order of products (fimfast/structured/sums.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fimfast
from fimfast.structured import capture, convgram, sums

GEOMETRIES = [
    dict(kernel_size=5),
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 4), stride=(2, 1), dilation=(1, 2), padding=(1, 2)),
    dict(kernel_size=(4, 3), stride=(1, 3)),
    dict(kernel_size=3, padding="same", dilation=2),
]


def _patches(x, m):
    a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=capture.conv_padding(m),
                 stride=m.stride)
    return a.transpose(1, 2)


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("rows", [True, False], ids=["row_products", "strip_products"])
def test_conv_gram_equals_the_patch_gram(geo, C, rows, monkeypatch):
    """Both ways of forming the blocks (whole input rows, strips) against the patch Gram."""
    monkeypatch.setattr(convgram, "PIXEL_ROW_MAX", 10**9 if rows else 0)
    torch.manual_seed(0)
    m = nn.Conv2d(C, 2, **geo)
    x = torch.randn(3, C, 11, 13, dtype=torch.float64)
    a = _patches(x, m).reshape(-1, m.weight[0].numel())
    A, n = convgram.conv_gram(x, m, torch.float64)
    torch.testing.assert_close(A, a.T @ a, rtol=1e-12, atol=1e-12)
    assert n == a.shape[0]
    a1 = torch.cat([a, torch.ones(n, 1, dtype=torch.float64)], 1)
    A1, n1 = convgram.conv_gram(x, m, torch.float64, one=True)
    torch.testing.assert_close(A1, a1.T @ a1, rtol=1e-12, atol=1e-12)
    assert n1 == n


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_channels_last_patches(geo):
    m = nn.Conv2d(3, 2, **geo)
    x = torch.randn(2, 3, 9, 10)
    ref = _patches(x, m)
    assert torch.equal(capture.unfold(x, m), ref)
    cl = capture.unfold(x, m, channels_last=True)
    assert cl.is_contiguous() and torch.equal(cl[..., capture.patch_order(m)], ref)


def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 5, 3, padding=1),
                         nn.Flatten(), nn.Linear(5 * 5 * 5, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 7, 7, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv_input_factors(approx):
    """KFAC's ``A`` of both convolutions (the row-strip path for ``expand``, the channels-last
    patches reordered for ``reduce``) against ``F.unfold`` of the recorded inputs."""
    model, data = _conv_model(), _data()
    assert all(convgram.worthwhile(model[i], torch.zeros(4, model[i].in_channels, 7, 7))
               for i in (0, 2)) or approx == "reduce"
    F_ = fimfast.fisher(model, data, "exact", representation="kfac", kfac_approx=approx)
    inputs = {0: [], 2: []}
    hooks = [model[i].register_forward_hook(lambda mod, inp, out, i=i: inputs[i].append(inp[0]))
             for i in (0, 2)]
    with torch.no_grad():
        for x, _ in data:
            model(x)
    for h in hooks:
        h.remove()
    for k, i in enumerate((0, 2)):
        a = torch.cat([_patches(x, model[i]) for x in inputs[i]])
        a = torch.cat([a, torch.ones(a.shape[:-1] + (1,), dtype=a.dtype)], -1)
        if approx == "reduce":
            a = a.mean(1, keepdim=True)
        a = a.reshape(-1, a.shape[-1])
        torch.testing.assert_close(F_.A[k], a.T @ a / a.shape[0], rtol=1e-10, atol=1e-12)


def test_conv_output_factor_batched_product():
    """``G`` of a convolution from the transposed-view gradients (one batched product) equals
    the Gram of the copied rows."""
    g = torch.randn(2, 3, 5, 7, dtype=torch.float64).transpose(2, 3)  # (M, N, T, O) view
    s = sums.LayerSums()
    sums._grad_gram(s, g)
    rows = g.reshape(-1, 5)
    torch.testing.assert_close(s.G, rows.T @ rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T,O,I", [(1, 4, 6), (2, 7, 6), (9, 2, 7), (9, 7, 2), (4, 2, 9),
                                   (5, 3, 12)])
def test_ekfac_squares_both_orders(T, O, I, bias):  # noqa: E741
    """``D = sum_q (U_G^T M_q U_A)^2`` with ``M_q = sum_t g_t [a_t, 1]^T``: projections first,
    per-pair gradients first, or the output side rotated first (whichever costs least; each
    order among these shapes), against the per-pair matrices formed by hand; the
    quasi-diagonal's squares and cross terms too."""
    torch.manual_seed(0)
    M, N = 2, 3
    In = I + bias
    a = torch.randn(N, T, I, dtype=torch.float64)
    g = torch.randn(M, N, T, O, dtype=torch.float64)
    ua = torch.linalg.qr(torch.randn(In, In, dtype=torch.float64))[0]
    ug = torch.linalg.qr(torch.randn(O, O, dtype=torch.float64))[0]
    af = torch.cat([a, torch.ones(N, T, 1, dtype=a.dtype)], -1) if bias else a
    Mq = torch.einsum("mnto,nti->mnoi", g, af)
    s = sums.LayerSums()
    sums._linear_squares(s, a, g, "ekfac", (ua, ug), bias)
    torch.testing.assert_close(s.D, ((ug.T @ Mq @ ua) ** 2).sum((0, 1)), rtol=1e-12,
                               atol=1e-12)
    q = sums.LayerSums()
    sums._linear_squares(q, a, g, "quasi_diag", None, bias)
    torch.testing.assert_close(q.D, (Mq**2).sum((0, 1)), rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(q.cross, (Mq[..., :-1] * Mq[..., -1:]).sum((0, 1)),
                                   rtol=1e-12, atol=1e-12)


def test_ekfac_refit_channels_last_patches(monkeypatch):
    """EKFAC's refit of a convolution with channels-last patches (``U_A``'s rows reordered)
    equals the refit with ``F.unfold``'s order, and its ``D`` is the diagonal of the
    per-pair gradients' second moment in the Kronecker eigenbasis."""
    model, data = _conv_model(), _data()
    E = fimfast.fisher(model, data, "exact", representation="ekfac", reduction="sum")
    monkeypatch.setattr(capture, "channels_last_inputs", lambda layer: False)
    R = fimfast.fisher(model, data, "exact", representation="ekfac", reduction="sum")
    for d, r in zip(E.D, R.D):
        torch.testing.assert_close(d, r, rtol=1e-10, atol=1e-12)
    # oracle for the first convolution: per-(sample, class) gradients of [W, b] by autograd
    conv, (ua, ug) = model[0], (E.UA[0], E.UG[0])
    D = torch.zeros_like(E.D[0])
    for x, _ in data:
        for n in range(x.shape[0]):
            z = model(x[n:n + 1])[0]
            p = torch.softmax(z, -1).detach()
            for c in range(z.shape[0]):
                u = p[c].sqrt() * (torch.eye(3, dtype=z.dtype)[c] - p)
                gw, gb = torch.autograd.grad(z @ u, [conv.weight, conv.bias], retain_graph=True)
                Mq = torch.cat([gw.reshape(gw.shape[0], -1), gb.unsqueeze(1)], 1)
                D += (ug.T @ Mq @ ua) ** 2
    torch.testing.assert_close(E.D[0], D, rtol=1e-8, atol=1e-12)


def test_blocked_sums_settle_before_state():
    """Blocked Gram sums leave the entries below the diagonal unspecified until read; a saved
    state has them 0 (no uninitialised memory leaves the process) and resumes to the same
    factors."""
    from fimfast.structured import FisherAccumulator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(700, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 700, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    acc = FisherAccumulator(model, "exact", "kfac", seed=0)
    acc.update(data[0])
    assert acc.sums[0].unset == {"A"}
    state = acc.state_dict()
    A = state["sums"][0]["A"]
    assert A.shape == (701, 701) and not acc.sums[0].unset
    assert torch.equal(A.tril(-1), torch.zeros_like(A))
    again = FisherAccumulator(model, "exact", "kfac", seed=0)
    again.load_state_dict(state)
    for a in (acc, again):
        a.update(data[1])
    x = torch.cat([torch.cat([b[0], torch.ones(6, 1, dtype=torch.float64)], 1) for b in data])
    for F_ in (acc.result(), again.result()):
        torch.testing.assert_close(F_.A[0], x.T @ x / 12, rtol=1e-12, atol=1e-13)


def test_half_gram_factors_eig_and_read():
    """Factors kept in upper block rows (sums.HalfGram): the eigenpairs from the upper triangle
    rebuild the completed factor, which equals the float64 oracle; reading ``A`` / ``G``
    completes them once; ``result()`` without ``consume`` leaves the running sums alone."""
    from fimfast.structured import FisherAccumulator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(450, 400), nn.Tanh(), nn.Linear(400, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 450, generator=g, dtype=torch.float64)
    data = [(x, torch.randint(0, 3, (9,), generator=g))]
    acc = FisherAccumulator(model, "exact", "kfac", seed=0)
    acc.add(data)
    F1 = acc.result()  # copies: the accumulator's sums stay as they are
    F3 = acc.result()
    F2 = acc.result(consume=True)
    for F_ in (F1, F2):
        assert isinstance(F_._A[0], sums.HalfGram) and isinstance(F_._G[0], sums.HalfGram)
        eig = F_.eig()
        assert isinstance(F_._A[0], sums.HalfGram)  # not completed by the eigendecomposition
        xa = torch.cat([x, torch.ones(9, 1, dtype=torch.float64)], 1)
        torch.testing.assert_close(F_.A[0], xa.T @ xa / 9, rtol=1e-12, atol=1e-13)
        assert torch.equal(F_.A[0], F_.A[0].T) and torch.equal(F_.G[0], F_.G[0].T)
        lam_a, ua, lam_g, ug = eig[0]
        # row-major for the refit's products (both paths: HalfGram and plain factors)
        assert all(e[1].is_contiguous() and e[3].is_contiguous() for e in eig)
        torch.testing.assert_close((ua * lam_a) @ ua.T, F_.A[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close((ug * lam_g) @ ug.T, F_.G[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(F1.G[0], F2.G[0], rtol=0, atol=0)
    v = torch.randn(F1.numel(), dtype=torch.float64, generator=g)
    y = F3.solve(v, 1e-2)  # solve before any read of A / G
    assert isinstance(F3._A[0], sums.HalfGram)
    torch.testing.assert_close(F1.mv(y) + 1e-2 * y, v, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n", [64, 192, 193, 256, 300])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("formed", [True, False])
def test_gram_sums_with_bias_column(n, weights, formed, monkeypatch):
    """``gram_into`` over two batches (the first writes, the second adds) with the bias column
    (all ones, or position weights ``c``) equals ``[x, c]^T [x, c]`` summed in float64, on both
    sides of the blocked threshold (``sums._BLOCKED``), completed by ``full_gram``; small inputs
    with ``[x, c]`` formed (up to ``_FUSED`` entries) and without (the last column and corner
    summed apart, ``formed=False``: the limit 0)."""
    if not formed:
        monkeypatch.setattr(sums, "_FUSED", 0)
    g = torch.Generator().manual_seed(n)
    s = sums.LayerSums()
    want = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for rows in (7, 130):
        x = torch.randn(rows, n, generator=g, dtype=torch.float64)
        c = torch.rand(rows, generator=g, dtype=torch.float64) if weights else None
        sums.gram_into(s, "A", x, True, c)
        y = torch.cat([x, (torch.ones(rows, dtype=torch.float64) if c is None else c)[:, None]], 1)
        want += y.T @ y
    assert ("A" in s.unset) == (n > sums._BLOCKED)
    torch.testing.assert_close(sums.full_gram(s.A), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("one", [False, True])
def test_upper_triangle_sums_ignore_the_lower_one(backend, one, monkeypatch):
    """Above ``sums._BLOCKED`` columns only the upper triangle of a sum is specified: with every
    entry below the diagonal poisoned (NaN), ``full_gram`` (copy and in place, scaled) and
    ``HalfGram``'s read and eigenpairs equal the float64 oracle, and ``settle`` zeroes them; with
    the cpp kernel (MKL's symmetric update where torch links it) and the torch reference."""
    monkeypatch.setenv("FIMFAST_BACKEND", backend)
    g = torch.Generator().manual_seed(3)
    n = 300
    s = sums.LayerSums()
    want = torch.zeros(n + one, n + one, dtype=torch.float64)
    for rows in (5, 140):
        x = torch.randn(rows, n, generator=g, dtype=torch.float64)
        sums.gram_into(s, "A", x, one)
        y = torch.cat([x, torch.ones(rows, 1, dtype=torch.float64)], 1) if one else x
        want += y.T @ y
    assert s.unset == {"A"}
    low = torch.ones_like(s.A).tril(-1).bool()
    s.A[low] = float("nan")
    tol = {"rtol": 1e-12, "atol": 1e-11}
    torch.testing.assert_close(sums.full_gram(s.A, False, 0.5), want * 0.5, **tol)
    assert s.A[low].isnan().all()  # a copy: the sum is left as it was
    h = sums.half_gram(s.A, False, 0.25)
    lam, U = h.eigh()
    torch.testing.assert_close((U * lam) @ U.T, want * 0.25, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sums.half_gram(s.A, False, 0.25).full(), want * 0.25, **tol)
    s.settle()
    assert not s.unset and not s.A[low].any()
    torch.testing.assert_close(s.A, want.triu(), **tol)


def test_wide_sums_that_overflow_are_refused_when_read():
    """Inputs of 1e20 before a saturating Tanh in a layer of more than ``sums._BLOCKED`` inputs
    (the upper-triangle sums, the bias column in the product): ``result()`` refuses the
    accumulated sums, and a finite batch of the same model is read."""
    from fimfast.structured.accumulate import FisherAccumulator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.Tanh(), nn.Linear(200, 3))
    acc = FisherAccumulator(model, "monte_carlo", "kfac", "sum", seed=0)
    acc.update((torch.randn(6, 300), torch.randint(0, 3, (6,))))
    acc.result()
    x = torch.randn(6, 300)
    x[2, 5] = 1e20
    acc.update((x, torch.randint(0, 3, (6,))))
    with pytest.raises(ValueError, match="not finite"):
        acc.result()


@pytest.mark.parametrize("pair_chunk", [None, 1])
def test_input_factors_once_per_batch_with_several_labels(pair_chunk, monkeypatch):
    """The input factors of a batch do not depend on the labels: with ``num_probes=3`` MC labels
    per sample, in one backward or in three (``pair_chunk=1``), each layer's ``A`` is summed once
    per batch (``npos`` counts the samples once), ``G`` from every label; and ``A`` equals the
    inputs' second moment in float64."""
    from fimfast.structured import engine

    calls = []
    real = engine.add_inputs
    monkeypatch.setattr(engine, "add_inputs", lambda layer, *a, **k: (
        calls.append(layer.name), real(layer, *a, **k))[1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 200, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (5,), generator=g)) for _ in range(2)]
    F = fimfast.fisher(model, data, "monte_carlo", "kfac", "sum", num_probes=3,
                       pair_chunk=pair_chunk, seed=0)
    assert calls == ["0", "2"] * 2
    x = torch.cat([torch.cat([b[0], torch.ones(5, 1, dtype=torch.float64)], 1) for b in data])
    torch.testing.assert_close(F.A[0], x.T @ x / 10, rtol=1e-12, atol=1e-12)
