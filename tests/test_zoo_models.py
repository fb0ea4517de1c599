"""The architectures of the zoo survey (benchmarks/bench_zoo.py: a ViT with a class token and a
position embedding, a ResNet with BatchNorm, a ConvNeXt block with a layer-scale Parameter, an
MLP-Mixer block, a hand-written Llama-like decoder with RMSNorm, rotary embeddings, SDPA and a
tied head, an LSTM, a character CNN, a deep MLP with BatchNorm, and Hugging Face GPT-2 / BERT)
in float64 against the float64 oracle (tests/oracle.py): EXACT and EMPIRICAL exact, each
parameter on a layer rule or a captured functional call (none on the generic path, which the
survey reports too), and the HUTCHINSON mean unbiased for EXACT on two of them."""

from __future__ import annotations

import pytest
import torch
from cases import Case, check_fast_twice
from oracle import oracle, rel_error
from tolerances import DET_REL_F64

import fimfast
from benchmarks.bench_zoo import build

_MODELS = ["vit", "resnet", "convnext", "mixer", "llama", "lstm", "charcnn", "deep_mlp", "gpt2",
           "bert"]


_V = 24  # the token-level models' vocabulary in these tests (the oracle's columns: rows x V)


def _case(name: str) -> Case:
    built = build(name, N=3, V=_V)
    if built is None:
        pytest.skip("transformers is not installed")
    model, batch, opts, _ = built
    model = model.double()
    x, y = batch
    x = x.double() if x.is_floating_point() else x
    fwd = opts.get("forward_fn")
    if "class_dim" in opts:  # token-level logits (N, T, V)
        x, y = x[:2, :6], y[:2, :6]
        if opts.get("shift_labels"):
            logits = lambda m, b: fwd(m, b)[:, :-1]  # noqa: E731
            valid = torch.ones(2, 5, dtype=torch.bool)
            labels = y[:, 1:]
        else:
            logits = (lambda m, b: fwd(m, b)) if fwd else (lambda m, b: m(b[0]))  # noqa: E731
            valid = torch.ones(2, 6, dtype=torch.bool)
            labels = y
        return Case(name, model, (x, y), logits, valid, labels, "categorical", _V)
    logits = (lambda m, b: fwd(m, b)) if fwd else (lambda m, b: m(b[0]))  # noqa: E731
    C = int(logits(model, (x, y)).shape[-1])
    return Case(name, model, (x, y), logits, torch.ones(x.shape[0], dtype=torch.bool), y,
                "categorical", C)


def _opts(name: str) -> dict:
    built = build(name, N=3, V=_V)
    return {} if built is None else {k: v for k, v in built[2].items() if k != "class_dim"}


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", _MODELS)
def test_zoo_model_is_exact_on_the_rules(name, quantity, monkeypatch):
    case = _case(name)
    ref = oracle(case, quantity)
    assert all(float(v.abs().sum()) > 0 for v in ref.values())  # every parameter reaches z
    opts = _opts(name)
    if opts:
        import cases

        real = cases.run_case

        def run(case, fim_type, rules=True, **kw):
            return real(case, fim_type, rules, **opts, **kw)

        monkeypatch.setattr(cases, "run_case", run)
    check_fast_twice(case, quantity, ref, DET_REL_F64)


@pytest.mark.parametrize("name", ["mixer", "llama"])
def test_zoo_hutchinson_mean_approaches_exact(name):
    case = _case(name)
    ref = oracle(case, "exact")
    est = fimfast.DiagFisher(case.model, "hutchinson", seed=0, num_probes=300, class_dim=-1,
                             **_opts(name))
    est.step(case.batch)
    got = dict(est.result().items())
    assert rel_error(got, ref) < 0.25  # 300 Rademacher probes: ~0.05-0.1 relative spread


def _stable_exact(model, x) -> dict[str, torch.Tensor]:
    """The float64 diagonal Fisher of token-level logits without the cancellation of
    ``diag(p) - p p^T`` at confident rows: per row, with ``a`` its leading class and ``D_c = J_c -
    J_a``, ``diag(J^T I J) = sum_c p_c (D_c - sum_j p_j D_j)^2`` (every term a sum of
    like-signed or small parts, ``1 - p_a`` never formed)."""
    from torch.func import functional_call, jacrev

    params = {n: p.detach() for n, p in model.named_parameters()}
    J = jacrev(lambda ps: functional_call(model, ps, (x,)))(params)
    z = functional_call(model, params, (x,)).detach()
    V = z.shape[-1]
    z = z.reshape(-1, V)
    a = z.argmax(-1)
    p = torch.softmax(z, -1)
    out = {}
    for n, Jn in J.items():
        Jf = Jn.reshape(z.shape[0], V, -1)
        D = Jf - Jf[torch.arange(z.shape[0]), a].unsqueeze(1)
        u = D - torch.einsum("rv,rvk->rk", p, D).unsqueeze(1)
        out[n] = (p.unsqueeze(-1) * u * u).sum((0, 1)).view_as(params[n])
    return out


def test_confident_tied_head_is_exact_against_a_stable_oracle():
    """A tied head at N(0, 25) embeddings gives every token's own logit a lead of 25 to 130
    (1 - p from 1e-11 down to 1e-56, far below float64's eps): the naive float64 oracle
    (``diag(p) - p p^T``, tests/oracle.py) is off by 1e-5 there; EXACT equals the stable float64
    reference to 1e-15, and in float32 to float32's rounding."""
    from benchmarks.bench_zoo import _Llama

    torch.manual_seed(0)
    model = _Llama(V=64, d=32, H=4, T=8).double()
    torch.nn.init.normal_(model.emb.weight, std=5.0)
    x = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    z = model(x).detach().reshape(-1, 64)
    top = z.topk(2, -1).values
    assert float((top[:, 0] - top[:, 1]).min()) > 20  # confident rows throughout
    ref = _stable_exact(model, x)
    naive = oracle(Case("tied", model, (x, x), lambda m, b: m(b[0]),
                        torch.ones(2, 6, dtype=torch.bool), x, "categorical", 64), "exact")
    assert rel_error(naive, ref) > 1e-7  # the cancellation this model makes
    est = fimfast.DiagFisher(model, "exact", class_dim=-1)
    est.step((x, x))
    got = dict(est.result().items())
    assert all(float(v.abs().sum()) > 0 for v in ref.values())
    assert rel_error(got, ref) < 1e-12
    est = fimfast.DiagFisher(model.float(), "exact", class_dim=-1)
    est.step((x, x))
    assert rel_error({k: v.double() for k, v in est.result().items()}, ref) < 1e-4
