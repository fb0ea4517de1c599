// shared_sq of float32 inputs in one pass on AVX-512 CPUs (csrc/cpu/shared_sq_fused.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace fimfast {
namespace cpu {

// out (O, I) float32, contiguous, <- sum_n (G_n^T A_n)**2 for G (N, T, O) and A (N, T, I)
// float32 of at most 32 positions, each per-sample product held in registers; false (out
// untouched) where this CPU, build, dtype, layout or shape is not one the kernel takes (or one
// where the batched GEMM is faster).
bool shared_sq_fused(const at::Tensor& G, const at::Tensor& A, at::Tensor& out);

}  // namespace cpu
}  // namespace fimfast
