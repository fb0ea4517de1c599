// sq_matmul on CUDA: the torch binding of csrc/cuda/sq_matmul.cu.
//
// The kernel writes one partial (O, I) sum per slice of samples (enough slices to fill the
// multiprocessors); the slices are summed here.
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

at::Tensor sq_matmul_cuda(const at::Tensor& g_in, const at::Tensor& a_in) {
  checks::check_sq_matmul(g_in, a_in);
  const c10::cuda::CUDAGuard guard(g_in.device());
  const auto in_dt = binding::common_input_dtype(g_in, a_in);
  const at::Tensor g = g_in.to(in_dt), a = a_in.to(in_dt);
  const int64_t N = g.size(0), O = g.size(1), I = a.size(1);
  const bool f64 = in_dt == at::kDouble;
  const auto opts = g.options().dtype(f64 ? at::kDouble : at::kFloat);
  if (N == 0 || O == 0 || I == 0) return at::zeros({O, I}, opts);
  const int64_t splits = cuda::sq_splits(N, O, I, f64, binding::sm_count(g));
  at::Tensor out = at::empty({splits, O, I}, opts);
  binding::check_cuda(
      cuda::sq_matmul(g.const_data_ptr(), a.const_data_ptr(), binding::dtype_of(g, "g"),
                      g.stride(0), g.stride(1), a.stride(0), a.stride(1), N, O, I, f64, splits,
                      out.mutable_data_ptr(), binding::stream_of(g)),
      "sq_matmul");
  return splits == 1 ? out.select(0, 0) : out.sum(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CUDA, m) { m.impl("sq_matmul", &sq_matmul_cuda); }

}  // namespace fimfast
