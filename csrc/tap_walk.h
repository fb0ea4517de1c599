// The graph walk of a per-sample step (csrc/tap_walk.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace fimfast {

// One walk of the autograd graph of `flat`: (per tensor of `params`, the edges into its
// AccumulateGrad node; per tensor of `probes`, whether the gradient of `flat` reaches it; whether
// the graph holds a reentrant checkpoint segment; a hash of the types of the graph's nodes and
// of the constants each keeps for its backward, but for the leaves' and the taps' adds and
// expands, the same for the same operations with the same constants)
std::tuple<std::vector<int64_t>, std::vector<bool>, bool, int64_t> tap_walk(
    const at::Tensor& flat, const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& probes);

}  // namespace fimfast
