// The host part of a prepared one-column step (csrc/one_column_step.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

namespace fimfast {

// None unless `logits` (N, C) on the CPU take every row with these categorical labels
// (rows_all_valid_cpu); else the score column of probe_logit_grad with one draw, (1, N, C)
// float32|float64: mode "empirical" (e_y - p, the labels) or "mc" (e_yhat - p, yhat drawn)
std::optional<at::Tensor> one_column_step(const at::Tensor& logits, const at::Tensor& labels,
                                          int64_t ignore_index, const std::string& mode,
                                          int64_t seed, int64_t offset);

}  // namespace fimfast
