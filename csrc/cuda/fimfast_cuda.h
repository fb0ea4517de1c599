// Launchers of the CUDA kernels (csrc/cuda/*.cu): plain C++ on raw pointers, sizes and a stream.
//
// This header is shared by the .cu files (nvcc, CUDA headers only) and by the torch bindings
// (*_binding.cpp, host compiler, built only against a CUDA torch). Inputs are typed by DType;
// outputs are float32 (f64 == false) or float64 (f64 == true) and contiguous.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "probe_modes.h"

namespace fimfast {
namespace cuda {

enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// dz (S, R, C) of probe_logit_grad. logits (R, C) strided; labels (R,) int64 (empirical);
// lam (R, K) and vec (R, K, C) contiguous in the output dtype (rankk).
cudaError_t probe_logit_grad(const void* logits, DType dtype, int64_t stride_r, int64_t stride_c,
                             const int64_t* labels, const void* lam, const void* vec,
                             double inv_sigma, void* out, bool f64, const ProbeArgs& args,
                             cudaStream_t stream);

// lam (R, k) and vec (R, k, C) of core_topk; p (R, C) contiguous in the output dtype.
cudaError_t core_topk(const void* p, bool f64, int64_t R, int64_t C, int64_t k, bool power,
                      int64_t iters, void* lam, void* vec, cudaStream_t stream);

// Number of sample slices the squared-product kernels split N into for an (O, I) output, so that
// the grid fills `sm_count` multiprocessors; their partial outputs are summed by the caller.
int64_t sq_splits(int64_t N, int64_t O, int64_t I, bool f64, int sm_count);

// out (splits, O, I) partial sums of (g*g)^T (a*a); g (N, O) and a (N, I) strided, same dtype.
cudaError_t sq_matmul(const void* g, const void* a, DType dtype, int64_t g_sn, int64_t g_so,
                      int64_t a_sn, int64_t a_si, int64_t N, int64_t O, int64_t I, bool f64,
                      int64_t splits, void* out, cudaStream_t stream);

// Sample slices of shared_sq (its tiles are 32x32, a slice may be a single sample).
int64_t shared_splits(int64_t N, int64_t O, int64_t I, int sm_count);

// out (splits, O, I) partial sums of sum_n (G_n^T A_n)**2; G (N, T, O), A (N, T, I) strided.
cudaError_t shared_sq(const void* G, const void* A, DType dtype, const int64_t* g_strides,
                      const int64_t* a_strides, int64_t N, int64_t T, int64_t O, int64_t I,
                      bool f64, int64_t splits, void* out, cudaStream_t stream);

// One tensor pair of accumulate_: state (float32/float64) and grad, contiguous, numel elements.
struct AccumulateItem {
  void* state;
  const void* grad;
  int64_t numel;
  DType state_dtype;
  DType grad_dtype;
};

// s = s + alpha*g**2 (ema: s = beta*s + alpha*g**2) for every item, in multi-tensor launches.
cudaError_t accumulate(const AccumulateItem* items, int64_t n_items, bool ema, double beta,
                       double alpha, cudaStream_t stream);

}  // namespace cuda
}  // namespace fimfast
