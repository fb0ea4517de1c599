// The first batch estimate of a prepared one-column step formed into fresh values, with what it
// tells of their finiteness (csrc/form_lanes.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fimfast {

// fold_lanes (csrc/fold_lanes.h) into values that hold nothing yet (torch.empty): each value is
// written whole, values[weight[e]] = S^T A[e]**2 (or (A[e]**2)^T S), values[bias[e]] = S.sum(0),
// every other value zero; bit for bit what the Python path forms (fimfast/batch_sums.py
// Sums.tensors). Returns, per value, whether it is known finite (see the .cpp); None, with
// nothing written, when fold_lanes would decline the entries.
std::optional<std::vector<bool>> form_lanes(std::vector<at::Tensor> values,
                                            const std::vector<at::Tensor>& G,
                                            const std::vector<std::optional<at::Tensor>>& A,
                                            const std::vector<int64_t>& weight,
                                            const std::vector<int64_t>& bias,
                                            const std::vector<bool>& transposed);

}  // namespace fimfast
