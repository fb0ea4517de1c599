// Small vectorisable math for the CPU kernels (no calls in the hot loops, so GCC/Clang
// auto-vectorise them at -O3 on any x86-64 or AArch64 baseline).
#pragma once

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>

// Forced inlining: the kernels rely on these helpers being inlined into their loops (a call
// blocks vectorisation, and GCC declined to inline exp_f into the sigmoid loop: 6x slower).
#if defined(__GNUC__)
#define FIMFAST_INLINE inline __attribute__((always_inline))
#else
#define FIMFAST_INLINE inline
#endif

// Function multiversioning of a hot loop: GCC/Clang compile it for AVX-512, AVX2 and the
// baseline, and the loader picks the widest the machine has (ifunc, x86-64 Linux only; elsewhere
// the baseline build alone). For plain loops over contiguous float/double without calls.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__CUDACC__)
#define FIMFAST_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FIMFAST_SIMD_CLONES
#endif

namespace fimfast {
namespace cpu {

template <typename To, typename From>
FIMFAST_INLINE To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}

// exp(x) in float, Cody-Waite reduction and the Cephes minimax polynomial: <= 2 ulp on
// [-87.3, 88], 0 below -87.3 (where the true value is subnormal: at most 1.2e-38 lost). The
// rounding constant 1.5 * 2**23 rounds to nearest without a floor instruction (absent on SSE2).
FIMFAST_INLINE float exp_f(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.0f);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  const float out = y * bit_cast<float>(e);
  return x < -87.3f ? 0.0f : out;
}

FIMFAST_INLINE double exp_f(double x) { return std::exp(x); }

// v with its sign bit flipped when bit == 1 (multiplication by a Rademacher sign, exactly).
FIMFAST_INLINE float flip_sign(float v, uint32_t bit) {
  return bit_cast<float>(bit_cast<uint32_t>(v) ^ (bit << 31));
}

FIMFAST_INLINE double flip_sign(double v, uint32_t bit) {
  return bit_cast<double>(bit_cast<uint64_t>(v) ^ (static_cast<uint64_t>(bit) << 63));
}

// Sum of x[0..n) with 16 independent partial sums (vectorises; the order is fixed, so the result
// does not depend on the thread count).
template <typename T>
FIMFAST_INLINE T sum16(const T* x, int64_t n) {
  T acc[16] = {};
  const int64_t nb = n - n % 16;
  for (int64_t c = 0; c < nb; c += 16) {
    for (int t = 0; t < 16; ++t) acc[t] += x[c + t];
  }
  T tail = T(0);
  for (int64_t c = nb; c < n; ++c) tail += x[c];
  T s = T(0);
  for (int t = 0; t < 16; ++t) s += acc[t];
  return s + tail;
}

template <typename T>
FIMFAST_INLINE T max16(const T* x, int64_t n) {
  T acc[16];
  for (int t = 0; t < 16; ++t) acc[t] = -INFINITY;
  const int64_t nb = n - n % 16;
  for (int64_t c = 0; c < nb; c += 16) {
    for (int t = 0; t < 16; ++t) acc[t] = x[c + t] > acc[t] ? x[c + t] : acc[t];
  }
  T m = -INFINITY;
  for (int64_t c = nb; c < n; ++c) m = x[c] > m ? x[c] : m;
  for (int t = 0; t < 16; ++t) m = acc[t] > m ? acc[t] : m;
  return m;
}

// Whether this CPU runs the AVX2+FMA copies of the kernels (x86-64 with GCC; elsewhere the
// baseline copy is the only one).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FIMFAST_AVX2_COPY 1
inline bool has_avx2() {
  static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return v;
}
#else
inline bool has_avx2() { return false; }
#endif

}  // namespace cpu
}  // namespace fimfast
