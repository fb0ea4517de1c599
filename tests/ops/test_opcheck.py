"""torch.library.opcheck on every compiled op (schema, fake implementation, autograd
registration, AOT dispatch), on the CPU and on a GPU when the CUDA kernels are built."""

from __future__ import annotations

import pytest
import torch
from op_backends import require


def _samples(dev):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(dev)

    z = rnd(4, 9)
    p = torch.softmax(rnd(4, 9, dtype=torch.float64), -1)
    lam, vec = torch.rand(4, 2, generator=g).to(dev), rnd(4, 2, 9)
    labels = torch.randint(0, 9, (4,), generator=g).to(dev)
    F = torch.ops.fimfast
    return {
        "probe-hutchinson": (F.probe_logit_grad, (z, "hutchinson", 3, 7, 2, None, None, None, 1.0)),
        "probe-mc-f64": (F.probe_logit_grad, (z.double(), "mc", 3, 7, 2, None, None, None, 1.0)),
        "probe-empirical-bf16": (F.probe_logit_grad,
                                 (z.bfloat16(), "empirical", 3, 7, 1, labels, None, None, 1.0)),
        "probe-rankk": (F.probe_logit_grad, (z, "rankk", 3, 7, 2, None, lam, vec, 1.0)),
        "core_topk-exact": (F.core_topk, (p, 3, "exact", 30)),
        "core_topk-power-f32": (F.core_topk, (p.float(), 2, "power", 5)),
        "sq_matmul": (F.sq_matmul, (rnd(6, 3), rnd(6, 5, dtype=torch.bfloat16))),
        "shared_sq": (F.shared_sq, (rnd(2, 3, 4), rnd(2, 3, 5))),
        "accumulate_": (F.accumulate_, ([rnd(5), rnd(2, 3, dtype=torch.float64)],
                                        [rnd(5, dtype=torch.float16), rnd(2, 3)], "ema", 0.9,
                                        2.0)),
    }


NAMES = ["probe-hutchinson", "probe-mc-f64", "probe-empirical-bf16", "probe-rankk",
         "core_topk-exact", "core_topk-power-f32", "sq_matmul", "shared_sq", "accumulate_"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_opcheck(backend, name):
    dev = require(backend)
    import fimfast.ops.cpp  # noqa: F401  (loads the extension and its fake implementations)

    op, args = _samples(dev)[name]
    torch.library.opcheck(op, args)
