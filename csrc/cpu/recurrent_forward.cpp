// recurrent_forward on the CPU: the steps of one recurrent layer and direction (LSTM, GRU, Elman
// tanh/relu) from their input projections, keeping the pre-activations of every step; the
// contract of fimfast/ops/recurrent.py (recurrent_forward_torch, the torch reference).
//
// torch's fused kernel of the layer (oneDNN) returns the outputs only: the backward of
// fimfast/rules/recurrent_scan.py then formed W_hh h_{t-1} of all steps again (a product as large
// as the recurrence's own), and the fused kernel formed the input projections that the rule had
// already formed and tapped. Here each step is one product with W_hh (at::addmm_, onto the step's
// input projection) and one pass over the step's rows for the cell, in the order of the torch
// reference and of the backward's kernel (csrc/cpu/recurrent_bptt.cpp, which recomputes the gates
// from these pre-activations), so the outputs agree with both to rounding (docs/math.md §4,
// "Recurrent layers"). In float32 that pass is one vectorised loop (recurrent_cell.h: four ATen
// calls a step cost more than the step's arithmetic); in float64 the sigmoids and tanhs are
// ATen's ops on the step's rows.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/tanh.h>
#include <torch/library.h>

#include <c10/util/irange.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "recurrent_cell.h"

namespace fimfast {
namespace {

using at::Tensor;
using Out = std::tuple<Tensor, Tensor, Tensor, Tensor>;

struct Shape {
  int64_t N, H;
};

// the LSTM cell on N rows in float32 (recurrent_cell.h): c = f c + i g in place, y = o tanh(c)
FIMFAST_SIMD_CLONES void lstm_cell_f(const float* a, float* c, float* y, int64_t N, int64_t H) {
  cell::lstm_forward_f(a, c, c, y, N, H);
}

// the GRU cell on N rows in float32: y = n + z (h - n), n = tanh(gi_n + r gh_n)
FIMFAST_SIMD_CLONES void gru_cell_f(const float* gi, const float* gh, const float* hp, float* y,
                                    int64_t N, int64_t H) {
  for (int64_t n = 0; n < N; ++n) {
    const float* __restrict__ a = gi + n * 3 * H;
    const float* __restrict__ b = gh + n * 3 * H;
    const float* __restrict__ h = hp + n * H;
    float* __restrict__ yn = y + n * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float r = cell::sigmoid_f(a[j] + b[j]), z = cell::sigmoid_f(a[H + j] + b[H + j]);
      const float nn = cell::tanh_f(a[2 * H + j] + r * b[2 * H + j]);
      yn[j] = nn + z * (h[j] - nn);
    }
  }
}

// LSTM step (float64): c = f c + i g in place, y = o tanh(c), from the pre-activations a (N, 4H) of the
// gates i, f, g, o; sg (N, 4H), tg and tc (N, H) buffers
template <typename scalar_t>
void lstm_step(Shape s, const Tensor& a, Tensor& c, Tensor& y, Tensor& sg, Tensor& tg,
               Tensor& tc) {
  const int64_t N = s.N, H = s.H;
  at::sigmoid_out(sg, a);
  at::tanh_out(tg, a.narrow(1, 2 * H, H));
  const scalar_t *S = sg.const_data_ptr<scalar_t>(), *TG = tg.const_data_ptr<scalar_t>();
  scalar_t* C = c.mutable_data_ptr<scalar_t>();
  for (const auto n : c10::irange(N)) {
    const scalar_t* __restrict__ st = S + n * 4 * H;
    const scalar_t* __restrict__ gt = TG + n * H;
    scalar_t* __restrict__ cn = C + n * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) cn[j] = st[j] * gt[j] + st[H + j] * cn[j];
  }
  at::tanh_out(tc, c);
  const scalar_t* TC = tc.const_data_ptr<scalar_t>();
  scalar_t* Y = y.mutable_data_ptr<scalar_t>();
  for (const auto n : c10::irange(N)) {
    const scalar_t* __restrict__ o = S + n * 4 * H + 3 * H;
    const scalar_t* __restrict__ t = TC + n * H;
    scalar_t* __restrict__ yn = Y + n * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) yn[j] = o[j] * t[j];
  }
}

// GRU step (float64): r, z = sigmoid(gi + gh) (first 2H), n = tanh(gi_n + r gh_n), y = n + z (h - n); gh
// (N, 3H) the hidden-side pre-activations, hp the state the step started from; rz (N, 2H) and
// nb (N, H) buffers
template <typename scalar_t>
void gru_step(Shape s, const Tensor& gi, const Tensor& gh, const scalar_t* hp, Tensor& y,
              Tensor& rz, Tensor& nb) {
  const int64_t N = s.N, H = s.H;
  at::add_out(rz, gi.narrow(1, 0, 2 * H), gh.narrow(1, 0, 2 * H));
  at::sigmoid_out(rz, rz);
  const scalar_t *RZ = rz.const_data_ptr<scalar_t>(), *GI = gi.const_data_ptr<scalar_t>();
  const scalar_t* GH = gh.const_data_ptr<scalar_t>();
  scalar_t* NB = nb.mutable_data_ptr<scalar_t>();
  for (const auto n : c10::irange(N)) {
    const scalar_t* __restrict__ r = RZ + n * 2 * H;
    const scalar_t* __restrict__ a = GI + n * 3 * H + 2 * H;
    const scalar_t* __restrict__ b = GH + n * 3 * H + 2 * H;
    scalar_t* __restrict__ o = NB + n * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) o[j] = a[j] + r[j] * b[j];
  }
  at::tanh_out(nb, nb);
  scalar_t* Y = y.mutable_data_ptr<scalar_t>();
  for (const auto n : c10::irange(N)) {
    const scalar_t* __restrict__ z = RZ + n * 2 * H + H;
    const scalar_t* __restrict__ nn = NB + n * H;
    const scalar_t* __restrict__ h = hp + n * H;
    scalar_t* __restrict__ yn = Y + n * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) yn[j] = nn[j] + z[j] * (h[j] - nn[j]);
  }
}

void check_same(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type() && t.device() == ref.device(),
              "recurrent_forward: ", name, " must have the dtype and device of whh (",
              ref.scalar_type(), ", ", ref.device(), "); got ", t.scalar_type(), ", ",
              t.device());
}

Out recurrent_forward_cpu(c10::string_view mode_, const Tensor& gi_, const Tensor& h0,
                          const std::optional<Tensor>& c0, const Tensor& whh,
                          const std::optional<Tensor>& bhh, bool reverse) {
  const std::string mode(mode_);
  const int64_t gates = mode == "LSTM" ? 4 : mode == "GRU" ? 3 : 1;
  TORCH_CHECK(gates > 1 || mode == "RNN_TANH" || mode == "RNN_RELU",
              "recurrent_forward: mode must be LSTM, GRU, RNN_TANH or RNN_RELU; got ", mode);
  TORCH_CHECK(whh.device().is_cpu(), "recurrent_forward: the CPU kernel needs CPU tensors");
  TORCH_CHECK(whh.scalar_type() == at::kFloat || whh.scalar_type() == at::kDouble,
              "recurrent_forward: the CPU kernel takes float32 or float64; got ",
              whh.scalar_type());
  TORCH_CHECK(whh.dim() == 2 && whh.size(0) == gates * whh.size(1),
              "recurrent_forward: whh must be (", gates, " H, H); got ", whh.sizes());
  const int64_t H = whh.size(1), G = gates * H;
  TORCH_CHECK(gi_.dim() == 3 && gi_.size(2) == G, "recurrent_forward: gi must be (T, N, ", G,
              "); got ", gi_.sizes());
  const int64_t T = gi_.size(0), N = gi_.size(1);
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({N, H}), "recurrent_forward: h0 must be (N, H) = (",
              N, ", ", H, "); got ", h0.sizes());
  const bool lstm = gates == 4;
  TORCH_CHECK(lstm == c0.has_value(), "recurrent_forward: c0 is given for an LSTM only");
  check_same(gi_, whh, "gi");
  check_same(h0, whh, "h0");
  if (lstm) {
    TORCH_CHECK(c0->sizes() == h0.sizes(), "recurrent_forward: c0 must have the shape of h0");
    check_same(*c0, whh, "c0");
  }
  if (bhh.has_value()) {
    TORCH_CHECK(bhh->dim() == 1 && bhh->size(0) == G, "recurrent_forward: bhh must be (", G,
                "); got ", bhh->sizes());
    check_same(*bhh, whh, "bhh");
  }
  // W_hh^T laid out for the product (the transposed view costs a third more per step); gi as it
  // comes but for the GRU, whose cell reads it by pointer (the others add it to b_hh, strided: a
  // batch-first projection, gi (T, N, G) a transposed view, costs no copy)
  const Tensor gi = gates == 3 ? gi_.contiguous() : gi_, w = whh.t().contiguous();
  const auto opts = whh.options();
  // the pre-activations: the input projections plus b_hh (the GRU: b_hh alone, its hidden side)
  Tensor pre = at::empty({T, N, G}, opts);
  if (gates == 3) {
    bhh.has_value() ? pre.copy_(bhh->expand({T, N, G})) : pre.zero_();
  } else {
    bhh.has_value() ? at::add_out(pre, gi, *bhh) : pre.copy_(gi);
  }
  Tensor ys = at::empty({T, N, H}, opts);
  Tensor c = lstm ? c0->clone(at::MemoryFormat::Contiguous) : at::empty({0}, opts);
  Tensor hT = h0.clone(at::MemoryFormat::Contiguous);
  if (T == 0) return {ys, pre, hT, c};
  Tensor b1 = at::empty({N, lstm ? G : 2 * H}, opts), b2 = at::empty({N, H}, opts);
  Tensor b3 = at::empty({N, H}, opts);
  AT_DISPATCH_FLOATING_TYPES(whh.scalar_type(), "recurrent_forward", [&] {
    Tensor hp = hT;  // the state the step starts from
    for (const auto s : c10::irange(T)) {
      const int64_t t = reverse ? T - 1 - s : s;
      Tensor p = pre.select(0, t), y = ys.select(0, t);
      p.addmm_(hp, w);
      constexpr bool f32 = std::is_same_v<scalar_t, float>;
      if (lstm && f32) {
        lstm_cell_f(p.const_data_ptr<float>(), c.mutable_data_ptr<float>(),
                    y.mutable_data_ptr<float>(), N, H);
      } else if (lstm) {
        lstm_step<scalar_t>({N, H}, p, c, y, b1, b2, b3);
      } else if (gates == 3 && f32) {
        gru_cell_f(gi.const_data_ptr<float>() + t * N * G, p.const_data_ptr<float>(),
                   hp.const_data_ptr<float>(), y.mutable_data_ptr<float>(), N, H);
      } else if (gates == 3) {
        gru_step<scalar_t>({N, H}, gi.select(0, t), p, hp.const_data_ptr<scalar_t>(), y, b1, b2);
      } else if (mode == "RNN_TANH") {
        at::tanh_out(y, p);
      } else {
        at::clamp_min_out(y, p, 0);
      }
      hp = y;
    }
    hT.copy_(hp);
  });
  return {ys, pre, hT, c};
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CPU, m) { m.impl("recurrent_forward", &recurrent_forward_cpu); }

}  // namespace fimfast
