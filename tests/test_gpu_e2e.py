"""End to end on a GPU: whole models on CUDA against the float64 oracle, the automatic backend
choice, and steps that never synchronise with the host.

Skipped without CUDA (``scripts/gpu_check.sh`` runs them on a GPU). The models have more than 48
parameter tensors, so per-tensor work (the multi-tensor ``accumulate_`` launch, per-layer rules)
spans more than one table of tensors. The oracle (tests/oracle.py) forms every row's Jacobian on
the CPU in float64, independently of the library.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import Case
from oracle import oracle
from torch import nn

import fimfast
from fimfast import FIMType
from fimfast.ops import registry

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
OPS = ("probe_logit_grad", "core_topk", "sq_matmul", "shared_sq", "accumulate_", "lm_head_probe")


def _deep_mlp(N: int = 6) -> Case:
    """25 Linear layers (50 parameter tensors), tanh, 5 classes."""
    torch.manual_seed(0)
    widths = [7] + [6] * 24 + [5]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 7, generator=g)
    y = torch.randint(0, 5, (N,), generator=g)
    return Case("deep_mlp", model, (x, y), lambda m, b: m(b[0]), torch.ones(N, dtype=torch.bool),
                y, "categorical", 5)


class _Encoder(nn.Module):
    """Embedding, 4 post-norm encoder layers (12 tensors each), mean pool, Linear head: 51."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


def _encoder(N: int = 5) -> Case:
    torch.manual_seed(0)
    model = _Encoder()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 13, (N, 6), generator=g)
    y = torch.randint(0, 4, (N,), generator=g)
    return Case("encoder4", model, (ids, y), lambda m, b: m(b[0]),
                torch.ones(N, dtype=torch.bool), y, "categorical", 4)


MODELS = {"deep_mlp": _deep_mlp, "encoder4": _encoder}


def _gpu_backends() -> list[str]:
    return [b for b in ("auto", "cuda", "triton") if b == "auto"
            or registry.backend_status(b, CUDA)[0]]


def _to(batch, dev):
    return tuple(t.to(dev) for t in batch)


def test_models_have_more_than_48_parameter_tensors():
    for build in MODELS.values():
        assert len(list(build().model.parameters())) > 48


def test_automatic_backend_choice_is_a_gpu_kernel():
    """On a GPU every op resolves to the cuda kernels when fimfast._C has them, else triton."""
    cuda_ok = registry.backend_status("cuda", CUDA)[0]
    triton_ok = registry.backend_status("triton", CUDA)[0]
    assert cuda_ok or triton_ok, registry.available_backends(CUDA)
    for op in OPS:
        name, _ = registry.resolve(op, None, CUDA)
        assert name == ("cuda" if cuda_ok else "triton"), (op, name)


@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("fim_type", [FIMType.EXACT, FIMType.EMPIRICAL])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_deep_models_on_cuda_match_the_float64_oracle(model, fim_type, backend):
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend!r} unavailable: {registry.backend_status(backend, CUDA)}")
    case = MODELS[model]()
    quantity = "exact" if fim_type == FIMType.EXACT else "empirical"
    truth = oracle(case, quantity)
    net = copy.deepcopy(case.model).to(CUDA)
    est = fimfast.DiagFisher(net, fim_type, reduction="sum", backend=backend)
    est.step(_to(case.batch, CUDA))
    got = est.result()
    scale = max(float(t.abs().max()) for t in truth.values())
    for name, t in truth.items():
        g = got[name]
        assert g.device.type == "cuda", name
        err = float((g.double().cpu() - t).abs().max()) / scale
        assert err < 1e-4, f"{name}: max error {err:.2e} of the largest entry"


@pytest.mark.parametrize("fim_type", list(FIMType))
def test_steps_never_synchronise_with_the_host(fim_type):
    """A step of every estimator runs under torch.cuda.set_sync_debug_mode("error") (after one
    warm-up step: lazy imports, kernel compilation and plan caches are allowed to sync once)."""
    case = _encoder()
    net = copy.deepcopy(case.model).to(CUDA)
    est = fimfast.DiagFisher(net, fim_type, reduction="mean", seed=0)
    batch = _to(case.batch, CUDA)
    est.step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        est.step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    got = est.result()
    assert all(torch.isfinite(v).all() for v in got.values())
    if fim_type in (FIMType.EXACT, FIMType.EMPIRICAL):  # two steps on one batch: its mean
        _assert_oracle(got, case, fim_type, case.valid.sum())


def _assert_oracle(got, case: Case, fim_type: FIMType, divide) -> None:
    """``got`` (on the GPU) against the float64 oracle of ``case`` divided by ``divide``, to
    1e-4 of the largest entry."""
    truth = oracle(case, "exact" if fim_type == FIMType.EXACT else "empirical")
    scale = max(float(t.abs().max()) for t in truth.values()) / float(divide)
    for name, t in truth.items():
        err = float((got[name].double().cpu() - t / float(divide)).abs().max()) / scale
        assert err < 1e-4, f"{name}: max error {err:.2e} of the largest entry"
