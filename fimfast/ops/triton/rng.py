"""The counter-based generator of :mod:`fimfast.ops.rng` as Triton device functions.

Bit for bit the specification of :mod:`fimfast.ops.rng`: 32-bit words are ``tl.uint32`` (whose
multiplication wraps modulo 2**32), counters are ``tl.int64``, keys come from the host
(:func:`fimfast.ops.rng.keys`) as integers in ``[0, 2**32)``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fmix32(h):
    """MurmurHash3's finaliser on ``tl.uint32`` values."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def hash_ctr(ctr, k0, k1):
    """``hash(ctr)`` of int64 counters ``ctr`` with uint32 keys ``(k0, k1)``."""
    lo = ctr.to(tl.uint32)  # truncation keeps the low word
    hi = (ctr >> 32).to(tl.uint32)
    x = fmix32(lo ^ k0)
    return fmix32(x ^ (k1 + hi))


@triton.jit
def sign_bit(ctr, k0, k1):
    """Bit ``ctr & 31`` of ``hash(ctr >> 5)``: 0 for the sign +1, 1 for -1 (sign stream keys)."""
    h = hash_ctr(ctr >> 5, k0, k1)
    return (h >> (ctr & 31).to(tl.uint32)) & 1


@triton.jit
def uniform01(ctr, k0, k1):
    """``(hash(ctr) >> 8) * 2**-24`` in float32 (exact), uniform stream keys."""
    h = hash_ctr(ctr, k0, k1)
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08
