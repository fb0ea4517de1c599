// The counter-based generator of fimfast.ops.rng, for C++ and CUDA (header only, no torch).
//
// The Python docstring of fimfast/ops/rng.py is the specification; every function here reproduces
// it bit for bit. All arithmetic is on uint32_t, so wrap-around modulo 2**32 is the C++ semantics.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FIMFAST_HD __host__ __device__ __forceinline__
#else
#define FIMFAST_HD inline
#endif

namespace fimfast {
namespace rng {

constexpr uint32_t kStreamSign = 0;
constexpr uint32_t kStreamUniform = 1;

FIMFAST_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

struct Keys {
  uint32_t k0;
  uint32_t k1;
};

// Host side, once per call: the two keys of a 64-bit seed and a stream id.
FIMFAST_HD Keys make_keys(uint64_t seed, uint32_t stream) {
  Keys k;
  k.k0 = fmix32(static_cast<uint32_t>(seed) ^ 0x9E3779B9u);
  k.k1 = fmix32(static_cast<uint32_t>(seed >> 32) ^ 0x7F4A7C15u ^ (stream * 0x27D4EB2Fu));
  return k;
}

// hash(ctr) for a 64-bit counter with 32-bit halves (lo, hi).
FIMFAST_HD uint32_t hash(Keys k, uint64_t ctr) {
  uint32_t x = fmix32(static_cast<uint32_t>(ctr) ^ k.k0);
  return fmix32(x ^ (k.k1 + static_cast<uint32_t>(ctr >> 32)));
}

// Sign bit (0: +1, 1: -1) of counter ctr of the sign stream: bit (ctr & 31) of hash(ctr >> 5).
FIMFAST_HD uint32_t sign_bit(Keys k, uint64_t ctr) {
  return (hash(k, ctr >> 5) >> static_cast<uint32_t>(ctr & 31u)) & 1u;
}

// Uniform in [0, 1) with 24 random bits of counter ctr of the uniform stream (exact in float).
FIMFAST_HD float uniform_f(Keys k, uint64_t ctr) {
  return static_cast<float>(hash(k, ctr) >> 8) * 5.9604644775390625e-08f;  // 2**-24
}

}  // namespace rng
}  // namespace fimfast
