"""Floors of the convolutional workload (c) and of per-sample convolution products, one CPU
thread, CPU time (``time.process_time``), medians of interleaved calls.

    PYTHONPATH=. python benchmarks/conv_floors.py [--calls 15]

Prints markdown tables:

* (c)'s training step against its pieces that KFAC (MONTE_CARLO) cannot skip: the forward with
  the layers' inputs and outputs kept (:func:`benchmarks.kfac_cputime.linear_forward`), that
  forward plus one backward to the layer outputs, conv2's ``(N L, C k k + 1)`` patch matrix (one
  strided copy), its Gram matrix by one full ``mm`` (this machine's GEMM rate) and by fimfast's
  ``gram_upper_`` (the upper triangle), and fimfast's strip products (``conv_gram``);
* per-sample weight gradients of a convolution (no padding or padding 1, one group) by strided
  patches and one ``bmm`` against one ``convolution_backward`` of ``N`` groups (the samples side
  by side as channels), and a batch of 9 columns' input gradients by torch's per-column
  ``convolution_backward`` against one ``conv_transpose2d`` of the ``9 N`` folded columns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import kfac_cputime as kc  # noqa: E402
from benchmarks.workloads import build  # noqa: E402


def _median_ms(fns: dict, calls: int) -> dict:
    """Median CPU ms of each function over ``calls`` interleaved calls (after two warm-ups)."""
    for f in fns.values():
        f()
        f()
    t = {k: [] for k in fns}
    for _ in range(calls):
        for k, f in fns.items():
            c = time.process_time()
            f()
            t[k].append(time.process_time() - c)
    return {k: statistics.median(v) * 1e3 for k, v in t.items()}


def workload_c(calls: int) -> str:
    from fimfast.ops.gram import gram_upper_
    from fimfast.structured.convgram import conv_gram

    w = build("c", "full")
    model, X, y = w.model, w.inputs, w.labels
    conv2 = model[3]
    x2 = model[:3](X).detach()
    P = kc._patches(x2, conv2)
    out = P.new_empty(P.shape[1], P.shape[1])

    def train():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(X), y).backward()

    def fwd_bwd():
        ins, outs, h = kc.linear_forward(model, X, (nn.Linear, nn.Conv2d))
        torch.autograd.grad(h, outs, kc._mc_cotangent(h))

    fns = {"training step": train,
           "forward, layer inputs and outputs kept": lambda: kc.linear_forward(
               model, X, (nn.Linear, nn.Conv2d)),
           "that forward + backward to the layer outputs": fwd_bwd,
           "conv2 patches (strided copy)": lambda: kc._patches(x2, conv2),
           "conv2 patch Gram, full mm": lambda: torch.mm(P.T, P),
           "conv2 patch Gram, gram_upper_": lambda: gram_upper_(out, P),
           "conv2 strip products (conv_gram)": lambda: conv_gram(x2, conv2, torch.float32, True)}
    ms = _median_ms(fns, calls)
    tr = ms["training step"]
    macs = P.shape[0] * P.shape[1] ** 2
    lines = [f"(c): patch matrix {tuple(P.shape)}; full Gram {macs / 1e6:.0f} M multiply-adds",
             "", "| piece | ms | training steps |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {v / tr:.3f} |" for k, v in ms.items()]
    rate = macs / (ms["conv2 patch Gram, full mm"] * 1e6)
    lines.append(f"\nfull mm rate: {rate:.1f} multiply-adds / ns")
    return "\n".join(lines)


_SHAPES = [(16, 16, 16, 16, 3, 1, 1), (16, 3, 16, 16, 3, 1, 1), (16, 16, 32, 16, 3, 2, 1),
           (64, 16, 32, 12, 5, 1, 0), (64, 1, 16, 28, 5, 1, 0), (16, 64, 64, 8, 3, 1, 1),
           (16, 128, 128, 4, 3, 1, 1)]


def per_sample(calls: int) -> str:
    lines = ["| N, C -> O, H, k, stride, pad | patches + bmm ms | grouped backward ms | "
             "9 columns: per-column backward ms | folded conv_transpose2d ms |",
             "|---|---|---|---|---|"]
    for N, C, O, H, k, s, p in _SHAPES:
        x, wt = torch.randn(N, C, H, H), torch.randn(O, C, k, k)
        Ho = (H + 2 * p - k) // s + 1
        g, g9 = torch.randn(N, O, Ho, Ho), torch.randn(9, N, O, Ho, Ho)
        xp = F.pad(x, [p] * 4) if p else x

        def patches(x=xp, g=g, N=N, C=C, k=k, s=s, Ho=Ho):
            st = x.stride()
            u = x.as_strided((N, Ho, Ho, C, k, k),
                             (st[0], st[2] * s, st[3] * s, st[1], st[2], st[3])).contiguous()
            return torch.bmm(g.flatten(2), u.view(N, Ho * Ho, C * k * k))

        def grouped(x=x, g=g, N=N, C=C, O=O, H=H, k=k, s=s, p=p, Ho=Ho):
            w = x.new_empty(()).expand(N * O, C, k, k)
            return torch.ops.aten.convolution_backward(
                g.reshape(1, N * O, Ho, Ho), x.reshape(1, N * C, H, H), w, None, [s, s], [p, p],
                [1, 1], False, [0, 0], N, [False, True, False])[1].view(N, O, -1)

        def per_column(x=x, wt=wt, g9=g9, s=s, p=p):
            return torch.stack([torch.ops.aten.convolution_backward(
                g9[i], x, wt, None, [s, s], [p, p], [1, 1], False, [0, 0], 1,
                [True, False, False])[0] for i in range(9)])

        def folded(wt=wt, g9=g9, s=s, p=p, H=H, k=k):
            return F.conv_transpose2d(g9.flatten(0, 1), wt, None, s, p,
                                      output_padding=(H + 2 * p - k) % s)

        torch.testing.assert_close(grouped(), patches(), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(folded().view(9, *x.shape), per_column(), rtol=1e-4, atol=1e-3)
        ms = _median_ms({"p": patches, "g": grouped, "c": per_column, "f": folded}, calls)
        lines.append(f"| {N}, {C} -> {O}, {H}, {k}, {s}, {p} | {ms['p']:.3f} | {ms['g']:.3f} | "
                     f"{ms['c']:.3f} | {ms['f']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(workload_c(args.calls))
    print()
    print(per_sample(args.calls))


if __name__ == "__main__":
    main()
