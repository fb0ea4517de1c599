"""The seed-compatible functional API and the object API: reductions, EMA, state, side effects."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import make_case

import fimfast
from fimfast import FIMType, diag_fim_step, get_diag_fim, zero_diag_fim


def _loader(n_batches=3, sizes=(4, 2, 5), C=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(s, 6, generator=g), torch.randint(0, C, (s,), generator=g))
            for s in sizes[:n_batches]]


def test_seed_readme_snippet():
    """The seed library's README snippet, with only the module name changed."""
    model = make_case("relu_mlp").model
    loader = _loader()
    fim_type = FIMType.HUTCHINSON
    fim_opts = {"num_probes": 1, "lr_power_itrs": 30, "top_k": 2}
    zero_diag_fim(model, fim_type=fim_type)
    for batch in loader:
        diag_fim_step(model, batch, fim_type, fim_opts, ema=None, reduction="sum")
    fim = get_diag_fim(model, fim_type=fim_type)
    names = [n for n, _ in model.named_parameters()]
    assert list(fim) == names
    for n, p in model.named_parameters():
        assert fim[n].shape == p.shape and fim[n].dtype == torch.float32
    # the same steps through the object API with the same torch seed: the same draws, bit for bit
    torch.manual_seed(1234)
    zero_diag_fim(model, fim_type=fim_type)
    for batch in loader:
        diag_fim_step(model, batch, fim_type, fim_opts, ema=None, reduction="sum")
    again = get_diag_fim(model, fim_type=fim_type)
    torch.manual_seed(1234)
    est = fimfast.DiagFisher(model, fim_type, **fim_opts)
    for batch in loader:
        est.step(batch)
    obj = est.result()
    assert all(torch.equal(again[n], obj[n]) for n in names)
    # and the deterministic type through the same calls equals the float64 oracle on the union
    zero_diag_fim(model, fim_type="exact")
    for batch in loader:
        diag_fim_step(model, batch, "exact", fim_opts, ema=None, reduction="sum")
    _assert_oracle(model, loader, get_diag_fim(model, fim_type="exact"), "exact")


def _assert_oracle(model, loader, got, quantity):
    """``got`` against the float64 oracle of ``model`` on the concatenated batches."""
    from oracle import oracle
    from tolerances import DET_REL_F32

    case = make_case("relu_mlp")
    case.model = model
    case.batch = (torch.cat([b[0] for b in loader]), torch.cat([b[1] for b in loader]))
    case.valid = torch.ones(case.batch[0].shape[0], dtype=torch.bool)
    case.labels = case.batch[1]
    ref = oracle(case, quantity)
    a = torch.cat([got[n].double().reshape(-1) for n in ref])
    b = torch.cat([ref[n].reshape(-1) for n in ref])
    assert float((a - b).norm() / b.norm()) <= DET_REL_F32


@pytest.mark.parametrize("fim_type", [t.value for t in FIMType])
def test_every_type_accepts_strings_and_names(fim_type):
    model = make_case("relu_mlp").model
    zero_diag_fim(model, fim_type)
    torch.manual_seed(5)
    diag_fim_step(model, _loader()[0], fim_type.upper())
    d = get_diag_fim(model, FIMType(fim_type))
    assert list(d) == [n for n, _ in model.named_parameters()]
    # the upper-case name, the value and the enum select the same estimator: the same draw
    torch.manual_seed(5)
    est = fimfast.DiagFisher(model, FIMType(fim_type))
    est.step(_loader()[0])
    assert all(torch.equal(d[n], v) for n, v in est.result().items())
    if fim_type in ("exact", "empirical"):
        _assert_oracle(model, _loader()[:1], d, fim_type)


def test_types_accumulate_side_by_side():
    model = make_case("relu_mlp").model
    zero_diag_fim(model)
    b = _loader()[0]
    diag_fim_step(model, b, "exact")
    diag_fim_step(model, b, "exact")
    torch.manual_seed(7)
    diag_fim_step(model, b, "hutchinson")
    ex = fimfast.get_estimator(model, "exact")
    hu = fimfast.get_estimator(model, "hutchinson")
    assert ex.state.steps == 2 and hu.state.steps == 1
    # each holds its own sum: EXACT the oracle of the batch twice, HUTCHINSON the draw of a lone
    # estimator seeded the same way
    _assert_oracle(model, [b, b], get_diag_fim(model, "exact"), "exact")
    torch.manual_seed(7)
    alone = fimfast.DiagFisher(model, "hutchinson")
    alone.step(b)
    want = alone.result()
    assert all(torch.equal(get_diag_fim(model, "hutchinson")[n], v) for n, v in want.items())
    zero_diag_fim(model, "exact")
    with pytest.raises(RuntimeError, match="no 'exact' step"):
        get_diag_fim(model, "exact")
    assert fimfast.get_estimator(model, "hutchinson").state.steps == 1
    assert all(torch.equal(get_diag_fim(model, "hutchinson")[n], v) for n, v in want.items())


@pytest.mark.parametrize("fim_type", ["exact", "hutchinson", "monte_carlo"])
def test_step_leaves_model_untouched(fim_type):
    """.grad, train/eval mode and parameters are exactly as before a step."""
    model = make_case("encoder").model
    ids = torch.randint(0, 11, (3, 4))
    y = torch.randint(0, 3, (3,))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model.train()
    model.attn.eval()
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    est = fimfast.DiagFisher(model, fim_type)
    est.step((ids, y))
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 0.5))
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                   for m in model.modules())


@pytest.mark.parametrize("fim_type", ["exact", "empirical", "hutchinson"])
def test_mean_reduction_over_batches_of_different_sizes(fim_type):
    model = make_case("relu_mlp").model.double()
    batches = [(x.double(), y) for x, y in _loader()]
    s = fimfast.DiagFisher(model, fim_type, reduction="sum", seed=3)
    m = fimfast.DiagFisher(model, fim_type, reduction="mean", seed=3)
    for b in batches:
        s.step(b)
        m.step(b)
    n = sum(b[0].shape[0] for b in batches)
    assert m.state.count == n
    for k, v in s.result().items():
        torch.testing.assert_close(m.result()[k], v / n, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ema_matches_hand_computation(reduction):
    model = make_case("relu_mlp").model.double()
    batches = [(x.double(), y) for x, y in _loader()]
    beta = 0.7
    est = fimfast.DiagFisher(model, "exact", reduction=reduction, ema=beta)
    m = None
    for t, b in enumerate(batches, start=1):
        one = fimfast.DiagFisher(model, "exact", reduction=reduction)
        one.step(b)
        B = one.result().to_vector()
        m = (1 - beta) * B if m is None else beta * m + (1 - beta) * B
        est.step(b)
        torch.testing.assert_close(est.result().to_vector(), m / (1 - beta ** t), rtol=1e-12,
                                   atol=0)


@pytest.mark.parametrize("fim_type", ["hutchinson", "monte_carlo", "exact"])
def test_state_dict_round_trips_mid_stream(fim_type):
    model = make_case("relu_mlp").model.double()
    batches = [(x.double(), y) for x, y in _loader()]
    a = fimfast.DiagFisher(model, fim_type, reduction="mean", seed=4)
    a.step(batches[0])
    sd = a.state_dict()
    b = fimfast.DiagFisher(model, fim_type, reduction="mean", seed=999)
    b.load_state_dict(sd)
    for x in batches[1:]:
        a.step(x)
        b.step(x)
    assert torch.equal(a.result().to_vector(), b.result().to_vector())


@pytest.mark.parametrize("fim_type", ["hutchinson", "hutchinson_rankk", "monte_carlo"])
def test_manual_seed_reproduces_bit_for_bit(fim_type):
    model = make_case("relu_mlp").model
    b = _loader()[0]
    out = []
    for _ in range(2):
        torch.manual_seed(123)
        zero_diag_fim(model, fim_type)
        diag_fim_step(model, b, fim_type)
        diag_fim_step(model, b, fim_type)
        out.append(torch.cat([v.reshape(-1) for v in get_diag_fim(model, fim_type).values()]))
    assert torch.equal(out[0], out[1])
    torch.manual_seed(124)
    zero_diag_fim(model, fim_type)
    diag_fim_step(model, b, fim_type)
    diag_fim_step(model, b, fim_type)
    other = torch.cat([v.reshape(-1) for v in get_diag_fim(model, fim_type).values()])
    assert not torch.equal(out[0], other)


def test_random_stream_advances_between_steps():
    model = make_case("relu_mlp").model
    b = _loader()[0]
    est = fimfast.DiagFisher(model, "hutchinson", seed=1)
    est.step(b)
    first = est.result().to_vector()
    est.reset()
    est.step(b)
    assert not torch.equal(first, est.result().to_vector())


@pytest.mark.parametrize("batch_kind", ["tuple", "inputs_only", "tensor", "dict", "forward_fn"])
def test_batch_layouts(batch_kind):
    case = make_case("token_lm")
    model = case.model
    b = case.batch
    ref = fimfast.DiagFisher(model, "exact")
    ref.step(b)
    if batch_kind == "dict":
        batch, opts = b, {}
    elif batch_kind == "forward_fn":
        # a layout fimfast does not know; labels and mask are read from the mapping's keys
        batch = {"x": b, "labels": b["labels"], "attention_mask": b["attention_mask"]}
        opts = {"forward_fn": lambda m, bb: m(bb["x"]["input_ids"], bb["x"]["attention_mask"])}
    else:
        mlp = make_case("relu_mlp")
        x, y = mlp.batch
        batch = {"tuple": (x, y), "inputs_only": (x,), "tensor": x}[batch_kind]
        est = fimfast.DiagFisher(mlp.model, "exact")
        est.step(batch)
        ref2 = fimfast.DiagFisher(mlp.model, "exact")
        ref2.step((x, y))
        torch.testing.assert_close(est.result().to_vector(), ref2.result().to_vector())
        return
    est = fimfast.DiagFisher(model, "exact", **opts)
    est.step(batch)
    torch.testing.assert_close(est.result().to_vector(), ref.result().to_vector())
    assert est.state.count == int(case.valid.sum())


def test_output_layouts():
    base = make_case("relu_mlp")
    x, _ = base.batch

    class TupleOut(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x), "extra"

    r1 = fimfast.DiagFisher(base.model, "exact")
    r1.step((x,))
    r2 = fimfast.DiagFisher(TupleOut(base.model), "exact")
    r2.step((x,))
    torch.testing.assert_close(r1.result().to_vector(), r2.result().to_vector())


def test_train_step_gives_training_grads_and_fisher():
    case = make_case("relu_mlp")
    model = case.model.double()
    x, y = case.batch
    x = x.double()
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    a = fimfast.DiagFisher(model, "hutchinson", seed=8)
    loss = a.train_step((x, y))
    b = fimfast.DiagFisher(model, "hutchinson", seed=8)
    b.step((x, y))
    assert loss.requires_grad is False
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(a.result().to_vector(), b.result().to_vector())


def test_diag_fisher_one_shot_and_save_load(tmp_path):
    model = make_case("relu_mlp").model
    F = fimfast.diag_fisher(model, _loader(), "exact", reduction="mean", progress=True)
    assert isinstance(F, fimfast.DiagFIM) and F.meta["count"] == 11
    _assert_oracle(model, _loader(), {n: 11 * v for n, v in F.items()}, "exact")  # the mean
    path = tmp_path / "fim.safetensors"
    F.save(str(path))
    G = fimfast.DiagFIM.load(str(path))
    assert list(G) == list(F)
    assert torch.equal(G.to_vector(), F.to_vector())
    assert G.meta["fim_type"] == "exact"
    assert F.trace() == pytest.approx(float(F.to_vector().double().sum()))


def test_available_backends_reports_reasons():
    info = fimfast.available_backends()
    assert info["torch"]["available"]
    for b in ("triton", "cuda", "cpp"):
        assert isinstance(info[b]["reason"], str) and info[b]["reason"]
    assert not info["cuda"]["available"] or torch.cuda.is_available()


def test_seed_api_docstring_names_every_option():
    from fimfast.types import Options

    doc = fimfast.diag_fim_step.__doc__
    missing = [k for k in Options.names() if f"``{k}``" not in doc]
    assert not missing, f"diag_fim_step's docstring does not name fim_opts {missing}"
