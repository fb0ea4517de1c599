// has_reentrant_checkpoint: whether the autograd graph of a tensor holds the backward of a
// reentrant torch.utils.checkpoint segment (fimfast/hutchinson.py, whose Python walk decides the
// same: a node whose Python class is named CheckpointFunctionBackward, torch's or a library's
// copy of CheckpointFunction).
//
// The walk follows the nodes' next edges in C++: no Python object is made for the nodes, which
// the Python walk pays for every node of the graph at every step. Only the nodes implemented in
// Python (torch::autograd::PyNode, told by their dynamic type's name, whose type information
// libtorch_python does not export) are asked their name.
#include <torch/csrc/autograd/function.h>

#include <cstring>
#include <string>
#include <typeinfo>
#include <unordered_set>
#include <vector>

#include "graph_walk.h"

namespace fimfast {
namespace {

#ifdef _MSC_VER
constexpr const char* kPyNode = "struct torch::autograd::PyNode";
#else
constexpr const char* kPyNode = "N5torch8autograd6PyNodeE";
#endif

}  // namespace

bool is_reentrant_node(const torch::autograd::Node* node) {
  // the dynamic type's name; a PyNode's own name() is its Python class's name
  const char* ty = typeid(*node).name();
  if (*ty == '*') ++ty;  // a name marked local to its library
  return std::strcmp(ty, kPyNode) == 0 && node->name() == "CheckpointFunctionBackward";
}

bool has_reentrant_checkpoint(const at::Tensor& t) {
  torch::autograd::Node* root = t.grad_fn().get();
  if (root == nullptr) return false;
  std::vector<torch::autograd::Node*> stack{root};
  std::unordered_set<torch::autograd::Node*> seen{root};
  seen.reserve(256);
  while (!stack.empty()) {
    torch::autograd::Node* node = stack.back();
    stack.pop_back();
    if (is_reentrant_node(node)) return true;
    for (const torch::autograd::Edge& e : node->next_edges()) {
      torch::autograd::Node* next = e.function.get();
      if (next != nullptr && seen.insert(next).second) stack.push_back(next);
    }
  }
  return false;
}

}  // namespace fimfast
