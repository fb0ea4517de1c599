// form_lanes: the first batch estimate of a prepared EMPIRICAL or one-draw MONTE_CARLO step,
// formed into fresh values (fimfast/persample/lanes.py Lanes.tensors; the seed API's
// zero_diag_fim + diag_fim_step + get_diag_fim forms one per batch), with whether each value is
// finite, told without reading it.
//
// Every entry of a weight's value is a sum over the N rows of products of squares,
// v[o, i] = sum_n S[n, o] A2[n, i] with S = G**2 and A2 = A**2, all >= 0, so v[o, i] <= N max(S)
// max(A2); a bias's sum_n S[n, o] <= N max(S). The squares are formed with their largest entry
// (csrc/cpu/squares_finite.cpp, in the pass that writes them); where both are finite and the
// bound is at most a quarter of the dtype's largest number (and (N + 2) eps <= 1, so rounding
// grows a sum of N nonnegative terms by less than a factor e), no entry can overflow and none is
// NaN: the value is known finite. Anything else (a square not formed by that loop, a NaN or an
// overflowing square, a bound near the top of the range) leaves the value to the read's check
// (fimfast/state.py). The values themselves are what the Python path forms: torch.mm of the
// same operands, the bias's sum over rows, zeros elsewhere.
#include "form_lanes.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <limits>
#include <unordered_map>
#include <utility>

#include "fold_lanes.h"
#include "squares_finite.h"

namespace fimfast {
namespace {

struct Square {
  at::ScalarType dt;
  at::Tensor S;
  double top;  // the largest square; NaN where unknown (formed by ATen) or a square is NaN
};

// x**2 in dt with its largest entry (see Square), as fold_lanes forms it: x.square() in its own
// dtype, else x.to(dt).square_()
Square square_with_top(const at::Tensor& x, at::ScalarType dt) {
  Square sq{dt, at::Tensor(), std::numeric_limits<double>::quiet_NaN()};
  if (!square_top(x, dt, sq.S, sq.top)) {
    sq.S = x.scalar_type() == dt ? x.square() : x.to(dt).square_();
    sq.top = std::numeric_limits<double>::quiet_NaN();
  }
  return sq;
}

// whether a sum of `rows` nonnegative terms each at most `term` is surely finite in dt
bool bounded(double term, int64_t rows, at::ScalarType dt) {
  const double eps = dt == at::kFloat ? std::numeric_limits<float>::epsilon()
                                      : std::numeric_limits<double>::epsilon();
  const double top = dt == at::kFloat ? std::numeric_limits<float>::max()
                                      : std::numeric_limits<double>::max();
  const double n = static_cast<double>(rows);
  return (n + 2.0) * eps <= 1.0 && n * term <= top / 4.0;  // NaN compares false
}

}  // namespace

std::optional<std::vector<bool>> form_lanes(std::vector<at::Tensor> values,
                                            const std::vector<at::Tensor>& G,
                                            const std::vector<std::optional<at::Tensor>>& A,
                                            const std::vector<int64_t>& weight,
                                            const std::vector<int64_t>& bias,
                                            const std::vector<bool>& transposed) {
  if (!lanes_plain(values, G, A, weight, bias, transposed)) return std::nullopt;
  at::NoGradGuard no_grad;
  // the squares of G by (tensor, dtype): an operand given to several entries is squared once
  std::unordered_map<const void*, std::vector<Square>> squared;
  auto square_of = [&squared](const at::Tensor& g, at::ScalarType dt) -> Square {
    auto& formed = squared[g.unsafeGetTensorImpl()];
    for (const auto& sq : formed) {
      if (sq.dt == dt) return sq;
    }
    formed.push_back(square_with_top(g, dt));
    return formed.back();
  };
  std::vector<bool> known(values.size(), true), written(values.size(), false);
  for (size_t e = 0; e < G.size(); ++e) {
    const int64_t rows = G[e].size(0);
    if (weight[e] >= 0) {
      at::Tensor v = values[weight[e]];
      const Square S = square_of(G[e], v.scalar_type());
      const Square A2 = square_with_top(*A[e], v.scalar_type());
      const at::Tensor a = transposed[e] ? A2.S.t() : S.S.t();
      const at::Tensor b = transposed[e] ? S.S : A2.S;
      if (v.dim() != 2 || v.size(0) != a.size(0) || v.size(1) != b.size(1)) {
        v = v.view({a.size(0), b.size(1)});
      }
      at::mm_out(v, a, b);
      known[weight[e]] = bounded(S.top * A2.top, rows, v.scalar_type());
      written[weight[e]] = true;
    }
    if (bias[e] >= 0) {
      at::Tensor v = values[bias[e]];
      const Square S = square_of(G[e], v.scalar_type());
      at::Tensor flat = v.dim() == 1 ? v : v.view({-1});
      at::sum_out(flat, S.S, {0});
      known[bias[e]] = bounded(S.top, rows, v.scalar_type());
      written[bias[e]] = true;
    }
  }
  for (size_t i = 0; i < values.size(); ++i) {
    if (!written[i]) values[i].zero_();
  }
  return known;
}

}  // namespace fimfast
