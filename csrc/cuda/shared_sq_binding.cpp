// shared_sq on CUDA: the torch binding of csrc/cuda/shared_sq.cu.
//
// The kernel writes one partial (O, I) sum per slice of samples; the slices are summed here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "binding_common.h"
#include "fimfast_checks.h"
#include "fimfast_cuda.h"

namespace fimfast {
namespace {

at::Tensor shared_sq_cuda(const at::Tensor& G_in, const at::Tensor& A_in) {
  checks::check_shared_sq(G_in, A_in);
  const c10::cuda::CUDAGuard guard(G_in.device());
  const auto in_dt = binding::common_input_dtype(G_in, A_in);
  const at::Tensor G = G_in.to(in_dt), A = A_in.to(in_dt);
  const int64_t N = G.size(0), T = G.size(1), O = G.size(2), I = A.size(2);
  const bool f64 = in_dt == at::kDouble;
  const auto opts = G.options().dtype(f64 ? at::kDouble : at::kFloat);
  if (N == 0 || O == 0 || I == 0) return at::zeros({O, I}, opts);
  const int64_t splits = cuda::shared_splits(N, O, I, binding::sm_count(G));
  at::Tensor out = at::empty({splits, O, I}, opts);
  const int64_t gs[3] = {G.stride(0), G.stride(1), G.stride(2)};
  const int64_t as[3] = {A.stride(0), A.stride(1), A.stride(2)};
  binding::check_cuda(
      cuda::shared_sq(G.const_data_ptr(), A.const_data_ptr(), binding::dtype_of(G, "G"), gs, as,
                      N, T, O, I, f64, splits, out.mutable_data_ptr(), binding::stream_of(G)),
      "shared_sq");
  return splits == 1 ? out.select(0, 0) : out.sum(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CUDA, m) { m.impl("shared_sq", &shared_sq_cuda); }

}  // namespace fimfast
