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
  ProbeArgs a;
  a.mode = checks::check_probe_logit_grad(logits, mode, num_probes);
  // CUDA labels or eigenpairs send a call here whatever the device of the logits
  TORCH_CHECK(logits.is_cuda(),
              "probe_logit_grad: logits must be on a CUDA device when labels or eig are; got ",
              logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  a.R = logits.size(0);
  a.C = logits.size(1);
  a.S = num_probes;
  a.K = 0;
  a.offset = static_cast<uint64_t>(offset);
  a.sign_keys = rng::make_keys(static_cast<uint64_t>(seed), rng::kStreamSign);
  a.unif_keys = rng::make_keys(static_cast<uint64_t>(seed), rng::kStreamUniform);
  a.sigma2 = sigma2;
  const bool f64 = logits.scalar_type() == at::kDouble;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({a.S, a.R, a.C}, logits.options().dtype(acc));
  if (out.numel() == 0) return out;
  at::Tensor lab, lam_c, vec_c;
  if (a.mode == ProbeMode::kEmpirical) {
    checks::check_probe_labels_given(labels);
    lab = labels->to(logits.device(), at::kLong).contiguous();
    checks::check_probe_labels(lab, a.R, a.C);
  }
  if (a.mode == ProbeMode::kRankk) {
    a.K = checks::check_probe_eig(lam, vec, a.R, a.C);
    lam_c = lam->to(logits.device(), acc).contiguous();
    vec_c = vec->to(logits.device(), acc).contiguous();
  }
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
