// label_range_finite and all_finite on the CPU: the row checks of a batch (fimfast/finite.py) in
// one pass, host functions of the module fimfast._C (csrc/fimfast.cpp; no dispatcher op: the
// checks run on plain CPU tensors only, and a call through torch.ops costs twice the check).
//
// label_range_finite returns (min label, max label, every logit finite). The torch path costs two
// reductions (aminmax of the labels, a sum of the logits) and three host reads; here the labels
// and the logits are read once each, in one call. Finiteness is decided on the bits (exponent field not
// all ones), exactly, never from a sum that could overflow. Contiguous integer labels and
// contiguous float16/bfloat16/float32/float64 logits take the loops below; any other layout or
// dtype is checked with ATen reductions (same results, no temporary shaped like the inputs).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/amin.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "label_range_finite.h"

namespace fimfast {
namespace {

// at least this many logits per task: below it one thread reads everything
constexpr int64_t kGrain = 1 << 18;

// whether no element of `n` words has its exponent field (`mask`) all ones
template <typename U>
bool finite_bits(const U* p, int64_t n, U mask) {
  U bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<U>((p[i] & mask) == mask);
  return bad == 0;
}

template <typename U>
bool all_finite_bits(const void* data, int64_t n, U mask) {
  const U* p = static_cast<const U*>(data);
  if (n <= kGrain) return finite_bits<U>(p, n, mask);
  return at::parallel_reduce(
      int64_t(0), n, kGrain, true,
      [&](int64_t b, int64_t e, bool ok) { return ok && finite_bits<U>(p + b, e - b, mask); },
      [](bool a, bool b) { return a && b; });
}

}  // namespace

bool all_finite_cpu(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu(), "all_finite: logits must be a CPU tensor; got ",
              logits.device());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "all_finite: logits must be floating point; got dtype ", logits.scalar_type());
  const int64_t n = logits.numel();
  if (n == 0) return true;
  if (logits.is_contiguous()) {
    const void* p = logits.const_data_ptr();
    switch (logits.scalar_type()) {
      case at::kFloat:
        return all_finite_bits<uint32_t>(p, n, 0x7F800000u);
      case at::kDouble:
        return all_finite_bits<uint64_t>(p, n, 0x7FF0000000000000ull);
      case at::kHalf:
        return all_finite_bits<uint16_t>(p, n, static_cast<uint16_t>(0x7C00));
      case at::kBFloat16:
        return all_finite_bits<uint16_t>(p, n, static_cast<uint16_t>(0x7F80));
      default:
        break;
    }
  }
  // any other layout (an expanded placeholder of the logits included) or dtype: the ends of the
  // range, which a NaN or an infinity reaches, by two reductions that read a view as it is
  // (aminmax and isfinite make a copy shaped like the logits)
  return std::isfinite(at::amax(logits).item<double>()) &&
         std::isfinite(at::amin(logits).item<double>());
}

namespace {

template <typename L>
void min_max(const L* p, int64_t n, int64_t& lo, int64_t& hi) {
  L a = p[0], b = p[0];
  for (int64_t i = 1; i < n; ++i) {
    a = std::min(a, p[i]);
    b = std::max(b, p[i]);
  }
  lo = static_cast<int64_t>(a);
  hi = static_cast<int64_t>(b);
}

}  // namespace

std::tuple<int64_t, int64_t, bool> label_range_finite_cpu(const at::Tensor& labels,
                                                          const at::Tensor& logits) {
  TORCH_CHECK(labels.device().is_cpu() && logits.device().is_cpu(),
              "label_range_finite: labels and logits must be CPU tensors; got ", labels.device(),
              " and ", logits.device());
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
              "label_range_finite: labels must be integer class indices; got dtype ",
              labels.scalar_type());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "label_range_finite: logits must be floating point; got dtype ",
              logits.scalar_type());
  const int64_t n = labels.numel();
  TORCH_CHECK(n > 0, "label_range_finite: labels must not be empty (no range to read)");
  int64_t lo = 0, hi = 0;
  bool done = false;
  if (labels.is_contiguous() && !labels.is_neg()) {
    switch (labels.scalar_type()) {
#define FIMFAST_RANGE(T, name)                                         \
  case at::k##name:                                                    \
    min_max<T>(labels.const_data_ptr<T>(), n, lo, hi);                 \
    done = true;                                                       \
    break;
      FIMFAST_RANGE(int64_t, Long)
      FIMFAST_RANGE(int32_t, Int)
      FIMFAST_RANGE(int16_t, Short)
      FIMFAST_RANGE(int8_t, Char)
      FIMFAST_RANGE(uint8_t, Byte)
#undef FIMFAST_RANGE
      default:
        break;
    }
  }
  if (!done) {  // another integer dtype or layout: ATen's reductions (unsigned 64-bit clamps)
    lo = at::amin(labels).item<int64_t>();
    hi = at::amax(labels).item<int64_t>();
  }
  return {lo, hi, all_finite_cpu(logits)};
}

bool rows_all_valid_cpu(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  if (!logits.device().is_cpu() || !labels.device().is_cpu()) return false;
  const int64_t dim = logits.dim();
  if ((dim != 2 && dim != 3) || !at::isFloatingType(logits.scalar_type())) return false;
  if (!at::isIntegralType(labels.scalar_type(), /*includeBool=*/false)) return false;
  const auto sizes = logits.sizes();
  const int64_t C = sizes[dim - 1];
  if (C < 2 || logits.numel() == 0 || labels.sizes() != sizes.slice(0, dim - 1)) return false;
  const auto [lo, hi, finite] = label_range_finite_cpu(labels, logits);
  return finite && lo >= 0 && hi < C && !(lo <= ignore_index && ignore_index <= hi);
}

}  // namespace fimfast
