// pair_gram_ on the CPU: A[n, (t, s), o] (+)= sum_m P[m, n, t, o] P[m, n, s, o] over the pairs
// of positions t <= s (row-major), every column added while the pair's row is in cache
// (fimfast/ops/pairs.py has the use: sum_{m,n} (P[m, n]^T Q[n])**2 as one product of A).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "cpu_math.h"
#include "fimfast_checks.h"

namespace fimfast {
namespace {

// out[o] (+)= sum_m x[m * sx + o] * y[m * sx + o]
template <typename T>
FIMFAST_INLINE void column_dot(const T* __restrict__ x, const T* __restrict__ y, int64_t M,
                               int64_t sx, int64_t O, bool add, T* __restrict__ out) {
  if (add) {
    for (int64_t o = 0; o < O; ++o) out[o] += x[o] * y[o];
  } else {
    for (int64_t o = 0; o < O; ++o) out[o] = x[o] * y[o];
  }
  for (int64_t m = 1; m < M; ++m) {
    const T* __restrict__ xm = x + m * sx;
    const T* __restrict__ ym = y + m * sx;
    for (int64_t o = 0; o < O; ++o) out[o] += xm[o] * ym[o];
  }
}

FIMFAST_SIMD_CLONES void column_dot_f(const float* x, const float* y, int64_t M, int64_t sx,
                                      int64_t O, bool add, float* out) {
  column_dot(x, y, M, sx, O, add, out);
}

FIMFAST_SIMD_CLONES void column_dot_d(const double* x, const double* y, int64_t M, int64_t sx,
                                      int64_t O, bool add, double* out) {
  column_dot(x, y, M, sx, O, add, out);
}

// A[n, pair, :] (+)= sum_m P[m, n, t, :] P[m, n, s, :], P contiguous (M, N, T, O), A (N, NP, O)
template <typename T>
void gram(const T* p, int64_t M, int64_t N, int64_t T_, int64_t O, bool add, T* a) {
  const int64_t NP = T_ * (T_ + 1) / 2, sx = N * T_ * O;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      int64_t q = 0;
      const T* base = p + n * T_ * O;
      for (int64_t t = 0; t < T_; ++t) {
        for (int64_t s = t; s < T_; ++s, ++q) {
          T* out = a + (n * NP + q) * O;
          if constexpr (std::is_same_v<T, double>) {
            column_dot_d(base + t * O, base + s * O, M, sx, O, add, out);
          } else {
            column_dot_f(base + t * O, base + s * O, M, sx, O, add, out);
          }
        }
      }
    }
  });
}

void pair_gram_cpu(at::Tensor& A, const at::Tensor& P_in, bool accumulate) {
  checks::check_pair_gram(A, P_in);
  const int64_t M = P_in.size(0), N = P_in.size(1), T_ = P_in.size(2), O = P_in.size(3);
  if (A.numel() == 0) return;
  if (M == 0) {
    if (!accumulate) A.zero_();
    return;
  }
  const at::Tensor P = P_in.to(A.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "pair_gram_", [&] {
    gram<scalar_t>(P.const_data_ptr<scalar_t>(), M, N, T_, O, accumulate,
                   A.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CPU, m) { m.impl("pair_gram_", &pair_gram_cpu); }

}  // namespace fimfast
