// accumulate_ on CUDA: the torch binding of csrc/cuda/accumulate.cu.
//
// All pairs are checked first (fimfast_checks.h: a bad pair leaves every state untouched), then
// go to the kernel's multi-tensor launches; non-contiguous states are updated through contiguous
// copies that are written back.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "binding_common.h"
#include "fimfast_checks.h"
#include "fimfast_cuda.h"

namespace fimfast {
namespace {

void accumulate_cuda_(at::TensorList states, at::TensorList grads, c10::string_view mode,
                      double beta, double scale) {
  const bool ema = checks::check_accumulate(states, grads, mode);
  if (states.empty()) return;
  const c10::cuda::CUDAGuard guard(states[0].device());
  std::vector<at::Tensor> keep;  // contiguous copies, alive until the launches are queued
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
  std::vector<cuda::AccumulateItem> items;
  for (size_t i = 0; i < states.size(); ++i) {
    const at::Tensor& s = states[i];
    const at::Tensor& g = grads[i];
    if (s.numel() == 0) continue;
    at::Tensor sc = s.is_contiguous() ? s : s.contiguous();
    if (!s.is_contiguous()) copy_back.emplace_back(s, sc);
    at::Tensor gc = g.contiguous();
    items.push_back({sc.mutable_data_ptr(), gc.const_data_ptr(), s.numel(),
                     binding::dtype_of(sc, "states"), binding::dtype_of(gc, "grads")});
    keep.push_back(sc);
    keep.push_back(gc);
  }
  const double alpha = ema ? (1.0 - beta) * scale : scale;
  binding::check_cuda(cuda::accumulate(items.data(), static_cast<int64_t>(items.size()), ema,
                                       beta, alpha, binding::stream_of(states[0])),
                      "accumulate_");
  for (auto& [dst, src] : copy_back) dst.copy_(src);
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CUDA, m) { m.impl("accumulate_", &accumulate_cuda_); }

}  // namespace fimfast
