// tap_walk: the walk of the autograd graph of a per-sample step's logits in C++ (the Python walk
// fimfast.hooks.walk decides the same: fimfast/persample/walk.py). It counts the edges into the
// AccumulateGrad node of every wanted parameter over the whole graph (each node visited once,
// every edge into a parameter counted), tells whether each tap handle is reached (its grad_fn
// among the nodes visited, or for a leaf its AccumulateGrad node) and whether a reentrant
// torch.utils.checkpoint segment is on the way (csrc/graph_walk.cpp), and a fingerprint of the
// graph's shape: a hash of the types of its nodes in the order of the walk and of the constants
// each node keeps for its backward (a dimension, a scalar type, a Python scalar: what its
// compiled_args collects, the key compiled autograd specialises on; not the sizes, nor the
// tensors but which of them coincide), but for the leaves' and the adds and expands that the
// capture's taps put in or leave out from one step to the next (the key of a structure holds it:
// an operation added between two steps, such as a mean over the batch, or an argument changed,
// such as a cumulative sum's dimension turned to the batch, makes it another structure). No
// Python object is made for the nodes.
#include "tap_walk.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <cstdint>
#include <string>
#include <typeinfo>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "graph_walk.h"

namespace fimfast {

namespace {

// a node type's part in the shape of tap_walk: 0 for the adds and expands (the taps' nodes),
// else the address of its type_info (found by name once per type and thread)
uint64_t shape_part(const torch::autograd::Node* node) {
  thread_local std::unordered_map<const std::type_info*, uint64_t> parts;
  const std::type_info* type = &typeid(*node);
  auto it = parts.find(type);
  if (it == parts.end()) {
    const std::string name = node->name();
    const bool tap = name == "AddBackward0" || name == "ExpandBackward0";
    it = parts.emplace(type, tap ? 0 : reinterpret_cast<uintptr_t>(type)).first;
  }
  return it->second;
}

// the part of a node's constants in the shape: a hash of the bytes its compiled_args collects
// into `call` (1 where its type collects none: compiled_args not implemented, remembered per
// type but for the custom Functions' PyNode; 2 where it failed on this node, e.g. a saved
// tensor modified in place since)
uint64_t args_part(const c10::intrusive_ptr<torch::autograd::Node>& node,
                   torch::dynamo::autograd::AutogradCompilerCall& call) {
  namespace ca = torch::dynamo::autograd;
  thread_local std::unordered_set<const std::type_info*> none;
  const std::type_info* type = &typeid(*node);
  if (none.count(type) > 0) return 1;
  const size_t sizes = call.all_size_inputs.size();
  ca::NodeCall node_call(0, node);
  ca::CompiledNodeArgs args(call, node_call);
  try {
    node->compiled_args(args);
  } catch (const c10::NotImplementedError&) {
    // a custom autograd.Function's node (PyNode) may fail for one Function and not another
    if (std::string(type->name()).find("PyNode") == std::string::npos) none.insert(type);
    return 1;
  } catch (const std::exception&) {
    return 2;
  }
  const ca::CacheKey key = args.key();
  uint64_t h = 0xCBF29CE484222325ULL ^ key.key_size;
  for (uint16_t i = 0; i < key.key_size; ++i) h = (h ^ key.key[i]) * 0x100000001B3ULL;
  // the size-like arguments (SymInts: sizes, offsets, shifts) are left out of the key, so that
  // batches of other lengths stay one structure; whether each is 0 goes in (a roll by a shift
  // drawn 0 on one step and 1 on the next: a no-op, then a coupling)
  for (size_t i = sizes; i < call.all_size_inputs.size(); ++i) {
    h = (h ^ (call.all_size_inputs[i].value == 0 ? 0x5A : 0xA5)) * 0x100000001B3ULL;
  }
  return h;
}

}  // namespace

std::tuple<std::vector<int64_t>, std::vector<bool>, bool, int64_t> tap_walk(
    const at::Tensor& flat, const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& probes) {
  using torch::autograd::Node;
  using Acc = decltype(torch::autograd::impl::try_get_grad_accumulator(
      std::declval<const at::Tensor&>()));
  std::unordered_map<const Node*, int64_t> edges;  // AccumulateGrad node -> edges into it
  std::vector<Acc> accs;
  accs.reserve(params.size());
  for (const at::Tensor& p : params) {
    Acc acc = p.defined() ? torch::autograd::impl::try_get_grad_accumulator(p) : Acc();
    if (acc) edges.emplace(acc.get(), 0);
    accs.push_back(std::move(acc));
  }
  std::unordered_set<const Node*> seen;
  bool reentrant = false;
  uint64_t shape = 0;  // the hash of the nodes' shape parts, in order
  const c10::intrusive_ptr<Node>& root = flat.grad_fn();
  if (root) {
    // the tensors the nodes' constants name, numbered in the order of the walk
    torch::dynamo::autograd::AutogradCompilerCall call(
        torch::dynamo::autograd::SizeInput::STATIC);
    seen.reserve(256);
    seen.insert(root.get());
    std::vector<const c10::intrusive_ptr<Node>*> stack{&root};
    while (!stack.empty()) {
      const c10::intrusive_ptr<Node>& node = *stack.back();
      stack.pop_back();
      if (!reentrant && is_reentrant_node(node.get())) reentrant = true;
      if (const uint64_t part = shape_part(node.get())) {
        shape = (shape * 0x100000001B3ULL) ^ (part * 0x9E3779B97F4A7C15ULL);
        shape = (shape * 0x100000001B3ULL) ^ args_part(node, call);
      }
      for (const torch::autograd::Edge& e : node->next_edges()) {
        Node* next = e.function.get();
        if (next == nullptr) continue;
        if (dynamic_cast<torch::autograd::AccumulateGrad*>(next) != nullptr) {
          seen.insert(next);
          auto it = edges.find(next);
          if (it != edges.end()) ++it->second;
        } else if (seen.insert(next).second) {
          stack.push_back(&e.function);
        }
      }
    }
  }
  std::vector<int64_t> counts;
  counts.reserve(params.size());
  for (const auto& acc : accs) counts.push_back(acc ? edges[acc.get()] : 0);
  std::vector<bool> reached;
  reached.reserve(probes.size());
  for (const at::Tensor& t : probes) {
    bool r = false;
    if (t.defined()) {
      const auto& fn = t.grad_fn();
      if (fn) {
        r = seen.count(fn.get()) > 0;
      } else if (t.requires_grad()) {
        auto acc = torch::autograd::impl::try_get_grad_accumulator(t);
        r = acc && seen.count(acc.get()) > 0;
      }
    }
    reached.push_back(r);
  }
  return std::make_tuple(std::move(counts), std::move(reached), reentrant,
                         static_cast<int64_t>(shape));
}

}  // namespace fimfast
