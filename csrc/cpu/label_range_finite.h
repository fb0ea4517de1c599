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

}  // namespace fimfast
