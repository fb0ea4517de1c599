"""fimfast.laplace.DiagLaplace against a float64 hand implementation and laplace-torch."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

import fimfast
from fimfast.laplace import DiagLaplace


def _setup(seed=0, n=40):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    F = fimfast.diag_fisher(net, [(x[:20], y[:20]), (x[20:], y[20:])], "exact", reduction="sum")
    return net, x, y, F


def _jacobian(net, x):
    """(N, C, P) by one backward per (row, class): the obvious twin of the torch.func path."""
    params = list(net.parameters())
    rows = []
    for i in range(x.shape[0]):
        out = net(x[i : i + 1])[0]
        cols = []
        for c in range(out.shape[0]):
            g = torch.autograd.grad(out[c], params, retain_graph=True)
            cols.append(torch.cat([t.reshape(-1) for t in g]))
        rows.append(torch.stack(cols))
    return torch.stack(rows)


def test_posterior_and_glm_probit_by_hand():
    net, x, _, F = _setup()
    prior, T = 2.0, 0.5
    la = DiagLaplace(net, F, prior_precision=prior, temperature=T)
    H = F.to_vector()
    assert torch.allclose(la.posterior_precision, H / T + prior, rtol=0, atol=0)
    assert torch.allclose(la.posterior().to_vector(), 1 / (H / T + prior))
    xt = torch.randn(6, 4, dtype=torch.float64)
    J = _jacobian(net, xt)
    var = torch.einsum("ncp,p,nkp->nck", J, 1 / (H / T + prior), J)
    mu, fvar = la.functional_variance(xt, chunk_size=4)  # two chunks
    assert torch.allclose(fvar, var, rtol=1e-10, atol=1e-13)
    with torch.no_grad():
        assert torch.allclose(mu, net(xt), rtol=0, atol=1e-14)
        kappa = 1 / torch.sqrt(1 + math.pi / 8 * var.diagonal(dim1=1, dim2=2))
        probit = torch.softmax(kappa * net(xt), -1)
    assert torch.allclose(la.predictive(xt), probit, rtol=1e-10, atol=1e-13)
    # the MC GLM predictive: softmax of f = mu + L eps, L L^T = Sigma, averaged (same draws);
    # the probit approximation is close to it
    g = torch.Generator().manual_seed(0)
    mc = la.predictive(xt, link_approx="mc", n_samples=20000, generator=g)
    L = torch.linalg.cholesky(var)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(20000, 6, 3, dtype=torch.float64, generator=g)
    ref = torch.softmax(mu + torch.einsum("nck,snk->snc", L, eps), -1).mean(0)
    assert torch.allclose(mc, ref, rtol=1e-6, atol=1e-8)  # the jitter is 1e-10 relative
    assert torch.allclose(mc, probit, atol=0.03)


def test_sampling_and_nn_predictive():
    net, x, _, F = _setup()
    b2 = torch.full((3,), 4.0, dtype=torch.float64)
    prior = {"0.weight": 1.0, "0.bias": 2.0, "2.weight": 3.0, "2.bias": b2}
    la = DiagLaplace(net, F, prior_precision=prior)
    assert torch.equal(la.to_dict(la.prior_precision)["0.bias"], torch.full((8,), 2.0).double())
    s = la.sample(4000, generator=torch.Generator().manual_seed(0))
    assert s.shape == (4000, la.n_params)
    assert torch.allclose(s.mean(0), la.mean, atol=4 * (la.posterior_variance / 4000).sqrt().max())
    assert torch.allclose(s.var(0) / la.posterior_variance, torch.ones_like(la.H), atol=0.15)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    xt = torch.randn(5, 4, dtype=torch.float64)
    p = la.predictive(xt, pred_type="nn", n_samples=50, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # restored
    g = torch.Generator().manual_seed(1)
    ref = torch.zeros(5, 3, dtype=torch.float64)
    for theta in la.sample(50, generator=g):
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        torch.nn.utils.vector_to_parameters(theta, model.parameters())
        ref += torch.softmax(model(xt), -1).detach() / 50
    assert torch.allclose(p, ref, rtol=1e-12, atol=1e-14)


def test_fisher_scaling_and_errors():
    net, x, _, F = _setup()
    Fm = fimfast.diag_fisher(net, [(x,)], "exact", reduction="mean")
    assert Fm.meta["count"] == 40
    a = DiagLaplace(net, F)
    b = DiagLaplace(net, Fm)  # mean x count = sum
    assert torch.allclose(a.H, b.H, rtol=1e-12)
    c = DiagLaplace(net, Fm, n_data=400)  # a subset of 40 of 400 training samples
    assert torch.allclose(c.H, 10 * a.H, rtol=1e-12)
    assert torch.allclose(DiagLaplace(net, F, n_data=80).H, 2 * a.H, rtol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        DiagLaplace(net, F, temperature=0)
    with pytest.raises(ValueError, match="prior_precision must be > 0"):
        DiagLaplace(net, F, prior_precision=0.0)
    with pytest.raises(ValueError, match="1 or 67 entries"):
        DiagLaplace(net, F, prior_precision=torch.ones(3))
    with pytest.raises(ValueError, match="no meta\\['count'\\]"):
        DiagLaplace(net, fimfast.DiagFIM(dict(Fm), {"reduction": "mean"}))
    with pytest.raises(ValueError, match="pred_type"):
        a.predictive(x, pred_type="bayes")


def test_only_trainable_parameters_are_random():
    net, x, _, _ = _setup()
    net[0].requires_grad_(False)
    F = fimfast.diag_fisher(net, [(x,)], "exact", reduction="sum")
    la = DiagLaplace(net, F)
    assert la.names == ["2.weight", "2.bias"] and la.n_params == 27
    xt = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        h = torch.tanh(net[0](xt))
    # last layer: J[n, c] = (e_c kron h_n, e_c): Sigma diagonal in c with these variances
    v = la.to_dict(la.posterior_variance)
    expected = (h[:, None, :] ** 2 * v["2.weight"][None]).sum(-1) + v["2.bias"][None]
    _, fvar = la.functional_variance(xt)
    assert torch.allclose(fvar.diagonal(dim1=1, dim2=2), expected, rtol=1e-12)


needs_laplace = pytest.mark.skipif(
    importlib.util.find_spec("laplace") is None,
    reason="laplace-torch is not installed (pip install --no-deps laplace-torch==0.3 ...)",
)


@needs_laplace
@pytest.mark.parametrize(("prior", "T"), [(1.0, 1.0), (0.3, 0.2)])
def test_agrees_with_laplace_torch(prior, T):
    from laplace.baselaplace import DiagLaplace as PeerDiag
    from torch.utils.data import DataLoader, TensorDataset

    net, x, y, F = _setup(seed=3)
    ours = DiagLaplace(net, F, prior_precision=prior, temperature=T)
    peer = PeerDiag(net, "classification", prior_precision=prior, temperature=T)
    peer.fit(DataLoader(TensorDataset(x, y), batch_size=20))
    # the peer's own GGN diagonal is fimfast's EXACT Fisher summed over the data
    assert torch.allclose(peer.H, F.to_vector(), rtol=1e-12, atol=1e-14)
    # the same diagonal fed to both: the same posterior and predictives
    peer.H = F.to_vector().clone()
    assert torch.allclose(peer.posterior_variance, ours.posterior_variance, rtol=1e-14)
    xt = torch.randn(7, 4, dtype=torch.float64)
    p_peer = peer(xt, pred_type="glm", link_approx="probit")
    assert torch.allclose(ours.predictive(xt), p_peer, rtol=1e-12, atol=1e-14)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.allclose(ours.sample(8, generator=g1), peer.sample(8, generator=g2), rtol=1e-14)
    # evidence: the peer's log likelihood is minus its summed training loss
    lml = ours.log_marginal_likelihood(-peer.loss)
    assert torch.allclose(lml, peer.log_marginal_likelihood(), rtol=1e-12)


def test_laplace_calibration_example():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "laplace_calibration.py"
    spec = importlib.util.spec_from_file_location("laplace_calibration", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--steps", "600"])
    assert out["prior_precision"] in out["validation_nll"]
    # the prior is chosen on validation data; p -> infinity gives back the MAP, so the Laplace
    # predictive is never much worse on test and is less confident on noise
    assert out["laplace"]["nll"] <= 1.05 * out["map"]["nll"]
    assert out["laplace"]["noise_confidence"] <= out["map"]["noise_confidence"] + 1e-3
    assert abs(out["laplace"]["accuracy"] - out["map"]["accuracy"]) < 0.02
