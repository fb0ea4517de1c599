// probe_logit_grad on CUDA: the torch binding of csrc/cuda/probe_logit_grad.cu.
//
// Checks the arguments (fimfast_checks.h, as the CPU kernel), moves labels and eigenpairs to the
// device of the logits and launches the kernel on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "binding_common.h"
#include "fimfast_checks.h"
#include "fimfast_cuda.h"
#include "fimfast_rng.h"
#include "probe_modes.h"

namespace fimfast {
namespace {

at::Tensor probe_logit_grad_cuda(const at::Tensor& logits, c10::string_view mode, int64_t seed,
                                 int64_t offset, int64_t num_probes,
                                 const std::optional<at::Tensor>& labels,
                                 const std::optional<at::Tensor>& lam,
                                 const std::optional<at::Tensor>& vec, double sigma2) {
  // CUDA labels or eigenpairs send a call here whatever the device of the logits
  TORCH_CHECK(logits.is_cuda(),
              "probe_logit_grad: logits must be on a CUDA device when labels or eig are; got ",
              logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  checks::ProbeCall call = checks::prepare_probe_logit_grad(logits, mode, seed, offset,
                                                             num_probes, labels, lam, vec, sigma2);
  const ProbeArgs& a = call.args;
  at::Tensor out = call.out;
  if (out.numel() == 0) return out;
  const bool f64 = logits.scalar_type() == at::kDouble;
  const at::Tensor &lab = call.labels, &lam_c = call.lam, &vec_c = call.vec;
  binding::check_cuda(
      cuda::probe_logit_grad(logits.const_data_ptr(), binding::dtype_of(logits, "logits"),
                             logits.stride(0), logits.stride(1),
                             lab.defined() ? lab.const_data_ptr<int64_t>() : nullptr,
                             lam_c.defined() ? lam_c.const_data_ptr() : nullptr,
                             vec_c.defined() ? vec_c.const_data_ptr() : nullptr,
                             1.0 / std::sqrt(sigma2), out.mutable_data_ptr(), f64, a,
                             binding::stream_of(logits)),
      "probe_logit_grad");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CUDA, m) { m.impl("probe_logit_grad", &probe_logit_grad_cuda); }

}  // namespace fimfast
