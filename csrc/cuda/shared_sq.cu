// shared_sq on the GPU: sum_n (G_n^T A_n)**2 without writing the per-sample products.
//
// A block owns a 32x32 output tile (256 threads, 2x2 outputs each) and a slice of the samples;
// per sample it accumulates the tile of G_n^T A_n over the positions in shared-memory tiles of 16
// positions, then adds its square to the running sum in registers. Sample slices over blockIdx.z
// write partial tiles that the caller sums in a fixed order.
#include <cuda_runtime.h>

#include "cuda_common.cuh"
#include "fimfast_cuda.h"

namespace fimfast {
namespace cuda {
namespace {

constexpr int kBM = 32, kBN = 32, kBT = 16, kThreads = 256;

struct Strides3 {
  int64_t n, t, c;
};

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    shared_sq_kernel(const in_t* __restrict__ G, const in_t* __restrict__ A, Strides3 gs,
                     Strides3 as, int64_t N, int64_t T, int64_t O, int64_t I,
                     int64_t n_per_split, acc_t* __restrict__ out) {
  __shared__ acc_t Gt[kBT][kBM];
  __shared__ acc_t At[kBT][kBN];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t n_lo = static_cast<int64_t>(blockIdx.z) * n_per_split;
  const int64_t n_hi = n_lo + n_per_split < N ? n_lo + n_per_split : N;
  acc_t acc[2][2] = {};
  for (int64_t n = n_lo; n < n_hi; ++n) {
    acc_t per[2][2] = {};
    for (int64_t t0 = 0; t0 < T; t0 += kBT) {
      for (int e = threadIdx.x; e < kBT * kBM; e += kThreads) {
        const int kk = e / kBM, mm = e % kBM;
        const int64_t t = t0 + kk, o = o0 + mm, i = i0 + mm;
        Gt[kk][mm] = (t < T && o < O) ? to_acc<acc_t>(G[n * gs.n + t * gs.t + o * gs.c])
                                      : acc_t(0);
        At[kk][mm] = (t < T && i < I) ? to_acc<acc_t>(A[n * as.n + t * as.t + i * as.c])
                                      : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBT; ++kk) {
#pragma unroll
        for (int u = 0; u < 2; ++u) {
#pragma unroll
          for (int v = 0; v < 2; ++v) per[u][v] += Gt[kk][ty * 2 + u] * At[kk][tx * 2 + v];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
#pragma unroll
      for (int v = 0; v < 2; ++v) acc[u][v] += per[u][v] * per[u][v];
    }
  }
  acc_t* dst = out + static_cast<int64_t>(blockIdx.z) * O * I;
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int64_t o = o0 + ty * 2 + u;
    if (o >= O) continue;
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const int64_t i = i0 + tx * 2 + v;
      if (i < I) dst[o * I + i] = acc[u][v];
    }
  }
}

template <typename in_t, typename acc_t>
cudaError_t launch(const void* G, const void* A, const int64_t* g_strides,
                   const int64_t* a_strides, int64_t N, int64_t T, int64_t O, int64_t I,
                   int64_t splits, void* out, cudaStream_t stream) {
  if (O == 0 || I == 0) return cudaSuccess;
  const int64_t per = (N + splits - 1) / splits;
  dim3 grid(static_cast<unsigned>((I + kBN - 1) / kBN), static_cast<unsigned>((O + kBM - 1) / kBM),
            static_cast<unsigned>(splits));
  const Strides3 gs{g_strides[0], g_strides[1], g_strides[2]};
  const Strides3 as{a_strides[0], a_strides[1], a_strides[2]};
  shared_sq_kernel<in_t, acc_t><<<grid, kThreads, 0, stream>>>(
      static_cast<const in_t*>(G), static_cast<const in_t*>(A), gs, as, N, T, O, I, per,
      static_cast<acc_t*>(out));
  return cudaGetLastError();
}

}  // namespace

int64_t shared_splits(int64_t N, int64_t O, int64_t I, int sm_count) {
  const int64_t tiles = ((O + kBM - 1) / kBM) * ((I + kBN - 1) / kBN);
  int64_t s = (2 * static_cast<int64_t>(sm_count)) / (tiles > 0 ? tiles : 1);
  s = s < N ? s : N;
  s = s < 65535 ? s : 65535;
  return s > 1 ? s : 1;
}

cudaError_t shared_sq(const void* G, const void* A, DType dtype, const int64_t* g_strides,
                      const int64_t* a_strides, int64_t N, int64_t T, int64_t O, int64_t I,
                      bool f64, int64_t splits, void* out, cudaStream_t stream) {
  if (f64) {
    if (dtype != kF64) return cudaErrorInvalidValue;
    return launch<double, double>(G, A, g_strides, a_strides, N, T, O, I, splits, out, stream);
  }
  switch (dtype) {
    case kF32:
      return launch<float, float>(G, A, g_strides, a_strides, N, T, O, I, splits, out, stream);
    case kF16:
      return launch<__half, float>(G, A, g_strides, a_strides, N, T, O, I, splits, out, stream);
    case kBF16:
      return launch<__nv_bfloat16, float>(G, A, g_strides, a_strides, N, T, O, I, splits, out,
                                           stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fimfast
