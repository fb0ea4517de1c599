// pair_gram_ on the CPU: A[n, (t, s), o] (+)= sum_m P[t][m, n, o] P[s][m, n, o] over the pairs
// of positions t <= s (row-major), the gradients of each position a tensor of their own (no
// stacked copy), every column added while the pair's row is in cache
// (fimfast/ops/pairs.py has the use: sum_{m,n} (P[m, n]^T Q[n])**2 as one product of A).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_math.h"
#include "fimfast_checks.h"

namespace fimfast {
namespace {

// out[o] (+)= sum_m x[m * sx + o] * y[m * sy + o]
template <typename T>
FIMFAST_INLINE void column_dot(const T* __restrict__ x, int64_t sx, const T* __restrict__ y,
                               int64_t sy, int64_t M, int64_t O, bool add, T* __restrict__ out) {
  if (add) {
    for (int64_t o = 0; o < O; ++o) out[o] += x[o] * y[o];
  } else {
    for (int64_t o = 0; o < O; ++o) out[o] = x[o] * y[o];
  }
  for (int64_t m = 1; m < M; ++m) {
    const T* __restrict__ xm = x + m * sx;
    const T* __restrict__ ym = y + m * sy;
    for (int64_t o = 0; o < O; ++o) out[o] += xm[o] * ym[o];
  }
}

FIMFAST_SIMD_CLONES void column_dot_f(const float* x, int64_t sx, const float* y, int64_t sy,
                                      int64_t M, int64_t O, bool add, float* out) {
  column_dot(x, sx, y, sy, M, O, add, out);
}

FIMFAST_SIMD_CLONES void column_dot_d(const double* x, int64_t sx, const double* y, int64_t sy,
                                      int64_t M, int64_t O, bool add, double* out) {
  column_dot(x, sx, y, sy, M, O, add, out);
}

// One position's gradients: data, stride of a column, stride of a sample (a feature stride 1)
template <typename T>
struct Position {
  const T* data;
  int64_t sm, sn;
};

// A[n, pair, :] (+)= sum_m P_t[m, n, :] P_s[m, n, :], A (N, NP, O) contiguous
template <typename T>
void gram(const std::vector<Position<T>>& ps, int64_t M, int64_t N, int64_t O, bool add, T* a) {
  const int64_t T_ = static_cast<int64_t>(ps.size()), NP = T_ * (T_ + 1) / 2;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      int64_t q = 0;
      for (int64_t t = 0; t < T_; ++t) {
        const T* x = ps[t].data + n * ps[t].sn;
        for (int64_t s = t; s < T_; ++s, ++q) {
          const T* y = ps[s].data + n * ps[s].sn;
          T* out = a + (n * NP + q) * O;
          if constexpr (std::is_same_v<T, double>) {
            column_dot_d(x, ps[t].sm, y, ps[s].sm, M, O, add, out);
          } else {
            column_dot_f(x, ps[t].sm, y, ps[s].sm, M, O, add, out);
          }
        }
      }
    }
  });
}

void pair_gram_cpu(at::Tensor& A, at::TensorList P, bool accumulate) {
  checks::check_pair_gram(A, P);
  if (A.numel() == 0) return;
  const int64_t M = P[0].size(0), N = P[0].size(1), O = P[0].size(2);
  if (M == 0) {
    if (!accumulate) A.zero_();
    return;
  }
  std::vector<at::Tensor> keep;  // the positions in A's dtype, features contiguous
  keep.reserve(P.size());
  for (const auto& p : P) {
    at::Tensor q = p.to(A.scalar_type());
    keep.push_back(q.stride(2) == 1 ? q : q.contiguous());
  }
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "pair_gram_", [&] {
    std::vector<Position<scalar_t>> ps;
    for (const auto& q : keep) {
      ps.push_back({q.const_data_ptr<scalar_t>(), q.stride(0), q.stride(1)});
    }
    gram<scalar_t>(ps, M, N, O, accumulate, A.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CPU, m) { m.impl("pair_gram_", &pair_gram_cpu); }

}  // namespace fimfast
