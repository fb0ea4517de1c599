// fold_squares: s += g * g over a list of CPU tensors (csrc/cpu/fold_squares.h), the last pass of
// a one-probe HUTCHINSON step (fimfast/prepared.py, fimfast/state.py State.add_squares).
//
// The pass reads and writes every float of the state (535k on a 784-512-256-10 MLP: 2 MB that a
// step's forward and backward evicted from the caches) and reads every gradient once: a pass that
// the memory bounds. torch._foreach_addcmul_ runs the same arithmetic, but on the CPU as one
// TensorIterator loop per tensor behind the dispatcher; this is one plain loop per tensor, about
// 55 us less per step of that MLP (benchmarks/results/hutchinson_floor_2026-12-07.md).
//
// Bit for bit torch's: torch's vectorised CPU kernels (AVX2, AVX512) compute addcmul's
// s + (1 * g) * g with one fused multiply-add, its DEFAULT kernels without; the loop follows the
// capability torch dispatches to (ATEN_CPU_CAPABILITY included).
#include "fold_squares.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>

namespace fimfast {
namespace {

constexpr int64_t kGrain = 32768;  // torch's at::internal::GRAIN_SIZE: parallel above that

template <typename T>
void fold_plain(T* s, const T* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s[i] = s[i] + g[i] * g[i];
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T>
__attribute__((target("avx2,fma"))) void fold_fma(T* s, const T* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s[i] = std::fma(g[i], g[i], s[i]);
}
#endif

// whether torch's addcmul kernels fuse, by the capability torch dispatches its CPU kernels to
// (fixed for the process); None where this build has no loop of that capability
std::optional<bool> capability_fuses() {
  const std::string cap = at::get_cpu_capability();
  if (cap == "DEFAULT") return false;
#if defined(__x86_64__) && defined(__GNUC__)
  if (cap == "AVX2" || cap == "AVX512") return true;
#endif
  return std::nullopt;
}

std::optional<bool> fused() {
  static const std::optional<bool> kFused = capability_fuses();
  return kFused;
}

bool eligible(const at::Tensor& s, const at::Tensor& g) {
  return s.defined() && g.defined() && s.device().is_cpu() && g.device().is_cpu() &&
         (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble) &&
         g.scalar_type() == s.scalar_type() && s.numel() == g.numel() && s.is_contiguous() &&
         g.is_contiguous() && !s.requires_grad() && !s.is_inference() && !s.is_neg() &&
         !g.is_neg() && !s.is_conj() && !g.is_conj() && s.layout() == at::kStrided &&
         g.layout() == at::kStrided;
}

template <typename T>
void fold_one(const at::Tensor& s, const at::Tensor& g, bool fma) {
  T* sp = s.data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  at::parallel_for(0, s.numel(), kGrain, [&](int64_t b, int64_t e) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (fma) {
      fold_fma(sp + b, gp + b, e - b);
      return;
    }
#endif
    fold_plain(sp + b, gp + b, e - b);
  });
}

}  // namespace

bool fold_squares(const std::vector<at::Tensor>& states, const std::vector<at::Tensor>& grads) {
  if (states.size() != grads.size()) return false;
  const std::optional<bool> fma = fused();
  if (!fma) return false;
  for (size_t i = 0; i < states.size(); ++i) {
    if (!eligible(states[i], grads[i])) return false;
  }
  for (size_t i = 0; i < states.size(); ++i) {
    const at::Tensor& s = states[i];
    if (s.numel() > 0) {
      if (s.scalar_type() == at::kFloat) {
        fold_one<float>(s, grads[i], *fma);
      } else {
        fold_one<double>(s, grads[i], *fma);
      }
    }
    s.unsafeGetTensorImpl()->bump_version();  // as an in-place op of torch
  }
  return true;
}

}  // namespace fimfast
