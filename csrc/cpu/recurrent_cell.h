// The LSTM and GRU cells in float32 for the recurrent kernels (csrc/cpu/recurrent_forward.cpp,
// csrc/cpu/recurrent_bptt.cpp): sigmoid and tanh from cpu_math.h's exp_f, a few ulp like ATen's
// (Sleef, MKL), in one vectorised pass over a step's rows instead of an ATen call per function
// (whose dispatch costs more than a step's arithmetic). The forward and the backward's
// recomputation of the gates use the same functions, so they agree exactly.
#pragma once

#include <stdint.h>

#include <cmath>

#include "cpu_math.h"

namespace fimfast {
namespace cell {

FIMFAST_INLINE float sigmoid_f(float x) { return 1.0f / (1.0f + cpu::exp_f(-x)); }

// tanh as Cephes' tanhf: an odd polynomial below |x| = 0.625 (no cancellation near 0), else
// 1 - 2 / (exp(2 |x|) + 1) with the sign of x; both branches computed, one kept (vectorises)
FIMFAST_INLINE float tanh_f(float x) {
  const float ax = std::fabs(x), z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = x + x * z * p;
  const float big = std::copysign(1.0f - 2.0f / (cpu::exp_f(2.0f * ax) + 1.0f), x);
  return ax < 0.625f ? small : big;
}

// One LSTM step on N rows from the pre-activations a (N, 4H) of the gates i, f, g, o and the
// cell states cp (N, H) it started from: c = i g + f cp, and y = o tanh(c) (the forward) or the
// gates' activations s (N, 4H: sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)) and tc = tanh(c)
// (the backward's recomputation). c may be cp (updated in place). Two loops without branches,
// each vectorised.
FIMFAST_INLINE void lstm_forward_f(const float* a, const float* cp, float* c, float* y, int64_t N,
                                   int64_t H) {
  for (int64_t n = 0; n < N; ++n) {
    const float* __restrict__ an = a + n * 4 * H;
    const float* cpn = cp + n * H;
    float* cn = c + n * H;
    float* __restrict__ yn = y + n * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float i = sigmoid_f(an[j]), f = sigmoid_f(an[H + j]), g = tanh_f(an[2 * H + j]);
      const float o = sigmoid_f(an[3 * H + j]);
      const float cv = i * g + f * cpn[j];
      cn[j] = cv;
      yn[j] = o * tanh_f(cv);
    }
  }
}

FIMFAST_INLINE void lstm_gates_f(const float* a, const float* cp, float* c, float* s, float* tc,
                                 int64_t N, int64_t H) {
  for (int64_t n = 0; n < N; ++n) {
    const float* __restrict__ an = a + n * 4 * H;
    const float* cpn = cp + n * H;
    float* cn = c + n * H;
    float* __restrict__ sn = s + n * 4 * H;
    float* __restrict__ tn = tc + n * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float i = sigmoid_f(an[j]), f = sigmoid_f(an[H + j]), g = tanh_f(an[2 * H + j]);
      const float o = sigmoid_f(an[3 * H + j]);
      const float cv = i * g + f * cpn[j];
      cn[j] = cv;
      sn[j] = i;
      sn[H + j] = f;
      sn[2 * H + j] = g;
      sn[3 * H + j] = o;
      tn[j] = tanh_f(cv);
    }
  }
}

}  // namespace cell
}  // namespace fimfast
