// accumulate_ on the CPU: multi-tensor s += scale * g**2 (or the EMA) in one parallel loop.
//
// All tensors are cut into blocks of 32K elements and the blocks of every tensor go through one
// at::parallel_for, so many small parameters cost one parallel region instead of one per tensor.
// The widening, the square and the update are one pass (the reference makes two temporaries).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "fimfast_checks.h"

namespace fimfast {
namespace {

constexpr int64_t kBlock = 32768;

template <typename S, typename G>
void update_block(S* s, const G* g, int64_t n, bool ema, S beta, S alpha) {
  // alpha = scale (sum) or (1 - beta) * scale (ema), rounded to the state dtype as torch's alpha
  if (ema) {
    for (int64_t i = 0; i < n; ++i) {
      const S x = static_cast<S>(g[i]);
      s[i] = s[i] * beta + alpha * (x * x);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const S x = static_cast<S>(g[i]);
      s[i] = s[i] + alpha * (x * x);
    }
  }
}

void accumulate_cpu_(at::TensorList states, at::TensorList grads, c10::string_view mode,
                     double beta, double scale) {
  const bool ema = checks::check_accumulate(states, grads, mode);
  const double alpha = ema ? (1.0 - beta) * scale : scale;
  struct Item {
    at::Tensor s, g, s_orig;  // s_orig: the caller's state when s is a contiguous copy
  };
  std::vector<Item> items;
  items.reserve(states.size());
  for (size_t i = 0; i < states.size(); ++i) {
    const at::Tensor& s = states[i];
    const at::Tensor& g = grads[i];
    if (s.numel() == 0) continue;
    Item it;
    it.g = g.contiguous();
    if (s.is_contiguous()) {
      it.s = s;
    } else {
      it.s = s.contiguous();
      it.s_orig = s;
    }
    items.push_back(std::move(it));
  }
  // (item, first element) of every block
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (size_t i = 0; i < items.size(); ++i) {
    for (int64_t e = 0; e < items[i].s.numel(); e += kBlock) blocks.emplace_back(i, e);
  }
  // ~128K elements per task at least: below that one thread does everything (waking the thread
  // pool costs more than the update, and far more on an oversubscribed machine)
  int64_t total = 0;
  for (const Item& it : items) total += it.s.numel();
  const int64_t nblocks = static_cast<int64_t>(blocks.size());
  const int64_t grain =
      std::max<int64_t>(1, (int64_t(131072) * nblocks + total - 1) / std::max<int64_t>(total, 1));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Item& it = items[blocks[b].first];
      const int64_t e0 = blocks[b].second;
      const int64_t n = std::min(kBlock, it.s.numel() - e0);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, it.g.scalar_type(), "accumulate_",
                                      [&] {
                                        using G = scalar_t;
                                        const G* gp = it.g.const_data_ptr<G>() + e0;
                                        if (it.s.scalar_type() == at::kDouble) {
                                          update_block<double, G>(
                                              it.s.mutable_data_ptr<double>() + e0, gp, n, ema,
                                              beta, alpha);
                                        } else {
                                          update_block<float, G>(
                                              it.s.mutable_data_ptr<float>() + e0, gp, n, ema,
                                              static_cast<float>(beta),
                                              static_cast<float>(alpha));
                                        }
                                      });
    }
  });
  for (Item& it : items) {
    if (it.s_orig.defined()) it.s_orig.copy_(it.s);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CPU, m) { m.impl("accumulate_", &accumulate_cpu_); }

}  // namespace fimfast
