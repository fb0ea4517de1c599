"""Adversarial checks, eighth round: vision blocks and classifier heads people train, written by
hand, against the float64 oracle (tests/adversarial_arch8.py: every diagonal type, ``dense`` and
``block_diag``, relative error below 1e-10 per parameter tensor, the oracle nonzero).

Vision: MobileNetV2 inverted residuals (ReLU6 in place, depthwise convolution, BatchNorm in eval
mode), EfficientNet MBConv with squeeze-and-excitation and stochastic depth (eval; train mode with
a per-sample drop), DenseNet concatenation, a U-Net (``ConvTranspose2d``, skip concatenations,
``F.interpolate``; per-pixel logits), CBAM channel and spatial gates, coordinate channels, a
blur-pooling buffer, a ConvNeXt block (layer scale), a RepVGG / NFNet / CondConv weight computed
in the forward. Heads: cosine classifiers with a learned scale, an ArcFace margin in eval mode, a
learned temperature, two concatenated heads, an ``einsum`` with a class-embedding table.

The layer rules take these models (``generic=()``) except where named: parameters read outside a
module call (a bare prototype matrix, a gate's query) and weights computed from several parameters
the rules do not pull back take the generic path, exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from adversarial_arch8 import DT, PER_SAMPLE, RANDOM, batches, check
from cases import Fn

pytestmark = pytest.mark.filterwarnings("ignore")


def _bn(c: int) -> nn.BatchNorm2d:
    b = nn.BatchNorm2d(c)
    with torch.no_grad():
        b.running_mean.uniform_(-0.5, 0.5)
        b.running_var.uniform_(0.5, 1.5)
        b.weight.uniform_(0.5, 1.5)
        b.bias.uniform_(-0.3, 0.3)
    return b


def _head(y, s):
    return s.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _invres(s, x):
    return _head(x + s.proj(s.dw(s.exp(x))), s)


def _se(s, h):
    return h * torch.sigmoid(s.se_e(F.silu(s.se_r(F.adaptive_avg_pool2d(h, 1)))))


def _mbconv(s, x):
    y = s.proj(_se(s, s.dw(s.exp(x))))
    if s.training:  # stochastic depth: a per-sample drop of the residual branch
        keep = (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype) > 0.5).to(x.dtype) / 0.5
        y = y * keep
    return _head(x + y, s)


def _expand(c, h, act):
    return {"exp": nn.Sequential(nn.Conv2d(c, h, 1, bias=False), _bn(h), act(True)),
            "dw": nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), _bn(h),
                                act(True)),
            "proj": nn.Sequential(nn.Conv2d(h, c, 1, bias=False), _bn(c)),
            "head": nn.Linear(c, 4)}


def _dense(s, x):
    f = [x]
    for layer in s.ls:
        f.append(layer(torch.cat(f, 1)))
    return s.head(F.avg_pool2d(torch.cat(f, 1), x.shape[-1]).flatten(1))


def _unet(mode, seg=False):
    def fwd(s, x):
        a = torch.relu(s.d1(x))
        b = torch.relu(s.d2(F.max_pool2d(a, 2)))
        u = torch.relu(s.u1(torch.cat([s.up(b), a], 1)))
        kw = {} if mode == "nearest" else {"align_corners": False}
        o = s.u2(torch.cat([u, x, F.interpolate(b, scale_factor=2, mode=mode, **kw)], 1))
        return o.flatten(2).transpose(1, 2) if seg else o.mean((2, 3))
    return fwd


def _cbam(s, x):
    h = torch.relu(s.c(x))
    h = h * torch.sigmoid(s.mlp(h.mean((2, 3))) + s.mlp(h.amax((2, 3))))[:, :, None, None]
    pooled = torch.cat([h.mean(1, keepdim=True), h.max(1, keepdim=True)[0]], 1)
    return s.head((h * torch.sigmoid(s.sp(pooled))).mean((2, 3)))


def _coord(s, x):
    N, _, H, W = x.shape
    yy = torch.linspace(-1, 1, H, dtype=x.dtype).view(1, 1, H, 1).expand(N, 1, H, W)
    xx = torch.linspace(-1, 1, W, dtype=x.dtype).view(1, 1, 1, W).expand(N, 1, H, W)
    return s.head(torch.tanh(s.c(torch.cat([x, yy, xx], 1))).mean((2, 3)))


class _Blur(nn.Module):
    """Anti-aliased pooling: max-pool at stride 1, then a fixed blur buffer at stride 2."""

    def __init__(self, c: int = 3):
        super().__init__()
        self.c, self.head = nn.Conv2d(2, c, 3, padding=1), nn.Linear(4 * c, 4)
        f = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (f[:, None] * f[None] / 16)[None, None].repeat(c, 1, 1, 1))

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.c(x)), 2, stride=1)
        h = F.conv2d(F.pad(h, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2,
                     groups=self.filt.shape[0])
        return self.head(F.adaptive_avg_pool2d(h, 2).flatten(1))


def _convnext(s, x):
    h = s.pw2(F.gelu(s.pw1(s.ln(s.dw(x).permute(0, 2, 3, 1))))) * s.gamma
    return s.head((x + h.permute(0, 3, 1, 2)).mean((2, 3)))


def _repvgg(s, x):
    std = (s.rv + 1e-5).sqrt()
    W = (s.w3 + F.pad(s.w1, [1, 1, 1, 1])) * (s.g / std).reshape(-1, 1, 1, 1)
    return s.head(torch.relu(F.conv2d(x, W, s.b - s.rm * s.g / std, padding=1)).mean((2, 3)))


def _nfconv(s, x):
    W = s.W
    W = s.gain * (W - W.mean((1, 2, 3), keepdim=True)) / (
        W.std((1, 2, 3), keepdim=True, unbiased=False) * W[0].numel() ** 0.5 + 1e-4)
    return s.head(torch.relu(F.conv2d(x, W, s.bias, padding=1)).mean((2, 3)))


def _condconv(s, x):
    """Per-sample mixtures of expert kernels, run as one grouped convolution over the batch."""
    N, c = x.shape[:2]
    W = torch.einsum("nk,koihw->noihw", torch.sigmoid(s.route(x.mean((2, 3)))), s.Wk)
    y = F.conv2d(x.reshape(1, N * c, *x.shape[2:]), W.reshape(-1, c, 3, 3), padding=1, groups=N)
    return s.head(torch.relu(y.reshape(N, -1, *x.shape[2:])).mean((2, 3)))


def _p(*shape, scale=0.5):
    return nn.Parameter(torch.randn(*shape) * scale)


VISION = {  # name: (forward, modules, input shape, parameters on the generic path)
    "MobileNetV2 inverted residual": (_invres, lambda: _expand(2, 4, nn.ReLU6), (2, 4, 4), ()),
    "MBConv + squeeze-excitation": (_mbconv, lambda: {
        **_expand(2, 4, lambda inplace: nn.SiLU()), "se_r": nn.Conv2d(4, 2, 1),
        "se_e": nn.Conv2d(2, 4, 1)}, (2, 4, 4), ()),
    "DenseNet block": (_dense, lambda: {"ls": nn.ModuleList(
        nn.Sequential(_bn(2 + 2 * i), nn.ReLU(), nn.Conv2d(2 + 2 * i, 2, 3, padding=1))
        for i in range(3)), "head": nn.Linear(8, 4)}, (2, 4, 4), ()),
    "U-Net, nearest": (_unet("nearest"), lambda: _unet_mods(4), (2, 4, 4), ()),
    "U-Net, bilinear": (_unet("bilinear"), lambda: _unet_mods(4), (2, 4, 4), ()),
    "CBAM gates": (_cbam, lambda: {"c": nn.Conv2d(2, 4, 3, padding=1), "mlp": nn.Sequential(
        nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 4)), "sp": nn.Conv2d(2, 1, 7, padding=3),
        "head": nn.Linear(4, 4)}, (2, 4, 4), ()),
    "coordinate channels": (_coord, lambda: {"c": nn.Conv2d(4, 3, 3, padding=1),
                                             "head": nn.Linear(3, 4)}, (2, 4, 4), ()),
    "ConvNeXt block": (_convnext, lambda: {
        "dw": nn.Conv2d(3, 3, 3, padding=1, groups=3), "ln": nn.LayerNorm(3),
        "pw1": nn.Linear(3, 6), "pw2": nn.Linear(6, 3), "gamma": nn.Parameter(torch.full((3,), .5)),
        "head": nn.Linear(3, 4)}, (3, 4, 4), ()),
    "RepVGG re-parametrized in the forward": (_repvgg, lambda: {
        "w3": _p(3, 2, 3, 3), "w1": _p(3, 2, 1, 1), "g": nn.Parameter(torch.rand(3) + .5),
        "b": _p(3, scale=0.1), "head": nn.Linear(3, 4)}, (2, 4, 4), ("w3", "w1", "g", "b")),
    "NFNet scaled weight standardization": (_nfconv, lambda: {
        "W": _p(3, 2, 3, 3), "gain": nn.Parameter(torch.rand(3, 1, 1, 1) + .5),
        "bias": _p(3, scale=0.1), "head": nn.Linear(3, 4)}, (2, 4, 4), ("W", "gain")),
    "CondConv over a grouped batch": (_condconv, lambda: {
        "route": nn.Linear(2, 3), "Wk": _p(3, 3, 2, 3, 3), "head": nn.Linear(3, 4)},
        (2, 4, 4), ()),
}


def _unet_mods(C):
    return {"d1": nn.Conv2d(2, 3, 3, padding=1), "d2": nn.Conv2d(3, 4, 3, padding=1),
            "up": nn.ConvTranspose2d(4, 3, 2, stride=2), "u1": nn.Conv2d(6, 3, 3, padding=1),
            "u2": nn.Conv2d(9, C, 1)}


def _make(fwd, mods, train=False, buffers=None):
    def make():
        torch.manual_seed(0)
        m = Fn(fwd, **mods())
        for k, v in (buffers or {}).items():
            m.register_buffer(k, v)
        return m.to(DT).train(train)
    return make


def _rotate(i):
    return PER_SAMPLE + (RANDOM[i % 5], RANDOM[(i + 2) % 5])


@pytest.mark.parametrize("name", list(VISION))
def test_vision_blocks_exact(name):
    fwd, mods, shape, generic = VISION[name]
    bufs = {"rv": torch.rand(3) + .5, "rm": torch.randn(3) * .1} if "RepVGG" in name else None
    check(_make(fwd, mods, buffers=bufs), batches(shape), _rotate(list(VISION).index(name)),
          generic=generic)


def test_blur_pool_buffer_and_stochastic_depth_in_train_mode_exact():
    """The blur filter is a buffer (no parameter); stochastic depth in train mode drops the
    branch per sample (the sub-network each step sampled), its BatchNorms in eval mode."""
    def blur():
        torch.manual_seed(0)
        return _Blur().to(DT).eval()
    check(blur, batches((2, 6, 6)), ("exact", "monte_carlo", "hutchinson_rank1"), generic=())
    fwd, mods, shape, _ = VISION["MBConv + squeeze-excitation"]

    def train_sd():
        m = _make(fwd, mods, train=True)()
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.eval()
        return m
    check(train_sd, batches(shape, k=3), ("exact", "empirical", "hutchinson_dg"), generic=())


def test_unet_per_pixel_logits_exact():
    """(N, H*W, C) logits with (N, H*W) labels: each pixel a row."""
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(2, 2, 4, 4, generator=g, dtype=DT),
             torch.randint(0, 3, (2, 16), generator=g)) for _ in range(2)]
    check(_make(_unet("bilinear", seg=True), lambda: _unet_mods(3)), data,
          ("exact", "empirical", "hutchinson", "hutchinson_rankk"), reps=(), generic=())


# -- heads ----------------------------------------------------------------------------------- #
def _feat(s, x):
    return torch.tanh(s.f(x))


W = {"W": lambda: _p(4, 4, scale=1.0)}
SCALE = {"s": lambda: nn.Parameter(torch.tensor(1.5))}
HEADS = {  # name: (forward, modules beside the features, generic)
    "cosine, F.normalize, learned scale": (
        lambda s, x: s.s * F.linear(F.normalize(_feat(s, x)), F.normalize(s.W)), {**W, **SCALE},
        ()),
    "cosine, F.cosine_similarity": (
        lambda s, x: s.s * F.cosine_similarity(_feat(s, x)[:, None], s.W[None], dim=-1),
        {**W, **SCALE}, ("W",)),
    "cosine, module weight, exp scale": (
        lambda s, x: s.s.exp() * (F.normalize(_feat(s, x)) @ F.normalize(s.lin.weight).t()),
        {"lin": lambda: nn.Linear(4, 4, bias=False), **SCALE}, ()),
    "ArcFace margin in eval mode": (
        lambda s, x: 4.0 * _arc(s, F.linear(F.normalize(_feat(s, x)), F.normalize(s.W))), W, ()),
    "learned temperature": (lambda s, x: s.o(_feat(s, x)) / s.s,
                            {"o": lambda: nn.Linear(4, 4), **SCALE}, ()),
    "two heads concatenated": (
        lambda s, x: torch.cat([s.h1(_feat(s, x)), 0.5 * s.h2(_feat(s, x))], -1),
        {"h1": lambda: nn.Linear(4, 2), "h2": lambda: nn.Linear(4, 2)}, ()),
    "einsum with a class-embedding table": (
        lambda s, x: torch.einsum("nd,cd->nc", _feat(s, x), s.cls.weight),
        {"cls": lambda: nn.Embedding(4, 4)}, ()),
}


def _arc(s, cos):
    if s.training:  # never taken: the model is in eval mode
        raise AssertionError("the margin is applied in training only")
    return cos


@pytest.mark.parametrize("name", list(HEADS))
def test_classifier_heads_exact(name):
    fwd, extra, generic = HEADS[name]

    def mods():
        return {"f": nn.Linear(3, 4), **{k: v() for k, v in extra.items()}}
    check(_make(fwd, mods), batches((3,)), _rotate(list(HEADS).index(name)), generic=generic)
