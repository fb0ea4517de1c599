// sq_matmul on the CPU: sum_n g[n]**2 (x) a[n]**2 = (g*g)^T (a*a).
//
// The products run in the BLAS that torch links (a hand-written loop does not come close); the
// kernel's part is to square (and widen bf16/fp16 to fp32) in one pass, chunk by chunk of samples,
// so the squared copies never exceed a fixed budget, where the reference widens and squares the
// whole inputs (four temporaries the size of g and a for bf16 inputs).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "fimfast_checks.h"
#include "sq_chunks.h"

namespace fimfast {
namespace {

at::Tensor sq_matmul_cpu(const at::Tensor& g, const at::Tensor& a) {
  checks::check_sq_matmul(g, a);
  const int64_t N = g.size(0), O = g.size(1), I = a.size(1);
  const auto dt = (g.scalar_type() == at::kDouble || a.scalar_type() == at::kDouble)
                      ? at::kDouble
                      : at::kFloat;
  const auto opts = g.options().dtype(dt);
  if (N == 0 || O == 0 || I == 0) return at::zeros({O, I}, opts);
  const int64_t esize = dt == at::kDouble ? 8 : 4;
  // 32 MiB of squared rows per chunk: big enough for full-speed GEMMs, bounded whatever N is
  const int64_t rows = std::clamp<int64_t>((int64_t(32) << 20) / (esize * (O + I)), 1, N);
  at::Tensor gs = at::empty({rows, O}, opts), as = at::empty({rows, I}, opts);
  at::Tensor out;
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n = std::min(rows, N - n0);
    at::Tensor gsq = gs.narrow(0, 0, n), asq = as.narrow(0, 0, n);
    cpu::square_rows_into(g.narrow(0, n0, n), gsq);
    cpu::square_rows_into(a.narrow(0, n0, n), asq);
    if (!out.defined()) {
      out = at::mm(gsq.t(), asq);
    } else {
      out.addmm_(gsq.t(), asq);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CPU, m) { m.impl("sq_matmul", &sq_matmul_cpu); }

}  // namespace fimfast
