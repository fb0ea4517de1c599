// Squares that report whether they are finite, in the pass that writes them (see the header).
//
// A read of an estimate refuses a NaN/Inf (fimfast/state.py); reading every value for that costs
// one pass over the state (535k floats on a 784-512-256-10 MLP: ~0.1 ms, 3% of its step). The
// pass that writes the squares can tell the same at almost no cost: the largest square (or the
// finiteness of each) stays in registers. square_finite squares a one-probe HUTCHINSON step's
// gradients in place (fimfast/step.py Squares.squares); square_top forms the squares of a
// prepared one-column step with their largest entry, from which csrc/form_lanes.cpp bounds the
// products it forms.
#include "squares_finite.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fimfast {
namespace {

constexpr int64_t kGrain = 32768;  // torch's at::internal::GRAIN_SIZE: parallel above that

// t[i] = t[i] * t[i] (then * scale); whether every result is finite
template <typename T>
bool square_run(T* t, int64_t n, T scale, bool scaled) {
  constexpr T kMax = std::numeric_limits<T>::max();
  unsigned bad = 0;
  if (scaled) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = (t[i] * t[i]) * scale;
      t[i] = v;
      bad |= !(std::fabs(v) <= kMax);  // NaN compares false
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T v = t[i] * t[i];
      t[i] = v;
      bad |= !(v <= kMax);
    }
  }
  return bad == 0;
}

template <typename T>
bool square_all(T* t, int64_t n, double scale) {
  const bool scaled = scale != 1.0;
  const T s = static_cast<T>(scale);
  if (n <= kGrain) return square_run<T>(t, n, s, scaled);
  return at::parallel_reduce(
      int64_t(0), n, kGrain, true,
      [&](int64_t b, int64_t e, bool ok) { return square_run<T>(t + b, e - b, s, scaled) && ok; },
      [](bool a, bool b) { return a && b; });
}

// the unsigned integer of a float's bits
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

// out[i] = x[i] * x[i]; the largest, NaN when one is NaN. A square is +0 or more, or a NaN (of
// either sign): the bits of numbers >= +0 order as unsigned integers as the numbers do, and every
// NaN's lie above +inf's, so the largest square is the float of the largest bits, an integer max
// that vectorises (a float max reduction does not without -ffast-math)
template <typename T>
double top_run(const T* x, T* out, int64_t n) {
  using U = Bits<T>;
  U m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i] * x[i];
    out[i] = v;
    U b;
    std::memcpy(&b, &v, sizeof(T));
    m = b > m ? b : m;
  }
  constexpr U kInf = sizeof(T) == 4 ? U(0x7F800000u) : U(0x7FF0000000000000ull);
  if (m > kInf) return std::numeric_limits<double>::quiet_NaN();
  T top;
  std::memcpy(&top, &m, sizeof(T));
  return static_cast<double>(top);
}

double top_combine(double a, double b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<double>::quiet_NaN()
                                          : std::max(a, b);
}

bool writable(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.layout() == at::kStrided &&
         (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) && t.is_contiguous() &&
         !t.requires_grad() && !t.is_inference() && !t.is_neg() && !t.is_conj();
}

}  // namespace

std::optional<std::vector<bool>> square_finite(const std::vector<at::Tensor>& ts, double scale) {
  for (const auto& t : ts) {
    if (!writable(t)) return std::nullopt;
  }
  std::vector<bool> finite(ts.size(), true);
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    if (t.numel() > 0) {
      finite[i] = t.scalar_type() == at::kFloat
                      ? square_all<float>(t.data_ptr<float>(), t.numel(), scale)
                      : square_all<double>(t.data_ptr<double>(), t.numel(), scale);
    }
    t.unsafeGetTensorImpl()->bump_version();  // as an in-place op of torch
  }
  return finite;
}

bool square_top(const at::Tensor& x, at::ScalarType dt, at::Tensor& out, double& top) {
  if (!x.defined() || !x.device().is_cpu() || x.layout() != at::kStrided ||
      x.scalar_type() != dt || (dt != at::kFloat && dt != at::kDouble) || !x.is_contiguous() ||
      x.is_neg() || x.is_conj()) {
    return false;
  }
  out = at::empty(x.sizes(), x.options().requires_grad(false));
  const int64_t n = x.numel();
  auto run = [&](auto* tag) -> double {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = x.const_data_ptr<T>();
    T* op = out.data_ptr<T>();
    if (n <= kGrain) return top_run<T>(xp, op, n);
    return at::parallel_reduce(
        int64_t(0), n, kGrain, 0.0,
        [&](int64_t b, int64_t e, double m) { return top_combine(m, top_run<T>(xp + b, op + b, e - b)); },
        top_combine);
  };
  top = dt == at::kFloat ? run(static_cast<float*>(nullptr)) : run(static_cast<double*>(nullptr));
  return true;
}

}  // namespace fimfast
