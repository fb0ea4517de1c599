// core_topk on CUDA: the torch binding of csrc/cuda/core_topk.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "binding_common.h"
#include "fimfast_checks.h"
#include "fimfast_cuda.h"

namespace fimfast {
namespace {

std::tuple<at::Tensor, at::Tensor> core_topk_cuda(const at::Tensor& p_in, int64_t k,
                                                   c10::string_view solver, int64_t iters) {
  const bool power = checks::check_core_topk(p_in, k, solver);
  const int64_t R = p_in.size(0), C = p_in.size(1);
  const c10::cuda::CUDAGuard guard(p_in.device());
  const bool f64 = p_in.scalar_type() == at::kDouble;
  const at::Tensor p = p_in.to(f64 ? at::kDouble : at::kFloat).contiguous();
  at::Tensor lam = at::empty({R, k}, p.options());
  at::Tensor vec = at::empty({R, k, C}, p.options());
  binding::check_cuda(cuda::core_topk(p.const_data_ptr(), f64, R, C, k, power, iters,
                                      lam.mutable_data_ptr(), vec.mutable_data_ptr(),
                                      binding::stream_of(p)),
                      "core_topk");
  return {lam, vec};
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CUDA, m) { m.impl("core_topk", &core_topk_cuda); }

}  // namespace fimfast
