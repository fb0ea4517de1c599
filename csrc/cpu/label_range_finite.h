// The row checks of a batch on the CPU (csrc/cpu/label_range_finite.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace fimfast {

// whether every entry of a floating-point CPU tensor is finite
bool all_finite_cpu(const at::Tensor& logits);

// (min label, max label, every logit finite); labels must not be empty
std::tuple<int64_t, int64_t, bool> label_range_finite_cpu(const at::Tensor& labels,
                                                          const at::Tensor& logits);

// whether every row of (N, C) or (N, T, C) logits is valid with these categorical labels, without
// a shift or a mask: labels of shape (N,) / (N, T), in [0, C), none equal to ignore_index, every
// logit finite, C >= 2 (false leaves the decision, and its error message, to fimfast/batch.py)
bool rows_all_valid_cpu(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index);

}  // namespace fimfast
