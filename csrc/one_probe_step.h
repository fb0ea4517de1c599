// The host part of a prepared one-probe HUTCHINSON step (csrc/one_probe_step.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace fimfast {

// None unless `logits` (N, C) on the CPU take every row with these categorical labels
// (rows_all_valid_cpu); else (the probe of probe_logit_grad with one probe, (N, C) float32|float64,
// whether the autograd graph of `logits` holds a reentrant checkpoint segment)
std::optional<std::tuple<at::Tensor, bool>> one_probe_step(const at::Tensor& logits,
                                                           const at::Tensor& labels,
                                                           int64_t ignore_index,
                                                           const std::string& mode, int64_t seed,
                                                           int64_t offset);

}  // namespace fimfast
