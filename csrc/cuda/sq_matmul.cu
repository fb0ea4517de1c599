// sq_matmul on the GPU: (g*g)^T (a*a) as a tiled GEMM with the squares taken in the tile loads.
//
// A block computes a 64x64 output tile (256 threads, 4x4 outputs each) over a slice of the
// samples; tiles of 16 samples of g (transposed) and a are widened, squared and staged in shared
// memory. When the output has few tiles the samples are split over blockIdx.z and the partial
// tiles are summed by the caller in a fixed order (no atomics: deterministic).
#include <cuda_runtime.h>

#include "cuda_common.cuh"
#include "fimfast_cuda.h"

namespace fimfast {
namespace cuda {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sq_matmul_kernel(const in_t* __restrict__ g, const in_t* __restrict__ a, int64_t g_sn,
                     int64_t g_so, int64_t a_sn, int64_t a_si, int64_t N, int64_t O, int64_t I,
                     int64_t n_per_split, acc_t* __restrict__ out) {
  __shared__ acc_t Gs[kBK][kBM];
  __shared__ acc_t As[kBK][kBN];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t n_lo = static_cast<int64_t>(blockIdx.z) * n_per_split;
  const int64_t n_hi = n_lo + n_per_split < N ? n_lo + n_per_split : N;
  acc_t acc[4][4] = {};
  for (int64_t n0 = n_lo; n0 < n_hi; n0 += kBK) {
    for (int e = threadIdx.x; e < kBK * kBM; e += kThreads) {
      const int kk = e / kBM, mm = e % kBM;
      const int64_t n = n0 + kk, o = o0 + mm, i = i0 + mm;
      const acc_t gv = (n < n_hi && o < O) ? to_acc<acc_t>(g[n * g_sn + o * g_so]) : acc_t(0);
      const acc_t av = (n < n_hi && i < I) ? to_acc<acc_t>(a[n * a_sn + i * a_si]) : acc_t(0);
      Gs[kk][mm] = gv * gv;
      As[kk][mm] = av * av;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      acc_t gr[4], ar[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        gr[t] = Gs[kk][ty * 4 + t];
        ar[t] = As[kk][tx * 4 + t];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int t = 0; t < 4; ++t) acc[u][t] += gr[u] * ar[t];
      }
    }
    __syncthreads();
  }
  acc_t* dst = out + static_cast<int64_t>(blockIdx.z) * O * I;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t o = o0 + ty * 4 + u;
    if (o >= O) continue;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int64_t i = i0 + tx * 4 + t;
      if (i < I) dst[o * I + i] = acc[u][t];
    }
  }
}

template <typename in_t, typename acc_t>
cudaError_t launch(const void* g, const void* a, int64_t g_sn, int64_t g_so, int64_t a_sn,
                   int64_t a_si, int64_t N, int64_t O, int64_t I, int64_t splits, void* out,
                   cudaStream_t stream) {
  if (O == 0 || I == 0) return cudaSuccess;
  const int64_t per = (N + splits - 1) / splits;
  dim3 grid(static_cast<unsigned>((I + kBN - 1) / kBN), static_cast<unsigned>((O + kBM - 1) / kBM),
            static_cast<unsigned>(splits));
  sq_matmul_kernel<in_t, acc_t><<<grid, kThreads, 0, stream>>>(
      static_cast<const in_t*>(g), static_cast<const in_t*>(a), g_sn, g_so, a_sn, a_si, N, O, I,
      per, static_cast<acc_t*>(out));
  return cudaGetLastError();
}

}  // namespace

int64_t sq_splits(int64_t N, int64_t O, int64_t I, bool /*f64*/, int sm_count) {
  const int64_t tiles = ((O + kBM - 1) / kBM) * ((I + kBN - 1) / kBN);
  int64_t s = (2 * static_cast<int64_t>(sm_count)) / (tiles > 0 ? tiles : 1);
  const int64_t max_s = (N + 4 * kBK - 1) / (4 * kBK);  // at least 64 samples per slice
  s = s < max_s ? s : max_s;
  s = s < 65535 ? s : 65535;
  return s > 1 ? s : 1;
}

cudaError_t sq_matmul(const void* g, const void* a, DType dtype, int64_t g_sn, int64_t g_so,
                      int64_t a_sn, int64_t a_si, int64_t N, int64_t O, int64_t I, bool f64,
                      int64_t splits, void* out, cudaStream_t stream) {
  if (f64) {
    if (dtype != kF64) return cudaErrorInvalidValue;
    return launch<double, double>(g, a, g_sn, g_so, a_sn, a_si, N, O, I, splits, out, stream);
  }
  switch (dtype) {
    case kF32:
      return launch<float, float>(g, a, g_sn, g_so, a_sn, a_si, N, O, I, splits, out, stream);
    case kF16:
      return launch<__half, float>(g, a, g_sn, g_so, a_sn, a_si, N, O, I, splits, out, stream);
    case kBF16:
      return launch<__nv_bfloat16, float>(g, a, g_sn, g_so, a_sn, a_si, N, O, I, splits, out,
                                           stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fimfast
