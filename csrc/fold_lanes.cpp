// fold_lanes: the squares of a prepared EMPIRICAL or one-draw MONTE_CARLO step folded into the
// state in one call (fimfast/persample/lanes.py). The Python path forms the same squares with the
// same ATen operators: per lane of fimfast.persample.onecol.layout and per closed-form group of
// the logits layer, S = G**2 (G.to(dt).square()), the bias's S.sum(0) added to its value, the
// weight's (S^T) @ (A**2) added by addmm_ (fimfast.batch_sums.Sums.defer and fold_into); here
// without a Python object or a Python call per operator. Every square and sum is formed before
// the first value is written (a failure leaves the state as it was).
//
// An operand that several entries share (the logits layer's score column, read by its weight and
// by its bias) is squared once per dtype, as the Python path's per-dtype square of that column,
// and the sums are added by one multi-tensor add, as Sums.fold_into adds its slots.
//
// The plain case only, else false with nothing formed nor written: CPU tensors, float32 or
// float64 values, contiguous, each slot at most once (a parameter with two entries sums its
// parts before the value in the Python path), 2-D G and A with as many rows, a product or a sum
// of the value's size.
#include "fold_lanes.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <unordered_map>
#include <unordered_set>
#include <utility>

namespace fimfast {

namespace {

bool plain_value(const at::Tensor& v) {
  return v.defined() && v.device().is_cpu() && v.is_contiguous() && !v.requires_grad() &&
         (v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble);
}

// x**2 in dt, a fresh tensor: x.square() in its own dtype, else x.to(dt).square_()
at::Tensor square_in(const at::Tensor& x, at::ScalarType dt) {
  return x.scalar_type() == dt ? x.square() : x.to(dt).square_();
}

}  // namespace

bool lanes_plain(const std::vector<at::Tensor>& values, const std::vector<at::Tensor>& G,
                 const std::vector<std::optional<at::Tensor>>& A,
                 const std::vector<int64_t>& weight, const std::vector<int64_t>& bias,
                 const std::vector<bool>& transposed) {
  const size_t n = G.size();
  if (A.size() != n || weight.size() != n || bias.size() != n || transposed.size() != n) {
    return false;
  }
  const int64_t slots = static_cast<int64_t>(values.size());
  std::unordered_set<int64_t> taken;
  for (size_t e = 0; e < n; ++e) {
    const at::Tensor& g = G[e];
    if (!g.defined() || !g.device().is_cpu() || g.dim() != 2) return false;
    for (const int64_t i : {weight[e], bias[e]}) {
      if (i < 0) continue;
      if (i >= slots || !taken.insert(i).second || !plain_value(values[i])) return false;
    }
    if (bias[e] >= 0 && values[bias[e]].numel() != g.size(1)) return false;
    if (weight[e] >= 0) {
      if (!A[e].has_value() || !A[e]->defined()) return false;
      const at::Tensor& a = *A[e];
      if (!a.device().is_cpu() || a.dim() != 2 || a.size(0) != g.size(0) ||
          values[weight[e]].numel() != g.size(1) * a.size(1)) {
        return false;
      }
    }
  }
  return true;
}

bool fold_lanes(std::vector<at::Tensor> values, const std::vector<at::Tensor>& G,
                const std::vector<std::optional<at::Tensor>>& A,
                const std::vector<int64_t>& weight, const std::vector<int64_t>& bias,
                const std::vector<bool>& transposed) {
  if (!lanes_plain(values, G, A, weight, bias, transposed)) return false;
  const size_t n = G.size();
  at::NoGradGuard no_grad;
  // every square first (the values are written only once all are formed); the squares of G by
  // (tensor, dtype): an operand given to several entries is squared once
  std::unordered_map<const void*, std::vector<std::pair<at::ScalarType, at::Tensor>>> squared;
  auto square_of = [&squared](const at::Tensor& g, at::ScalarType dt) -> at::Tensor {
    auto& formed = squared[g.unsafeGetTensorImpl()];
    for (const auto& [d, S] : formed) {
      if (d == dt) return S;
    }
    formed.emplace_back(dt, square_in(g, dt));
    return formed.back().second;
  };
  std::vector<at::Tensor> sum_values, sums;
  std::vector<std::tuple<int64_t, at::Tensor, at::Tensor>> products;
  for (size_t e = 0; e < n; ++e) {
    if (weight[e] >= 0) {
      const at::ScalarType dt = values[weight[e]].scalar_type();
      const at::Tensor S = square_of(G[e], dt);
      const at::Tensor A2 = square_in(*A[e], dt);
      if (transposed[e]) {
        products.emplace_back(weight[e], A2.t(), S);
      } else {
        products.emplace_back(weight[e], S.t(), A2);
      }
    }
    if (bias[e] >= 0) {
      const at::Tensor& v = values[bias[e]];
      const at::Tensor s = square_of(G[e], v.scalar_type()).sum(0);
      sum_values.push_back(v);
      sums.push_back(v.dim() == 1 ? s : s.view(v.sizes()));
    }
  }
  if (!sums.empty()) at::_foreach_add_(sum_values, sums);
  for (auto& [i, a, b] : products) {
    at::Tensor v = values[i];
    if (v.dim() != 2 || v.size(0) != a.size(0) || v.size(1) != b.size(1)) {
      v = v.view({a.size(0), b.size(1)});
    }
    v.addmm_(a, b);
  }
  return true;
}

}  // namespace fimfast
