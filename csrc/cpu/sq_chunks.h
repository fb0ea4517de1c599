// Helpers shared by the squared-product CPU ops: widen-and-square a 2-D block in one pass.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <type_traits>

#include "cpu_math.h"

namespace fimfast {
namespace cpu {

// d[0:m] = s[0:m] ** 2 for contiguous rows of one dtype, multiversioned (FIMFAST_SIMD_CLONES)
template <typename T>
FIMFAST_INLINE void square_run(const T* __restrict__ s, int64_t m, T* __restrict__ d) {
  for (int64_t c = 0; c < m; ++c) d[c] = s[c] * s[c];
}

FIMFAST_SIMD_CLONES static void square_run_f(const float* s, int64_t m, float* d) {
  square_run(s, m, d);
}

FIMFAST_SIMD_CLONES static void square_run_d(const double* s, int64_t m, double* d) {
  square_run(s, m, d);
}

// dst (n, m) contiguous float/double <- src (n, m) ** 2, src any floating dtype and strides
inline void square_rows_into(const at::Tensor& src, at::Tensor& dst) {
  const int64_t n = src.size(0), m = src.size(1);
  const int64_t s0 = src.stride(0), s1 = src.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "square_rows", [&] {
    using in_t = scalar_t;
    const in_t* sp = src.const_data_ptr<in_t>();
    auto body = [&](auto zero) {
      using out_t = decltype(zero);
      out_t* dp = dst.mutable_data_ptr<out_t>();
      at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(m, 1)),
                       [&](int64_t r0, int64_t r1) {
                         for (int64_t r = r0; r < r1; ++r) {
                           const in_t* s = sp + r * s0;
                           out_t* d = dp + r * m;
                           if constexpr (std::is_same_v<in_t, out_t> &&
                                         std::is_same_v<in_t, float>) {
                             if (s1 == 1) {
                               square_run_f(s, m, d);
                               continue;
                             }
                           } else if constexpr (std::is_same_v<in_t, out_t> &&
                                                std::is_same_v<in_t, double>) {
                             if (s1 == 1) {
                               square_run_d(s, m, d);
                               continue;
                             }
                           }
                           if (s1 == 1) {
                             for (int64_t c = 0; c < m; ++c) {
                               const out_t x = static_cast<out_t>(s[c]);
                               d[c] = x * x;
                             }
                           } else {
                             for (int64_t c = 0; c < m; ++c) {
                               const out_t x = static_cast<out_t>(s[c * s1]);
                               d[c] = x * x;
                             }
                           }
                         }
                       });
    };
    if (dst.scalar_type() == at::kDouble) {
      body(double(0));
    } else {
      body(float(0));
    }
  });
}

}  // namespace cpu
}  // namespace fimfast
