// The squares of a prepared one-column step added into the state (csrc/fold_lanes.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fimfast {

// For each entry e: S = G[e]**2 in the dtype of the slot it goes to; values[bias[e]] += S.sum(0)
// (bias[e] >= 0) and values[weight[e]] += S^T A[e]**2, or (A[e]**2)^T S for transposed[e]
// (weight[e] >= 0), every square formed before the first value is written. False, with nothing
// written, when anything is not the plain case (see the .cpp)
// Whether fold_lanes (and form_lanes, csrc/form_lanes.cpp) take these entries: CPU tensors,
// float32|float64 contiguous values, each slot at most once, 2-D G and A of as many rows, a
// product or a sum of the value's size
bool lanes_plain(const std::vector<at::Tensor>& values, const std::vector<at::Tensor>& G,
                 const std::vector<std::optional<at::Tensor>>& A,
                 const std::vector<int64_t>& weight, const std::vector<int64_t>& bias,
                 const std::vector<bool>& transposed);

bool fold_lanes(std::vector<at::Tensor> values, const std::vector<at::Tensor>& G,
                const std::vector<std::optional<at::Tensor>>& A,
                const std::vector<int64_t>& weight, const std::vector<int64_t>& bias,
                const std::vector<bool>& transposed);

}  // namespace fimfast
