"""The counter-based generator: an independent numpy implementation of its algorithm
(tests/ops/spec.py, written from csrc/include/fimfast_rng.h) vs the library's Python spec, torch
and every kernel, and its statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import spec
import torch
from op_backends import backend_params, require
from tolerances import STAT_SIGMAS

from fimfast import ops
from fimfast.ops import rng

N_DRAWS = 1_000_000
SEED = 0x1234_5678_9ABC_DEF0

# (seed, stream, counter) -> hash: pins the specification (an independent C++ build of
# csrc/include/fimfast_rng.h printed the same values)
KNOWN = [
    (0, 0, 0, 222287032),
    (1, 0, 1, 3802172503),
    (0x1234_5678_9ABC_DEF0, 0, 2**33 + 5, 1134617222),
    (2**64 - 1, 1, 2**40 + 3, 3204031271),
    (42, 1, 123456789, 3935629922),
]


@pytest.mark.parametrize("seed,stream,ctr,value", KNOWN, ids=[f"kat{i}" for i in range(5)])
def test_known_answers(seed, stream, ctr, value):
    assert int(spec.hash_u32(seed, stream, np.array([ctr]))[0]) == value
    assert rng.hash_int(seed, stream, ctr) == value
    t = rng.hash_counters(seed, stream, torch.tensor([ctr], dtype=torch.int64))
    assert int(t) == value


def test_torch_hash_matches_python_spec():
    g = torch.Generator().manual_seed(0)
    ctr = torch.cat([
        torch.randint(0, 2**31, (300,), generator=g),
        torch.randint(0, 2**62, (300,), generator=g),
        torch.arange(2**32 - 5, 2**32 + 5),
    ])
    for seed in (0, 7, 2**32 + 1, 2**63 + 12345, -3):
        for stream in (rng.STREAM_SIGN, rng.STREAM_UNIFORM):
            expect = spec.hash_u32(seed, stream, ctr.numpy().astype(np.uint64)).tolist()
            assert rng.hash_counters(seed, stream, ctr).tolist() == expect
            assert [rng.hash_int(seed, stream, int(c)) for c in ctr] == expect


def test_rademacher_and_uniform_follow_the_spec():
    off, n = 2**32 - 37, 200  # straddles a change of the high counter word
    signs = rng.rademacher(SEED, off, (n,), torch.float64).tolist()
    assert signs == spec.signs(SEED, off, n).tolist()
    u = rng.uniform(SEED, off, (n,), torch.float64).tolist()
    assert u == spec.uniforms(SEED, off, n).tolist()


OFFSETS = {"0": 0, "7": 7, "word-hi-boundary": 2**37 - 50, "2^40+3": 2**40 + 3}


@pytest.mark.parametrize("oname", list(OFFSETS))
@pytest.mark.parametrize("backend", backend_params(("torch", "cpp", "triton", "cuda")))
def test_kernel_signs_are_the_spec(backend, oname):
    """mode gaussian with sigma2=1 returns the sign stream itself, for every backend."""
    dev = require(backend)
    S, R, C = 2, 3, 77
    z = torch.zeros(R, C, device=dev)
    off = OFFSETS[oname]
    out = ops.probe_logit_grad(z, "gaussian", SEED, off, S, sigma2=1.0, backend=backend)
    expect = torch.from_numpy(spec.signs(SEED, off, S * R * C).reshape(S, R, C)).float()
    assert torch.equal(out.cpu(), expect)


@pytest.mark.parametrize("backend", backend_params(("torch", "cpp", "triton", "cuda")))
def test_kernel_uniforms_are_the_spec(backend):
    """mode mc on 4096 equal logits samples label floor(u * 4096) (an exact CDF), so the label
    shows the top 12 bits of every uniform of the stream."""
    dev = require(backend)
    S, R, C = 2, 16, 4096
    off = 2**33 - 9
    out = ops.probe_logit_grad(torch.zeros(R, C, device=dev), "mc", SEED, off, S, backend=backend)
    u = torch.from_numpy(spec.uniforms(SEED, off, S * R).reshape(S, R))
    assert torch.equal(out.argmax(-1).cpu(), (u * C).floor().long())


def _within(mean: float, target: float, se: float) -> None:
    assert abs(mean - target) <= STAT_SIGMAS * se, (mean, target, se)


def test_sign_statistics():
    x = rng.rademacher(SEED, 12345, (N_DRAWS,), torch.float64)
    se = 1 / math.sqrt(N_DRAWS)
    _within(float(x.mean()), 0.0, se)  # balance
    for lag in (1, 2, 31, 32, 33, 1000):  # within a word, across words, across rows
        _within(float((x[:-lag] * x[lag:]).mean()), 0.0, se)
    # every bit position of the 32-bit word is balanced
    pos = x[: N_DRAWS - N_DRAWS % 32].reshape(-1, 32)  # offset 12345: a shifted but fixed phase
    for j in range(32):
        _within(float(pos[:, j].mean()), 0.0, 1 / math.sqrt(pos.shape[0]))
    # another seed, and the uniform stream of the same seed, are uncorrelated with this one
    y = rng.rademacher(SEED + 1, 12345, (N_DRAWS,), torch.float64)
    _within(float((x * y).mean()), 0.0, se)
    u = rng.uniform(SEED, 12345, (N_DRAWS,), torch.float64)
    _within(float((x * (u - 0.5)).mean()), 0.0, math.sqrt(1 / 12) * se)
    # the high words of the seed and of the counter matter: seed + 2**32 (same low word) and the
    # counters 2**32 further on give uncorrelated signs
    y = rng.rademacher(SEED + 2**32, 12345, (N_DRAWS,), torch.float64)
    _within(float((x * y).mean()), 0.0, se)
    y = rng.rademacher(SEED, 12345 + 2**37, (N_DRAWS,), torch.float64)  # word counter + 2**32
    _within(float((x * y).mean()), 0.0, se)
    # pairs of neighbours: the four sign patterns of (x_i, x_{i+1}) each have frequency 1/4
    pair = ((x[:-1] > 0).long() * 2 + (x[1:] > 0).long())
    counts = torch.bincount(pair, minlength=4).double()
    n = float(counts.sum())
    chi2 = float(((counts - n / 4) ** 2 / (n / 4)).sum())  # 3 degrees of freedom
    assert chi2 <= 3 + STAT_SIGMAS * math.sqrt(6), chi2


def test_uniform_statistics():
    u = rng.uniform(SEED, 999, (N_DRAWS,), torch.float64)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    se = math.sqrt(1 / 12 / N_DRAWS)
    _within(float(u.mean()), 0.5, se)
    # variance 1/12: the standard error of the mean of (u - 1/2)^2 is sqrt(1/80 - 1/144) / sqrt(n)
    se_var = math.sqrt(1 / 80 - 1 / 144) / math.sqrt(N_DRAWS)
    _within(float(((u - 0.5) ** 2).mean()), 1 / 12, se_var)
    for lag in (1, 32, 1000):
        _within(float(((u[:-lag] - 0.5) * (u[lag:] - 0.5)).mean()), 0.0, se / math.sqrt(12))
    # 64 equal bins: chi-square with 63 degrees of freedom, mean 63 and sd sqrt(126)
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    chi2 = float(((counts - N_DRAWS / 64) ** 2 / (N_DRAWS / 64)).sum())
    assert chi2 <= 63 + STAT_SIGMAS * math.sqrt(126), chi2


@pytest.mark.parametrize("k", [1, 31, 32, 33, 1000])
def test_stream_advances_with_offset(k):
    n = 5000
    for off in (0, 2**32 - 100):
        a = rng.rademacher(SEED, off, (n,), torch.float32)
        b = rng.rademacher(SEED, off + k, (n - k,), torch.float32)
        assert torch.equal(a[k:], b)
        ua = rng.uniform(SEED, off, (n,), torch.float64)
        ub = rng.uniform(SEED, off + k, (n - k,), torch.float64)
        assert torch.equal(ua[k:], ub)


def test_no_collisions_within_a_call():
    """hash is a bijection of the low counter word for a fixed high word: the counters of one call
    (below 2**32 apart and not crossing a high word) never share a hash."""
    for stream in (rng.STREAM_SIGN, rng.STREAM_UNIFORM):
        ctr = torch.arange(2**34 + 17, 2**34 + 17 + N_DRAWS, dtype=torch.int64)
        h = rng.hash_counters(SEED, stream, ctr)
        assert torch.unique(h).numel() == N_DRAWS
