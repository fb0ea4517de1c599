// one_probe_step: the host part of a prepared one-probe HUTCHINSON step (fimfast/prepared.py) on
// CPU logits, in one call: the row checks of fimfast.batch.rows (rows_all_valid_cpu,
// csrc/cpu/label_range_finite.cpp), the probe (the CPU kernel of probe_logit_grad,
// csrc/cpu/probe_logit_grad.cpp, called without the dispatcher: no detach, no select, no schema
// parsing of its nine arguments) and the walk for a reentrant checkpoint (csrc/graph_walk.cpp).
// Each of the three is what its Python caller would run on its own; the probe, a function of the
// logits' values only, is thrown away when a check made after it in Python raises.
#include "one_probe_step.h"

#include <ATen/core/grad_mode.h>

#include "graph_walk.h"
#include "label_range_finite.h"
#include "probe_logit_grad.h"

namespace fimfast {

std::optional<std::tuple<at::Tensor, bool>> one_probe_step(const at::Tensor& logits,
                                                           const at::Tensor& labels,
                                                           int64_t ignore_index,
                                                           const std::string& mode, int64_t seed,
                                                           int64_t offset) {
  if (logits.dim() != 2 || !rows_all_valid_cpu(logits, labels, ignore_index)) return std::nullopt;
  // the kernel reads the logits' values (and gathers a transposed view): nothing to record
  at::NoGradGuard no_grad;
  at::Tensor u = probe_logit_grad_cpu(logits, mode, seed, offset, 1, std::nullopt, std::nullopt,
                                      std::nullopt, 1.0);
  return std::make_tuple(u.view({logits.size(0), logits.size(1)}),
                         has_reentrant_checkpoint(logits));
}

}  // namespace fimfast
