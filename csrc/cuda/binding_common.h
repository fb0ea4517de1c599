// Helpers of the torch bindings of the CUDA kernels (csrc/cuda/<op>_binding.cpp): dtype tags,
// CUDA errors, the current stream, the multiprocessor count.
//
// Host code built only against a CUDA torch (WITH_CUDA); the argument checks themselves are
// csrc/include/fimfast_checks.h, shared with the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "fimfast_cuda.h"

namespace fimfast {
namespace binding {

// the launchers' tag of a tensor's dtype (checked beforehand by fimfast_checks.h)
inline cuda::DType dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::kF32;
    case at::kDouble:
      return cuda::kF64;
    case at::kHalf:
      return cuda::kF16;
    case at::kBFloat16:
      return cuda::kBF16;
    default:
      TORCH_CHECK(false, what, " must be float16, bfloat16, float32 or float64; got ",
                  t.scalar_type());
  }
}

inline void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

inline int sm_count(const at::Tensor& t) {
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.device().index()),
             "cudaDeviceGetAttribute");
  return n;
}

// the dtype both inputs of a squared product are read in: the wider of the two (fp32 when two
// different 16-bit types meet), so one kernel instance serves every pair
inline at::ScalarType common_input_dtype(const at::Tensor& x, const at::Tensor& y) {
  if (x.scalar_type() == at::kDouble || y.scalar_type() == at::kDouble) return at::kDouble;
  if (x.scalar_type() == y.scalar_type()) return x.scalar_type();
  return at::kFloat;
}

}  // namespace binding
}  // namespace fimfast
