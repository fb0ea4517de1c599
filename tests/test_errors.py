"""Bad input gets a clear error naming the argument, and the accumulated state never changes."""

from __future__ import annotations

import pytest
import torch
from cases import make_case

import fimfast
from fimfast import diag_fim_step, get_diag_fim, zero_diag_fim


class Wrap(torch.nn.Module):
    """Applies ``post`` to the logits of an inner model (to fabricate bad outputs)."""

    def __init__(self, inner, post):
        super().__init__()
        self.inner = inner
        self.post = post
        self.active = False

    def forward(self, x):
        z = self.inner(x)
        return self.post(z) if self.active else z


def snapshot(model, fim_type):
    est = fimfast.get_estimator(model, fim_type)
    sd = est.state_dict()
    return sd, [v.clone() for v in est.state.values]


def assert_same(model, fim_type, snap):
    sd, values = snap
    est = fimfast.get_estimator(model, fim_type)
    now = est.state_dict()
    assert now["offset"] == sd["offset"] and now["seed"] == sd["seed"]
    assert now["state"]["count"] == sd["state"]["count"]
    assert now["state"]["steps"] == sd["state"]["steps"]
    for a, b in zip(est.state.values, values):
        assert torch.equal(a, b)
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                   for m in model.modules()), "a hook was left on the model"


def _mlp_batch(N=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 6, generator=g), torch.randint(0, 5, (N,), generator=g)


x, y = _mlp_batch()
BAD_STEPS = [
    # (id, batch builder, model post-processing of logits or None, fim_opts, exception, message)
    ("tuple-of-3", (x, y, y), None, {}, ValueError, "batch must be"),
    ("not-a-batch", 42, None, {}, TypeError, "batch must be"),
    ("labels-out-of-range", (x, torch.tensor([0, 1, 7, 2])), None, {}, ValueError,
     r"labels must be in \[0, 4\]"),
    ("labels-negative", (x, torch.tensor([0, -3, 1, 2])), None, {}, ValueError, "labels must be"),
    ("labels-float", (x, y.float()), None, {}, ValueError, "labels must be integer"),
    ("labels-shape", (x, y[:3]), None, {}, ValueError, "labels must have shape"),
    ("logits-4d", (x, y), lambda z: z.reshape(4, 5, 1, 1), {}, ValueError, "class axis"),
    ("logits-1d", (x, y), lambda z: z.sum(1), {}, ValueError, "logits must be 2-D"),
    ("logits-nan", (x, y), lambda z: z.index_put((torch.tensor([1]), torch.tensor([2])),
                                                 torch.tensor(float("nan"))),
     {}, ValueError, "non-finite"),
    ("logits-inf", (x, y), lambda z: z * torch.tensor([1, 1, float("inf"), 1, 1]), {},
     ValueError, "non-finite"),
    ("empty-batch", (x[:0], y[:0]), None, {}, ValueError, "batch is empty"),
    ("wrong-input-features", (torch.randn(4, 3), y), None, {}, RuntimeError, "batch"),
    ("unknown-option", (x, y), None, {"num_probs": 2}, ValueError, "unknown key"),
    ("bad-num-probes", (x, y), None, {"num_probes": 0}, ValueError, "num_probes"),
    ("bad-top-k-type", (x, y), None, {"top_k": 1.5}, ValueError, "top_k"),
    ("bad-solver", (x, y), None, {"rankk_solver": "qr"}, ValueError, "rankk_solver"),
    ("bad-likelihood", (x, y), None, {"likelihood": "poisson"}, ValueError, "likelihood"),
    ("bad-backend-name", (x, y), None, {"backend": "metal"}, ValueError, "backend"),
    ("unavailable-backend", (x, y), None, {"backend": "cuda"},
     fimfast.BackendUnavailableError, "backend='cuda' is unavailable"),
]


@pytest.mark.parametrize("fim_type", ["hutchinson_rankk", "exact"])
@pytest.mark.parametrize("bid,batch,post,opts,exc,msg", BAD_STEPS,
                         ids=[b[0] for b in BAD_STEPS])
def test_bad_step_raises_and_keeps_state(bid, batch, post, opts, exc, msg, fim_type):
    inner = make_case("relu_mlp").model
    model = inner if post is None else Wrap(inner, post)
    zero_diag_fim(model, fim_type)
    diag_fim_step(model, _mlp_batch(), fim_type)  # some accumulated state to protect
    snap = snapshot(model, fim_type)
    model.active = True
    with pytest.raises(exc, match=msg):
        diag_fim_step(model, batch, fim_type, opts)
    assert_same(model, fim_type, snap)


def test_top_k_larger_than_c_minus_1():
    model = make_case("relu_mlp").model
    zero_diag_fim(model, "hutchinson_rankk")
    diag_fim_step(model, _mlp_batch(), "hutchinson_rankk")
    snap = snapshot(model, "hutchinson_rankk")
    with pytest.raises(ValueError, match=r"top_k'\] must be <= 4 for C=5"):
        diag_fim_step(model, _mlp_batch(), "hutchinson_rankk", {"top_k": 5})
    assert_same(model, "hutchinson_rankk", snap)
    # top_k is irrelevant to the other types
    diag_fim_step(model, _mlp_batch(), "exact", {"top_k": 5})


@pytest.mark.parametrize("kwargs,msg", [
    ({"ema": 1.0}, "ema must be"),
    ({"ema": 0.0}, "ema must be"),
    ({"ema": -0.5}, "ema must be"),
    ({"reduction": "avg"}, "reduction must be"),
], ids=["ema-1", "ema-0", "ema-neg", "reduction"])
def test_bad_ema_and_reduction(kwargs, msg):
    model = make_case("relu_mlp").model
    zero_diag_fim(model, "hutchinson")
    diag_fim_step(model, _mlp_batch(), "hutchinson")
    snap = snapshot(model, "hutchinson")
    with pytest.raises(ValueError, match=msg):
        diag_fim_step(model, _mlp_batch(), "hutchinson", **kwargs)
    assert_same(model, "hutchinson", snap)


def test_changing_reduction_midstream_is_refused():
    model = make_case("relu_mlp").model
    zero_diag_fim(model, "exact")
    diag_fim_step(model, _mlp_batch(), "exact", reduction="sum")
    with pytest.raises(ValueError, match="reduction/ema"):
        diag_fim_step(model, _mlp_batch(), "exact", reduction="mean")


def test_unknown_fim_type():
    model = make_case("relu_mlp").model
    with pytest.raises(ValueError, match="fim_type must be one of"):
        diag_fim_step(model, _mlp_batch(), "kfac")
    with pytest.raises(ValueError, match="fim_type must be one of"):
        fimfast.DiagFisher(model, 3)


def test_parameter_set_changed_since_zero():
    model = make_case("relu_mlp").model
    zero_diag_fim(model, "hutchinson")
    diag_fim_step(model, _mlp_batch(), "hutchinson")
    snap = snapshot(model, "hutchinson")
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable parameters changed"):
        diag_fim_step(model, _mlp_batch(), "hutchinson")
    assert_same(model, "hutchinson", snap)
    model[0].weight.requires_grad_(True)
    model[2] = torch.nn.Linear(8, 6)
    with pytest.raises(ValueError, match="reshaped"):
        diag_fim_step(model, _mlp_batch(), "hutchinson")


def test_get_before_any_step():
    model = make_case("relu_mlp").model
    zero_diag_fim(model)
    with pytest.raises(RuntimeError, match="no 'hutchinson' step"):
        get_diag_fim(model, "hutchinson")
    est = fimfast.DiagFisher(model, "exact")
    with pytest.raises(RuntimeError, match="no step has been taken"):
        est.result()


def test_empirical_needs_labels():
    model = make_case("relu_mlp").model
    with pytest.raises(ValueError, match="labels are required"):
        diag_fim_step(model, (_mlp_batch()[0],), "empirical")


def test_sqrt_needs_categorical():
    model = make_case("relu_mlp").model
    with pytest.raises(ValueError, match="hutchinson_sqrt"):
        fimfast.DiagFisher(model, "hutchinson_sqrt", likelihood="bernoulli")


def test_attention_mask_shape_and_all_masked():
    case = make_case("token_lm")
    b = dict(case.batch)
    b["attention_mask"] = b["attention_mask"][:, :2]
    est = fimfast.DiagFisher(case.model, "hutchinson")
    with pytest.raises(AssertionError, match="batch: the model's forward failed"):
        est.step(b)
    b = dict(case.batch)
    b["labels"] = torch.full_like(b["labels"], -100)
    with pytest.raises(ValueError, match="every token is masked"):
        est.step(b)
    assert est.state.steps == 0


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be"):
        diag_fim_step(lambda x: x, _mlp_batch(), "hutchinson")
