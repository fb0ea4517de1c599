"""Per-sample squares of a depthwise convolution's weight: by a convolution backward per column
(``fimfast/rules/conv_grouped.py``) against the unfolded patches and one product per (sample,
group) (``fimfast/persample/squares.py``, ``_outer_sq``), with the patches formed in the call
(``patches``) and formed before it (``kept``: the squares alone); and the patches of a strided
convolution by the extension against torch's copy of the strided view
(``fimfast/rules/windows.py``, ``_unfold``).

One torch thread, CPU time (``time.process_time``), the variants interleaved, medians of
``--rounds`` calls.

    python benchmarks/bench_conv_grouped.py --rounds 30
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# (label, module, input shape without the batch)
LAYERS = (
    ("dw 3x3 s1 16ch 16^2", lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16), (16, 16, 16)),
    ("dw 3x3 s2 x2 16ch 16^2", lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=16),
     (16, 16, 16)),
    ("dw 3x3 s2 32ch 16^2", lambda: nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32),
     (32, 16, 16)),
    ("dw 5x5 s1 16ch 16^2", lambda: nn.Conv2d(16, 16, 5, padding=2, groups=16), (16, 16, 16)),
    ("dw 3x3 dil2 16ch 16^2", lambda: nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16),
     (16, 16, 16)),
    ("dw1d 3 16ch 64", lambda: nn.Conv1d(16, 16, 3, padding=2, padding_mode="reflect",
                                         groups=16), (16, 64)),
    ("dw3d 3 8ch 8^3", lambda: nn.Conv3d(8, 8, 3, padding=1, groups=8), (8, 8, 8, 8)),
)

# (N, C, spatial, stride, dilation, dims) of the strided patches
UNFOLDS = ((16, 16, 16, 2, 1, 2), (64, 16, 16, 2, 1, 2), (16, 3, 32, 2, 1, 2), (16, 8, 8, 2, 1, 3),
           (16, 16, 16, 1, 1, 2), (16, 16, 16, 1, 2, 2))


def _median_us(fns: dict, rounds: int) -> dict[str, str]:
    t: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            t[k].append(time.process_time() - t0)
    out = {}
    for k, v in t.items():
        q = statistics.quantiles(v, n=4)
        out[k] = f"{statistics.median(v) * 1e6:.0f} ({q[0] * 1e6:.0f}-{q[2] * 1e6:.0f})"
    return out


def _by_backward(m, x, P):
    from fimfast.rules import conv_grouped

    return conv_grouped.GroupedInput(None, (1,), x.dtype, 1, m, x).sq(P)


def squares(rounds: int, sizes: list[int], columns: list[int]) -> list[str]:
    from fimfast.persample.squares import _outer_sq
    from fimfast.rules import conv_grouped
    from fimfast.rules.conv import ConvRule

    rule = ConvRule()
    lines = ["| layer | N | columns | backward us | patches us | kept patches us | default |",
             "|---|---|---|---|---|---|---|"]
    for N in sizes:
        for label, build, shape in LAYERS:
            torch.manual_seed(0)
            m = build()
            x = torch.randn(N, *shape)
            y = m(x)
            O, g, L = m.out_channels, m.groups, math.prod(y.shape[2:])

            def patches(xx, m=m):
                return rule._patches(m, xx)

            for M in columns:
                G = torch.randn(M, *y.shape)
                P = G.reshape(M, N, O, -1).transpose(2, 3).reshape(M, N, L, g, O // g)
                kept = patches(x)
                fns = {
                    "backward": lambda P=P, x=x, m=m: _by_backward(m, x, P),
                    "patches": lambda P=P, x=x, patches=patches: _outer_sq(P, patches(x)),
                    "kept": lambda P=P, kept=kept: _outer_sq(P, kept),
                }
                ref = fns["patches"]()
                assert torch.allclose(fns["backward"](), ref, rtol=1e-3, atol=1e-3), label
                r = _median_us(fns, rounds)
                took = conv_grouped.grouped_input(m, x, patches, L, M) is not None
                lines.append(f"| {label} | {N} | {M} | {r['backward']} | {r['patches']} | "
                             f"{r['kept']} | {'backward' if took else 'patches'} |")
    return lines


def unfolds(rounds: int) -> list[str]:
    from fimfast.rules import windows

    lines = ["| N x C x spatial | stride | dilation | torch copy us | extension us |",
             "|---|---|---|---|---|"]
    for N, C, H, s, dl, n in UNFOLDS:
        x = torch.randn(N, C, *(H,) * n)
        k, d, st = (3,) * n, (dl,) * n, (s,) * n
        size = [(H + 2 - dl * 2 - 1) // s + 1] * n

        def view(x=x, k=k, d=d, st=st, size=size, n=n):
            return windows._unfold_view(F.pad(x, [1] * (2 * n)), k, d, st, size).contiguous()

        def host(x=x, k=k, d=d, st=st, size=size, n=n):
            return windows.host_unfold(x, k, d, st, [1] * n, size)

        if host() is None:
            return lines + ["(no extension)"]
        assert torch.equal(view().reshape(host().shape), host())
        r = _median_us({"torch": view, "host": host}, rounds)
        lines.append(f"| {N} x {C} x {H}^{n} | {s} | {dl} | {r['torch']} | {r['host']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--sizes", default="16,64")
    ap.add_argument("--columns", default="1,2,10")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sizes = [int(s) for s in a.sizes.split(",")]
    columns = [int(s) for s in a.columns.split(",")]
    print("\n".join(squares(a.rounds, sizes, columns)))
    print()
    print("\n".join(unfolds(a.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
