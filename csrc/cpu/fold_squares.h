// The fold of a one-probe HUTCHINSON step's squared gradients into its state (fimfast.state).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace fimfast {

// s += g * g for every (s, g) of (states, grads), what torch._foreach_addcmul_(states, grads,
// grads) computes, bit for bit (fused multiply-add where torch's CPU kernels use one), in one call
// without the dispatcher. false, with nothing written, unless every pair is CPU, float32|float64,
// contiguous, of one dtype and as many elements, and every state may be written in place as
// addcmul_ writes it (no gradient required, not an inference tensor); the caller then runs torch's.
bool fold_squares(const std::vector<at::Tensor>& states, const std::vector<at::Tensor>& grads);

}  // namespace fimfast
