// norm_terms on the CPU: the per-column, per-sample gradients of a norm's affine parameters,
// W[m, n, :] = sum_t G[m, n, t, :] * X[n, t, :] (weight) and B[m, n, :] = sum_t G[m, n, t, :]
// (bias), both in one pass over G, each row of X read once for every column m. With eps, X is
// a LayerNorm's input and each of its rows is normalised here first, (x - mean) / sqrt(var +
// eps) over D (no normalised copy of X is written)
// (fimfast/rules/norm.py has the use; fimfast/ops/norm_terms.py the torch reference).
// A G and an X whose positions t are contiguous instead (a channel norm's (N, C, *spatial)
// gradients seen as (M, N, T, D), D the channels) take one dot product along t per (m, n, d),
// each row of X read once for every column m (no normalisation: X comes normalised).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "cpu_math.h"

namespace fimfast {
namespace {

// w[d] += g[d] * (x[d] - mu) * rs, b[d] += g[d] (mu = 0, rs = 1: x as it is)
template <typename T>
FIMFAST_INLINE void row_terms(const T* __restrict__ g, const T* __restrict__ x, T mu, T rs,
                              int64_t D, T* __restrict__ w, T* __restrict__ b) {
  for (int64_t d = 0; d < D; ++d) {
    w[d] += g[d] * ((x[d] - mu) * rs);
    b[d] += g[d];
  }
}

// the mean of row x and 1 / sqrt(var + eps), in T (vector reductions: the order of the sums is
// the compiler's)
// The sum is of x - x[0]: rows far from 0 (x = 100 + noise) would otherwise lose the mean to the
// rounding of a sum of |x| (24x the reference's error in float64 at D = 8); the differences are
// exact for entries within a factor 2 of x[0], and the mean is rounded once at the scale of x.
template <typename T>
FIMFAST_INLINE void moments(const T* __restrict__ x, int64_t D, double eps, T* mu, T* rs) {
  const T x0 = x[0];
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < D; ++d) sum += x[d] - x0;
  const T mean = x0 + sum / static_cast<T>(D);
  T var = 0;
#pragma omp simd reduction(+ : var)
  for (int64_t d = 0; d < D; ++d) var += (x[d] - mean) * (x[d] - mean);
  *mu = mean;
  *rs = static_cast<T>(1.0 / std::sqrt(static_cast<double>(var) / static_cast<double>(D) + eps));
}

// the terms of sample n for every column: W, B (M, N, D) contiguous and zero; eps: X's rows
// normalised
template <typename T>
FIMFAST_SIMD_CLONES void sample_terms(const T* g, int64_t gm, int64_t gt, const T* x, int64_t xt,
                                      int64_t M, int64_t N, int64_t T_, int64_t D, double eps,
                                      bool norm, T* w, T* b) {
  for (int64_t t = 0; t < T_; ++t) {
    const T* xr = x + t * xt;
    T mu = 0, rs = 1;
    if (norm) moments(xr, D, eps, &mu, &rs);
    for (int64_t m = 0; m < M; ++m) {
      row_terms(g + m * gm + t * gt, xr, mu, rs, D, w + m * N * D, b + m * N * D);
    }
  }
}

// G and X with a feature stride 1
template <typename T>
void terms(const at::Tensor& G, const at::Tensor& X, std::optional<double> eps, T* w, T* b) {
  const int64_t M = G.size(0), N = G.size(1), T_ = G.size(2), D = G.size(3);
  const int64_t gm = G.stride(0), gn = G.stride(1), gt = G.stride(2);
  const int64_t xn = X.stride(0), xt = X.stride(1);
  const T* g = G.const_data_ptr<T>();
  const T* x = X.const_data_ptr<T>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      sample_terms<T>(g + n * gn, gm, gt, x + n * xn, xt, M, N, T_, D, eps.value_or(0.0),
                      eps.has_value(), w + n * D, b + n * D);
    }
  });
}

// w = sum_t g[t] x[t], b = sum_t g[t] over a contiguous row of T_ positions: float sums of
// blocks of 256 (vector reductions) added up in double
template <typename T>
FIMFAST_INLINE void dot_terms(const T* __restrict__ g, const T* __restrict__ x, int64_t T_, T* w,
                              T* b) {
  double sw = 0, sb = 0;
  for (int64_t t0 = 0; t0 < T_; t0 += 256) {
    const int64_t t1 = t0 + 256 < T_ ? t0 + 256 : T_;
    T pw = 0, pb = 0;
#pragma omp simd reduction(+ : pw, pb)
    for (int64_t t = t0; t < t1; ++t) {
      pw += g[t] * x[t];
      pb += g[t];
    }
    sw += pw;
    sb += pb;
  }
  *w = static_cast<T>(sw);
  *b = static_cast<T>(sb);
}

// the terms of sample n for every column, G's and X's positions contiguous (stride 1 in t)
template <typename T>
FIMFAST_SIMD_CLONES void sample_dots(const T* g, int64_t gm, int64_t gd, const T* x, int64_t xd,
                                     int64_t M, int64_t N, int64_t T_, int64_t D, T* w, T* b) {
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t m = 0; m < M; ++m) {
      dot_terms(g + m * gm + d * gd, x + d * xd, T_, w + m * N * D + d, b + m * N * D + d);
    }
  }
}

template <typename T>
void dots(const at::Tensor& G, const at::Tensor& X, T* w, T* b) {
  const int64_t M = G.size(0), N = G.size(1), T_ = G.size(2), D = G.size(3);
  const int64_t gm = G.stride(0), gn = G.stride(1), gd = G.stride(3);
  const int64_t xn = X.stride(0), xd = X.stride(2);
  const T* g = G.const_data_ptr<T>();
  const T* x = X.const_data_ptr<T>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      sample_dots<T>(g + n * gn, gm, gd, x + n * xn, xd, M, N, T_, D, w + n * D, b + n * D);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> norm_terms_cpu(const at::Tensor& G, const at::Tensor& X,
                                                   std::optional<double> eps) {
  TORCH_CHECK(G.dim() == 4, "norm_terms: G must be 4-D (M, N, T, D); got shape ", G.sizes());
  TORCH_CHECK(X.dim() == 3, "norm_terms: X must be 3-D (N, T, D); got shape ", X.sizes());
  TORCH_CHECK(G.size(1) == X.size(0) && G.size(2) == X.size(1) && G.size(3) == X.size(2),
              "norm_terms: G (M, N, T, D) and X (N, T, D) must agree; got ", G.sizes(), " and ",
              X.sizes());
  TORCH_CHECK(G.scalar_type() == X.scalar_type() &&
                  (G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble),
              "norm_terms: G and X must both be float32 or both float64; got ", G.scalar_type(),
              " and ", X.scalar_type());
  TORCH_CHECK(G.device() == X.device(), "norm_terms: X must be on the device of G");
  const int64_t M = G.size(0), N = G.size(1), D = G.size(3);
  at::Tensor W = at::zeros({M, N, D}, G.options());
  at::Tensor B = at::zeros({M, N, D}, G.options());
  if (W.numel() == 0 || G.size(2) == 0) return {W, B};
  if (!eps.has_value() && G.stride(3) != 1 && G.stride(2) == 1 && X.stride(1) == 1) {
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "norm_terms", [&] {
      dots<scalar_t>(G, X, W.mutable_data_ptr<scalar_t>(), B.mutable_data_ptr<scalar_t>());
    });
    return {W, B};
  }
  const at::Tensor g = G.stride(3) == 1 ? G : G.contiguous();
  const at::Tensor x = X.stride(2) == 1 ? X : X.contiguous();
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "norm_terms", [&] {
    terms<scalar_t>(g, x, eps, W.mutable_data_ptr<scalar_t>(), B.mutable_data_ptr<scalar_t>());
  });
  return {W, B};
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CPU, m) { m.impl("norm_terms", &norm_terms_cpu); }

}  // namespace fimfast
