// accumulate_ on the GPU: multi-tensor s += alpha*g**2 (or the EMA), apex multi_tensor_apply
// style.
//
// The host packs up to kMaxTensors (state, grad, numel) triples of one dtype pair and a table of
// up to kMaxBlocks (tensor, chunk) pairs into the kernel's parameter struct (< 4 KiB); each block
// updates one chunk of kChunk elements. A call costs one launch per table, whatever the number of
// parameters.
#include <cuda_runtime.h>

#include <vector>

#include "cuda_common.cuh"
#include "fimfast_cuda.h"

namespace fimfast {
namespace cuda {
namespace {

constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 16384;
constexpr int kThreads = 512;

struct Table {
  void* state[kMaxTensors];
  const void* grad[kMaxTensors];
  int64_t numel[kMaxTensors];
  int tensor[kMaxBlocks];
  int chunk[kMaxBlocks];
};

template <typename s_t, typename g_t>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(Table tab, bool ema, s_t beta, s_t alpha) {
  const int t = tab.tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(tab.chunk[blockIdx.x]) * kChunk;
  const int64_t n = tab.numel[t];
  const int64_t end = start + kChunk < n ? start + kChunk : n;
  s_t* s = static_cast<s_t*>(tab.state[t]);
  const g_t* g = static_cast<const g_t*>(tab.grad[t]);
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    const s_t x = to_acc<s_t>(g[i]);
    s[i] = ema ? s[i] * beta + alpha * (x * x) : s[i] + alpha * (x * x);
  }
}

template <typename s_t, typename g_t>
cudaError_t run_group(const std::vector<const AccumulateItem*>& items, bool ema, double beta,
                      double alpha, cudaStream_t stream) {
  Table tab;
  int nt = 0, nb = 0;
  auto flush = [&]() -> cudaError_t {
    if (nb > 0) {
      accumulate_kernel<s_t, g_t><<<nb, kThreads, 0, stream>>>(
          tab, ema, static_cast<s_t>(beta), static_cast<s_t>(alpha));
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    nt = 0;
    nb = 0;
    return cudaSuccess;
  };
  for (const AccumulateItem* it : items) {
    const int64_t chunks = (it->numel + kChunk - 1) / kChunk;
    int64_t c = 0;
    while (c < chunks) {
      if (nt == kMaxTensors) {
        const cudaError_t err = flush();
        if (err != cudaSuccess) return err;
      }
      tab.state[nt] = it->state;
      tab.grad[nt] = it->grad;
      tab.numel[nt] = it->numel;
      for (; c < chunks && nb < kMaxBlocks; ++c, ++nb) {
        tab.tensor[nb] = nt;
        tab.chunk[nb] = static_cast<int>(c);
      }
      ++nt;
      if (nb == kMaxBlocks) {
        const cudaError_t err = flush();  // the tensor's remaining chunks go to the next table
        if (err != cudaSuccess) return err;
      }
    }
  }
  return flush();
}

template <typename s_t>
cudaError_t run_state(const std::vector<const AccumulateItem*>& items, DType gd, bool ema,
                      double beta, double alpha, cudaStream_t stream) {
  switch (gd) {
    case kF32:
      return run_group<s_t, float>(items, ema, beta, alpha, stream);
    case kF64:
      return run_group<s_t, double>(items, ema, beta, alpha, stream);
    case kF16:
      return run_group<s_t, __half>(items, ema, beta, alpha, stream);
    case kBF16:
      return run_group<s_t, __nv_bfloat16>(items, ema, beta, alpha, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t accumulate(const AccumulateItem* items, int64_t n_items, bool ema, double beta,
                       double alpha, cudaStream_t stream) {
  // group by (state dtype, grad dtype): one template instance per group
  for (int sd = 0; sd < 2; ++sd) {
    for (int gd = 0; gd < 4; ++gd) {
      std::vector<const AccumulateItem*> group;
      for (int64_t i = 0; i < n_items; ++i) {
        if (items[i].numel > 0 && items[i].state_dtype == sd && items[i].grad_dtype == gd) {
          group.push_back(&items[i]);
        }
      }
      if (group.empty()) continue;
      const cudaError_t err =
          sd == kF64 ? run_state<double>(group, static_cast<DType>(gd), ema, beta, alpha, stream)
                     : run_state<float>(group, static_cast<DType>(gd), ema, beta, alpha, stream);
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace fimfast
