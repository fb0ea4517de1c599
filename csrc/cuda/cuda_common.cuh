// Device helpers shared by the CUDA kernels: conversions and deterministic block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace fimfast {
namespace cuda {

template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(float x) { return static_cast<acc_t>(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(double x) { return static_cast<acc_t>(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__half x) { return static_cast<acc_t>(__half2float(x)); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__nv_bfloat16 x) {
  return static_cast<acc_t>(__bfloat162float(x));
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? a : b; }
};

// Every thread of the block gets op over all threads' v. blockDim.x must be a multiple of 32
// (<= 1024); scratch holds 32 T. The combination order is fixed (deterministic results).
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // the previous reduction has read scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int nw = blockDim.x >> 5;
  T acc = scratch[0];
  for (int w = 1; w < nw; ++w) acc = op(acc, scratch[w]);
  return acc;
}

// Exclusive prefix sum of v over the threads of the block (thread order); scratch holds 32 T.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T inc = v;
  for (int o = 1; o < 32; o <<= 1) {
    const T up = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += up;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = inc;
  __syncthreads();
  T before = T(0);
  for (int w = 0; w < warp; ++w) before += scratch[w];
  return before + inc - v;
}

inline int threads_for(int64_t C) {
  if (C <= 1024) return 128;
  if (C <= 4096) return 256;
  if (C <= 16384) return 512;
  return 1024;
}

}  // namespace cuda
}  // namespace fimfast
