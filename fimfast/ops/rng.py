"""The counter-based random generator shared by every backend.

fimfast draws probes and sampled labels from a stateless hash of ``(seed, stream, counter)``, so
that the torch reference, the Triton kernels and the C++/CUDA kernels produce the same numbers sign
for sign, and a run is reproduced by its seed and the per-step offset alone.

Algorithm (all arithmetic modulo 2**32 on unsigned 32-bit words)::

    fmix32(h):  h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16
    keys (host side, once per call):
        k0 = fmix32((seed & 0xFFFFFFFF) ^ 0x9E3779B9)
        k1 = fmix32(((seed >> 32) & 0xFFFFFFFF) ^ 0x7F4A7C15 ^ (stream * 0x27D4EB2F))
    hash(ctr) for a 64-bit counter with 32-bit halves (lo, hi):
        x = fmix32(lo ^ k0)
        x = fmix32(x ^ ((k1 + hi) mod 2**32))

Streams:

* ``STREAM_SIGN`` (Rademacher signs): element ``i`` of a call with offset ``o`` uses the counter
  ``c = o + i``; its sign is bit ``c & 31`` of ``hash(c >> 5)``: ``+1`` when the bit is 0 and ``-1``
  when it is 1. One hash serves 32 consecutive elements, which keeps the reference fast.
* ``STREAM_UNIFORM`` (sampled labels, Gaussian draws): element ``i`` uses ``u = (hash(o + i) >> 8)
  * 2**-24``, a float in ``[0, 1)`` with 24 random bits (exact in float32).

``fmix32`` is MurmurHash3's finaliser; chaining two rounds with independent keys gives a bijection
of the low counter word for a fixed high word, so no two counters of one call collide.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
STREAM_SIGN = 0
STREAM_UNIFORM = 1
_C_SEED0 = 0x9E3779B9
_C_SEED1 = 0x7F4A7C15
_C_STREAM = 0x27D4EB2F
_M1 = 0x85EBCA6B
_M2 = 0xC2B2AE35


def as_int64(x: int) -> int:
    """A 64-bit seed or counter as the signed int64 of a torch op schema (the same 64 bits)."""
    x = int(x) & ((1 << 64) - 1)
    return x - (1 << 64) if x >= 1 << 63 else x


def fmix32_int(h: int) -> int:
    """MurmurHash3 ``fmix32`` on a Python int (the host-side twin of the kernels' version)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * _M1) & MASK32
    h ^= h >> 13
    h = (h * _M2) & MASK32
    h ^= h >> 16
    return h


def keys(seed: int, stream: int) -> tuple[int, int]:
    """The two 32-bit keys ``(k0, k1)`` of a 64-bit ``seed`` and a ``stream`` id."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0 = fmix32_int((seed & MASK32) ^ _C_SEED0)
    k1 = fmix32_int(((seed >> 32) & MASK32) ^ _C_SEED1 ^ ((stream * _C_STREAM) & MASK32))
    return k0, k1


def hash_int(seed: int, stream: int, ctr: int) -> int:
    """Pure-Python hash of one counter: the specification every backend is tested against."""
    k0, k1 = keys(seed, stream)
    lo, hi = ctr & MASK32, (ctr >> 32) & MASK32
    x = fmix32_int(lo ^ k0)
    return fmix32_int(x ^ ((k1 + hi) & MASK32))


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # int64 tensors holding values in [0, 2**32): products reach 2**64, and the signed wrap-around
    # of int64 multiplication keeps the low 32 bits exact, which is all the mask keeps.
    h = h ^ (h >> 16)
    h = (h * _M1) & MASK32
    h = h ^ (h >> 13)
    h = (h * _M2) & MASK32
    return h ^ (h >> 16)


def hash_counters(seed: int, stream: int, ctr: torch.Tensor) -> torch.Tensor:
    """Hash an int64 tensor of non-negative counters; returns int64 values in ``[0, 2**32)``."""
    k0, k1 = keys(seed, stream)
    lo = ctr & MASK32
    hi = (ctr >> 32) & MASK32
    x = _fmix32(lo ^ k0)
    return _fmix32(x ^ ((hi + k1) & MASK32))


def _sign_table(dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``(256, 8)`` table: row ``b`` holds the signs ``1 - 2*bit_j(b)``, ``j = 0..7``."""
    b = torch.arange(256, dtype=torch.int64, device=device).unsqueeze(-1)
    return (1 - 2 * ((b >> torch.arange(8, dtype=torch.int64, device=device)) & 1)).to(dtype)


_BYTE_SHIFTS = (0, 8, 16, 24)


def rademacher(
    seed: int,
    offset: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Rademacher signs of the ``STREAM_SIGN`` stream for counters ``offset .. offset+numel-1``.

    Returns a tensor of ``shape`` and ``dtype`` with entries in ``{-1, +1}``, laid out row-major.
    """
    n = 1
    for s in shape:
        n *= int(s)
    if n == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    offset = int(offset)
    first_word = offset >> 5
    last_word = (offset + n - 1) >> 5
    words = torch.arange(first_word, last_word + 1, dtype=torch.int64, device=device)
    h = hash_counters(seed, STREAM_SIGN, words)
    # bit j of a word is bit j%8 of its byte j//8: one table lookup per byte writes 8 signs in
    # ``dtype`` directly (no int64 tensor of one entry per sign; 2.8x faster than shifting 32
    # bits out of every word, measured at 16.7M signs on CPU)
    shifts = torch.tensor(_BYTE_SHIFTS, dtype=torch.int64, device=device)
    byte = (h.unsqueeze(-1) >> shifts) & 255  # (words, 4)
    signs = torch.nn.functional.embedding(byte, _sign_table(dtype, device))  # (words, 4, 8)
    start = offset & 31
    return signs.reshape(-1)[start : start + n].reshape(shape)


def uniform(
    seed: int,
    offset: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniforms in ``[0, 1)`` of the ``STREAM_UNIFORM`` stream (24 random bits each)."""
    n = 1
    for s in shape:
        n *= int(s)
    ctr = torch.arange(int(offset), int(offset) + n, dtype=torch.int64, device=device)
    h = hash_counters(seed, STREAM_UNIFORM, ctr)
    return ((h >> 8).to(torch.float64) * 2.0**-24).to(dtype).reshape(shape)
