// shared_sq on the CPU: sum_n (G_n^T A_n)**2 over chunks of samples.
//
// Each chunk's per-sample products come from one batched GEMM (torch's BLAS) into a reused
// buffer; their squares are summed into the output in one fused parallel pass (the reference
// allocates per*per and a reduction temporary for every chunk). Float32 inputs on an AVX-512 CPU
// take the fused kernel of csrc/cpu/shared_sq_fused.cpp instead, where its shape allows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "cpu_math.h"
#include "fimfast_checks.h"
#include "shared_sq_fused.h"

namespace fimfast {
namespace {

// out[b0:b1] += sum_s per[s, b0:b1]**2 (one block of outputs, in cache across the samples)
template <typename T>
FIMFAST_INLINE void add_squares_block(const T* __restrict__ per, int64_t n, int64_t e, int64_t b0,
                                      int64_t b1, T* __restrict__ out) {
  for (int64_t s = 0; s < n; ++s) {
    const T* __restrict__ ps = per + s * e;
    for (int64_t i = b0; i < b1; ++i) out[i] += ps[i] * ps[i];
  }
}

FIMFAST_SIMD_CLONES void add_squares_f(const float* per, int64_t n, int64_t e, int64_t b0,
                                       int64_t b1, float* out) {
  add_squares_block(per, n, e, b0, b1, out);
}

FIMFAST_SIMD_CLONES void add_squares_d(const double* per, int64_t n, int64_t e, int64_t b0,
                                       int64_t b1, double* out) {
  add_squares_block(per, n, e, b0, b1, out);
}

template <typename T>
void add_squares(const T* per, int64_t n, int64_t e, T* out) {
  // out[i] += sum_s per[s, i]**2, parallel over i (each output written by one thread: no races,
  // and the summation order over s is fixed); blocks of 4 KiB of outputs stay in L1 while every
  // sample's slice is added (one pass over the whole output per sample left L1 at 48 KiB)
  constexpr int64_t kBlock = 4096 / sizeof(T);
  at::parallel_for(0, e, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t b = i0; b < i1; b += kBlock) {
      const int64_t b1 = std::min(b + kBlock, i1);
      if constexpr (std::is_same_v<T, double>) {
        add_squares_d(per, n, e, b, b1, out);
      } else {
        add_squares_f(per, n, e, b, b1, out);
      }
    }
  });
}

at::Tensor shared_sq_cpu(const at::Tensor& G, const at::Tensor& A) {
  checks::check_shared_sq(G, A);
  const int64_t N = G.size(0), O = G.size(2), I = A.size(2);
  const auto dt = (G.scalar_type() == at::kDouble || A.scalar_type() == at::kDouble)
                      ? at::kDouble
                      : at::kFloat;
  at::Tensor out = at::zeros({O, I}, G.options().dtype(dt));
  if (N == 0 || O == 0 || I == 0) return out;
  if (cpu::shared_sq_fused(G, A, out)) return out;  // float32 on AVX-512: one fused pass
  const int64_t esize = dt == at::kDouble ? 8 : 4;
  // per-sample products a few MiB at a time: the buffer stays in cache between the GEMM that
  // writes it and the pass that squares it, and is reused (a whole-batch buffer costs more in
  // page faults of fresh memory than the GEMM: 20 vs 13 ms for 64 x (320 x 400) products)
  const int64_t chunk = std::clamp<int64_t>((int64_t(4) << 20) / (esize * O * I), 1, N);
  at::Tensor buf = at::empty({chunk, O, I}, out.options());
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t n = std::min(chunk, N - n0);
    at::Tensor per = buf.narrow(0, 0, n);
    at::bmm_out(per, G.narrow(0, n0, n).to(dt).transpose(1, 2), A.narrow(0, n0, n).to(dt));
    if (dt == at::kDouble) {
      add_squares(per.const_data_ptr<double>(), n, O * I, out.mutable_data_ptr<double>());
    } else {
      add_squares(per.const_data_ptr<float>(), n, O * I, out.mutable_data_ptr<float>());
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CPU, m) { m.impl("shared_sq", &shared_sq_cpu); }

}  // namespace fimfast
