// The graph walk of csrc/graph_walk.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace fimfast {

// whether the autograd graph of `t` holds a reentrant torch.utils.checkpoint segment
bool has_reentrant_checkpoint(const at::Tensor& t);

}  // namespace fimfast
