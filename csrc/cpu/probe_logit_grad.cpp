// probe_logit_grad on the CPU: one pass over each logit row, one write of dz.
//
// Rows are split over threads with at::parallel_for; each row computes its softmax into a
// thread-local buffer, then writes the S probes. Signs come one hash per 32 consecutive counters
// (fimfast_rng.h). The row kernels (probe_logit_grad_kernel.h) are compiled twice, for the x86-64
// baseline and for AVX2+FMA, and chosen at run time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_math.h"
#include "fimfast_checks.h"
#include "fimfast_rng.h"
#include "probe_logit_grad.h"
#include "probe_modes.h"

namespace fimfast {
namespace cpu_base {
#include "probe_logit_grad_kernel.h"
}  // namespace cpu_base
}  // namespace fimfast

#ifdef FIMFAST_AVX2_COPY
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace fimfast {
namespace cpu_avx2 {
#include "probe_logit_grad_kernel.h"
}  // namespace cpu_avx2
}  // namespace fimfast
#pragma GCC pop_options
#endif

namespace fimfast {
namespace {

template <typename acc_t, typename in_t>
void probe_rows(const ProbeArgs& a, const in_t* logits, int64_t row_stride, int64_t col_stride,
                const int64_t* labels, const acc_t* lam, const acc_t* vec, acc_t* out) {
  // ~64K outputs per task: enough work to amortise waking a thread, small enough to balance
  // 2-64 threads at the sizes that matter (512 x 8192: 64 tasks)
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(a.C * a.S, 1));
  const bool avx2 = cpu::has_avx2();
  at::parallel_for(0, a.R, grain, [&](int64_t r0, int64_t r1) {
#ifdef FIMFAST_AVX2_COPY
    if (avx2) {
      cpu_avx2::probe_row_range<acc_t, in_t>(a, logits, row_stride, col_stride, labels, lam, vec,
                                             out, r0, r1);
      return;
    }
#endif
    (void)avx2;
    cpu_base::probe_row_range<acc_t, in_t>(a, logits, row_stride, col_stride, labels, lam, vec,
                                           out, r0, r1);
  });
}

}  // namespace

at::Tensor probe_logit_grad_cpu(const at::Tensor& logits, c10::string_view mode, int64_t seed,
                                int64_t offset, int64_t num_probes,
                                const std::optional<at::Tensor>& labels,
                                const std::optional<at::Tensor>& lam,
                                const std::optional<at::Tensor>& vec, double sigma2) {
  checks::ProbeCall call = checks::prepare_probe_logit_grad(logits, mode, seed, offset,
                                                             num_probes, labels, lam, vec, sigma2);
  const ProbeArgs& a = call.args;
  at::Tensor out = call.out;
  if (out.numel() == 0) return out;
  const at::Tensor &lab = call.labels, &lam_c = call.lam, &vec_c = call.vec;
  at::Tensor z = logits;
  if (z.stride(1) != 1 && z.size(1) > 1 && a.mode != ProbeMode::kRankk &&
      a.mode != ProbeMode::kGaussian) {
    // a transposed view is gathered once: the row loops want unit column stride
    z = z.contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, z.scalar_type(), "probe_logit_grad", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        probe_rows<acc_t, scalar_t>(
            a, z.const_data_ptr<scalar_t>(), z.stride(0), z.stride(1),
            lab.defined() ? lab.const_data_ptr<int64_t>() : nullptr,
            lam_c.defined() ? lam_c.const_data_ptr<acc_t>() : nullptr,
            vec_c.defined() ? vec_c.const_data_ptr<acc_t>() : nullptr,
            out.mutable_data_ptr<acc_t>());
      });
  return out;
}

TORCH_LIBRARY_IMPL(fimfast, CPU, m) { m.impl("probe_logit_grad", &probe_logit_grad_cpu); }

}  // namespace fimfast
