// The graph walk of csrc/graph_walk.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/function.h>

namespace fimfast {

// whether the autograd graph of `t` holds a reentrant torch.utils.checkpoint segment
bool has_reentrant_checkpoint(const at::Tensor& t);

// whether an autograd node is the backward of a reentrant torch.utils.checkpoint segment
bool is_reentrant_node(const torch::autograd::Node* node);

}  // namespace fimfast
