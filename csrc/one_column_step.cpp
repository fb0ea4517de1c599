// one_column_step: the row checks and the score column of a prepared EMPIRICAL or one-draw
// MONTE_CARLO step (fimfast/persample/prepared.py) in one call: the rows of rows_all_valid_cpu
// (csrc/cpu/label_range_finite.cpp), then the CPU kernel of probe_logit_grad without the
// dispatcher (the same function the op registers: the same column, bit for bit).
#include "one_column_step.h"

#include <ATen/core/grad_mode.h>

#include "label_range_finite.h"
#include "probe_logit_grad.h"

namespace fimfast {

std::optional<at::Tensor> one_column_step(const at::Tensor& logits, const at::Tensor& labels,
                                          int64_t ignore_index, const std::string& mode,
                                          int64_t seed, int64_t offset) {
  if (logits.dim() != 2 || !rows_all_valid_cpu(logits, labels, ignore_index)) return std::nullopt;
  at::NoGradGuard no_grad;
  std::optional<at::Tensor> given;
  if (mode == "empirical") given = labels;
  return probe_logit_grad_cpu(logits, mode, seed, offset, 1, given, std::nullopt, std::nullopt,
                              1.0);
}

}  // namespace fimfast
