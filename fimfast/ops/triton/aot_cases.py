"""The launcher calls whose kernel launches :mod:`fimfast.ops.triton.aot` records and compiles.

:func:`cases` returns (label, call) pairs: every launcher on small CPU inputs spanning the dtypes,
modes and block-size regimes it accepts. The calls draw their inputs from one seeded generator,
in the order they are run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Case = tuple[str, Callable[[], object]]
Rnd = Callable[..., torch.Tensor]


def _nm(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def cases() -> list[Case]:
    """(label, call) pairs: every launcher on small CPU inputs spanning the dtypes, modes and
    block-size regimes it accepts."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    return [
        *_accumulate(rnd),
        *_sq_matmul(rnd),
        *_shared_sq(rnd),
        *_core_topk(rnd),
        *_probe_logit_grad(rnd),
        *_lm_head_probe(rnd),
    ]


def _accumulate(rnd: Rnd) -> list[Case]:
    from fimfast.ops.triton import accumulate

    cases: list[Case] = []
    for sdt in (torch.float32, torch.float64):  # fimfast's states are float32 or float64
        for gdt in _DTYPES:
            for mode in ("sum", "ema"):
                cases.append((
                    f"accumulate_ state={_nm(sdt)} grad={_nm(gdt)} mode={mode}",
                    lambda sdt=sdt, gdt=gdt, mode=mode: accumulate.accumulate_triton_(
                        [torch.zeros(5000, dtype=sdt), torch.zeros(3, 7, dtype=sdt)],
                        [rnd(5000, dtype=gdt), rnd(3, 7, dtype=gdt)], mode, 0.9, 1.0,
                    ),
                ))  # fmt: skip
    return cases


def _sq_matmul(rnd: Rnd) -> list[Case]:
    from fimfast.ops.triton import sq_matmul

    cases: list[Case] = []
    for dt in _DTYPES:
        cases.append((
            f"sq_matmul {_nm(dt)}",
            lambda dt=dt: sq_matmul.sq_matmul_triton(
                rnd(256, 96, dtype=dt), rnd(256, 80, dtype=dt)
            ),
        ))  # fmt: skip
    cases.append((
        "sq_matmul float32 transposed g",
        lambda: sq_matmul.sq_matmul_triton(rnd(96, 256).t(), rnd(256, 80)),
    ))  # fmt: skip
    return cases


def _shared_sq(rnd: Rnd) -> list[Case]:
    from fimfast.ops.triton import shared_sq

    cases: list[Case] = []
    for dt in _DTYPES:
        for T in (8, 64):  # BLOCK_T 16 and 32
            cases.append((
                f"shared_sq {_nm(dt)} T={T}",
                lambda dt=dt, T=T: shared_sq.shared_sq_triton(
                    rnd(4, T, 48, dtype=dt), rnd(4, T, 80, dtype=dt)
                ),
            ))  # fmt: skip
    return cases


def _core_topk(rnd: Rnd) -> list[Case]:
    from fimfast.ops.triton import core_topk

    cases: list[Case] = []
    for dt in _DTYPES:
        for C in (1000, 4096, core_topk.MAX_C):  # 4, 16 and 32 warps
            p = lambda C=C, dt=dt: torch.softmax(rnd(3, C, dtype=torch.float64), -1).to(dt)  # noqa: E731
            cases.append((
                f"core_topk exact {_nm(dt)} C={C}",
                lambda p=p: core_topk.core_topk_triton(p(), 2, "exact"),
            ))  # fmt: skip
            for k in (2, 4, core_topk.MAX_K):
                cases.append((
                    f"core_topk power {_nm(dt)} C={C} k={k}",
                    lambda p=p, k=k: core_topk.core_topk_triton(p(), k, "power", 3),
                ))  # fmt: skip
    return cases


def _probe_logit_grad(rnd: Rnd) -> list[Case]:
    from fimfast.ops.torch_ref import PROBE_MODES
    from fimfast.ops.triton import probe_logit_grad

    cases: list[Case] = []
    for dt in _DTYPES:
        # one register block (1024, and the largest), and the column-block loop
        for C in (1000, probe_logit_grad.MAX_ONE_BLOCK, 50000):
            for mode in PROBE_MODES:

                def call(dt=dt, C=C, mode=mode):
                    x = rnd(2, C, dtype=dt)
                    acc = torch.float64 if dt == torch.float64 else torch.float32
                    eig = (torch.rand(2, 2, dtype=acc), rnd(2, 2, C, dtype=acc))
                    return probe_logit_grad.probe_logit_grad_triton(
                        x, mode, 0, 0, 2, labels=torch.tensor([0, 1]), eig=eig, sigma2=2.0
                    )

                cases.append((f"probe_logit_grad {mode} {_nm(dt)} C={C}", call))
    return cases


def _lm_head_probe(rnd: Rnd) -> list[Case]:
    from fimfast.ops.triton import lm_head_probe

    cases: list[Case] = []
    for dt in (torch.float32, torch.float64):  # the launcher computes in float32|float64
        for D in (32, lm_head_probe.MAX_D):
            for mode in ("hutchinson", "sqrt", "dg"):
                for bias in (True, False):
                    cases.append((
                        f"lm_head_probe {mode} {_nm(dt)} d={D} bias={bias}",
                        lambda dt=dt, D=D, mode=mode, bias=bias: lm_head_probe.lm_head_probe_triton(
                            rnd(20, D, dtype=dt), rnd(300, D, dtype=dt),
                            rnd(300, dtype=dt) if bias else None, mode, 0, 0, None,
                        ),
                    ))  # fmt: skip
    return cases
