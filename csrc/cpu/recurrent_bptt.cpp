// recurrent_bptt on the CPU: back-propagation through time of one recurrent layer and direction
// (LSTM, GRU, Elman tanh/relu), the contract of fimfast/ops/recurrent.py (the torch reference).
//
// The reference runs the recurrence as a Python loop of 4-6 ATen ops per step (each a few
// microseconds of dispatch for a (N, H) block) and the LSTM cell states as one more. Here one
// call does it all: the gates of all steps (sigmoids, tanhs; an LSTM's cell states), then per
// step one vectorised pass (the derivatives of the gates and the recurrence; the loops are
// compiled for AVX-512, AVX2 and the baseline) and one product with W_hh (at::mm_out, the BLAS
// torch links). The gates: ATen's vectorised ops over all steps, except an LSTM's in float32,
// which come from the float32 cell of the forward's kernel (recurrent_cell.h), one pass per step,
// exactly as that kernel computed them. The operations and their order are those of the
// reference, so the results agree to rounding (docs/math.md §4, "Recurrent layers").
//
// A column whose gradient is zero at the first steps of the backward (a tagger's column for
// position tau, in the steps after tau) starts where it stops being zero: before, its gradients
// are zeros (those of the reference: a zero times the cell's finite factors), without the work.
//
// The incoming gradients may carry a batch of B cotangents (the legacy vmap of
// torch.autograd.grad(..., is_grads_batched=True)): the kernel for the Batched dispatch key below
// runs the B columns as B*N rows of the same recurrence (the gates are shared, the products are
// (B*N, G) @ (G, H)), instead of the fallback's loop over the columns.
#include <ATen/Dispatch.h>
#include <ATen/LegacyBatchedTensorImpl.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/tanh.h>
#include <torch/library.h>

#include <c10/util/irange.h>

#include "cpu_math.h"
#include "recurrent_cell.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fimfast {
namespace {

using at::Tensor;
using Out = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// Shapes of one call: T steps, N rows of the saved activations, B cotangent columns, H hidden;
// start[b] the first step (in the backward's order) where column b's gradient is not zero.
struct Dims {
  int64_t T, N, B, H;
  bool reverse;
  std::vector<int64_t> start;
  // the step at position s of the backward's order (the forward's order run backwards)
  int64_t back(int64_t s) const { return reverse ? s : T - 1 - s; }
  // whether column b is still zero at position s: its gradients there are zeros, left unwritten
  // by the recurrence (a zero times the finite factors of the cell)
  bool idle(int64_t s, int64_t b) const { return s < start[b]; }
  // the steps the backward reaches (those of the positions where some column is active): L of
  // them from t0 on, in position order
  int64_t span() const { return T - *std::min_element(start.begin(), start.end()); }
  int64_t first() const { return reverse ? T - span() : 0; }
  // rows [lo N, hi N) hold every column active at position s (lo == hi: none)
  std::pair<int64_t, int64_t> active(int64_t s) const {
    int64_t lo = B, hi = 0;
    for (const auto b : c10::irange(B)) {
      if (!idle(s, b)) {
        lo = std::min<int64_t>(lo, b);
        hi = b + 1;
      }
    }
    return {std::min(lo, hi), hi};
  }
  // out = dG[t] @ whh on the rows of the active columns (the others stay zero); out (B N, H)
  // and dG (T, B N, G) as 2-D and 3-D views made once
  void product(Tensor& out, const Tensor& dG, const Tensor& whh, int64_t s) const {
    const auto [lo, hi] = active(s);
    if (lo == hi) return;
    const Tensor dGt = dG.select(0, back(s));
    if (hi - lo == B) {
      at::mm_out(out, dGt, whh);
      return;
    }
    Tensor o = out.narrow(0, lo * N, (hi - lo) * N);
    at::mm_out(o, dGt.narrow(0, lo * N, (hi - lo) * N), whh);
  }
};

template <typename scalar_t>
bool any_nonzero(const scalar_t* p, int64_t n) {
  for (const auto i : c10::irange(n)) {
    if (p[i] != scalar_t(0)) return true;
  }
  return false;
}

// start[b] of Dims: the first position of the backward's order where column b of dy (T, B, N, H)
// is not zero (0 when its dh or dc is not zero; T when it is zero throughout). A tagger's column
// for position tau is zero after tau: its backward starts there.
template <typename scalar_t>
std::vector<int64_t> first_steps(const Dims& d, const Tensor& dy, const Tensor& dh,
                                 const Tensor& dc) {
  const int64_t NH = d.N * d.H;
  const Tensor h = dh.contiguous(), c = dc.defined() ? dc.contiguous() : dc;
  std::vector<int64_t> start(d.B, d.T);
  for (const auto b : c10::irange(d.B)) {
    if (any_nonzero(h.data_ptr<scalar_t>() + b * NH, NH) ||
        (c.defined() && any_nonzero(c.data_ptr<scalar_t>() + b * NH, NH))) {
      start[b] = 0;
      continue;
    }
    for (const auto s : c10::irange(d.T)) {
      if (any_nonzero(dy.data_ptr<scalar_t>() + (d.back(s) * d.B + b) * NH, NH)) {
        start[b] = s;
        break;
      }
    }
  }
  return start;
}

// The factors of one LSTM step shared by its columns, for its N rows: k = d a / d c (blocks i,
// f, g) and d a / d h (block o), p = d c / d h (through h = o tanh(c)), and f; kb (N, 6, H). S
// the sigmoids of the step's gates (N, 4H), TG the tanh of its g block (rows gs apart), TC the
// tanh of its cell states, c the cell states it started from (N, H).
template <typename T>
FIMFAST_INLINE void lstm_factors_t(int64_t N, int64_t H, int64_t gs, const T* S, const T* TG,
                                   const T* TC, const T* c, T* kb) {
  for (int64_t n = 0; n < N; ++n) {
    const T *__restrict__ st = S + n * 4 * H, *__restrict__ gt = TG + n * gs;
    const T *__restrict__ tc = TC + n * H, *__restrict__ cn = c + n * H;
    T* __restrict__ k = kb + n * 6 * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T i = st[j], f = st[H + j], o = st[3 * H + j], gg = gt[j];
      k[j] = gg * (i * (1 - i));
      k[H + j] = cn[j] * (f * (1 - f));
      k[2 * H + j] = i - (i * gg) * gg;
      k[3 * H + j] = tc[j] * (o * (1 - o));
      k[4 * H + j] = o - (o * tc[j]) * tc[j];
      k[5 * H + j] = f;
    }
  }
}

// One column's step of the LSTM recurrence on its N rows: g (N, 4H) the gradient at the gate
// pre-activations from dy (N, H) and the carried dh (ch) and dc (dc, updated in place)
template <typename T>
FIMFAST_INLINE void lstm_column_t(int64_t N, int64_t H, const T* kb, const T* dy, const T* ch,
                                  T* dc, T* g) {
  for (int64_t n = 0; n < N; ++n) {
    const T *__restrict__ k = kb + n * 6 * H, *__restrict__ dyt = dy + n * H;
    const T* __restrict__ chn = ch + n * H;
    T *__restrict__ dct = dc + n * H, *__restrict__ gn = g + n * 4 * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T dhv = dyt[j] + chn[j];
      const T dcv = dct[j] + dhv * k[4 * H + j];
      gn[j] = dcv * k[j];
      gn[H + j] = dcv * k[H + j];
      gn[2 * H + j] = dcv * k[2 * H + j];
      gn[3 * H + j] = dhv * k[3 * H + j];
      dct[j] = dcv * k[5 * H + j];
    }
  }
}

// the two loops above compiled for AVX-512, AVX2 and the baseline (cpu_math.h)
FIMFAST_SIMD_CLONES void lstm_factors(int64_t N, int64_t H, int64_t gs, const float* S,
                                      const float* TG, const float* TC, const float* c,
                                      float* kb) {
  lstm_factors_t(N, H, gs, S, TG, TC, c, kb);
}
FIMFAST_SIMD_CLONES void lstm_factors(int64_t N, int64_t H, int64_t gs, const double* S,
                                      const double* TG, const double* TC, const double* c,
                                      double* kb) {
  lstm_factors_t(N, H, gs, S, TG, TC, c, kb);
}
FIMFAST_SIMD_CLONES void lstm_column(int64_t N, int64_t H, const float* kb, const float* dy,
                                     const float* ch, float* dc, float* g) {
  lstm_column_t(N, H, kb, dy, ch, dc, g);
}
FIMFAST_SIMD_CLONES void lstm_column(int64_t N, int64_t H, const double* kb, const double* dy,
                                     const double* ch, double* dc, double* g) {
  lstm_column_t(N, H, kb, dy, ch, dc, g);
}

// The gates of one LSTM step in float32 (recurrent_cell.h, the functions of the forward's kernel):
// s (N, 4H) sigmoid(i), sigmoid(f), tanh(g), sigmoid(o), c the cell states, tc = tanh(c)
FIMFAST_SIMD_CLONES void lstm_gates(const float* a, const float* cp, float* c, float* s, float* tc,
                                    int64_t N, int64_t H) {
  cell::lstm_gates_f(a, cp, c, s, tc, N, H);
}

// dG (T, B, N, 4H), dh0 and dc0 (B, N, H) of the LSTM from its gate pre-activations a (T, N, 4H);
// dy (T, B, N, H), dh / dc (B, N, H) the incoming gradients. The gates and cell states of the
// steps the backward reaches come first: in float32 one vectorised pass per step
// (recurrent_cell.h, as the forward's kernel computes them); in float64 ATen's sigmoid and tanh
// over all steps and a scalar loop for the cell states. Then the recurrence.
template <typename scalar_t>
void lstm_cpu(const Dims& d, const Tensor& a, const Tensor& c0, const Tensor& whh,
              const Tensor& dy, const Tensor& dh, const Tensor& dc, Tensor& dG, Tensor& dh0,
              Tensor& dc0) {
  const int64_t T = d.T, N = d.N, B = d.B, H = d.H, NH = N * H, G = 4 * H;
  const int64_t L = d.span(), t0 = d.first();  // the gates of the steps the backward reaches
  const Tensor ar = a.narrow(0, t0, L);
  const scalar_t* C0 = c0.data_ptr<scalar_t>();
  Tensor cs = at::empty({L, N, H}, a.options()), sg, tg, tcs;
  scalar_t* CS = cs.data_ptr<scalar_t>();
  // c_t = f_t c_{t-1} + i_t g_t in the forward's order; cp(t) the state step t started from
  const auto cp = [&](int64_t t) -> const scalar_t* {
    const int64_t p = d.reverse ? t + 1 : t - 1;
    return p < 0 || p >= T ? C0 : CS + (p - t0) * NH;
  };
  const scalar_t *S = nullptr, *TG = nullptr;
  int64_t gs = H;  // the row stride of TG, tanh(g)
  if constexpr (std::is_same_v<scalar_t, float>) {
    sg = at::empty({L, N, G}, a.options());
    tcs = at::empty({L, N, H}, a.options());
    const float* A = ar.data_ptr<float>();
    for (const auto s : c10::irange(L)) {
      const int64_t t = d.reverse ? T - 1 - s : s, u = t - t0;
      lstm_gates(A + u * N * G, cp(t), CS + u * NH, sg.data_ptr<float>() + u * N * G,
                 tcs.data_ptr<float>() + u * NH, N, H);
    }
    S = sg.data_ptr<float>();
    TG = S + 2 * H;  // the g block of s
    gs = G;
  } else {
    sg = at::sigmoid(ar);
    tg = at::tanh(ar.narrow(2, 2 * H, H)).contiguous();
    S = sg.data_ptr<scalar_t>();
    TG = tg.data_ptr<scalar_t>();
    for (const auto s : c10::irange(L)) {
      const int64_t t = d.reverse ? T - 1 - s : s, u = t - t0;
      const scalar_t* c = cp(t);
      for (const auto n : c10::irange(N)) {
        const scalar_t* __restrict__ st = S + (u * N + n) * G;
        const scalar_t* __restrict__ gt = TG + u * NH + n * H;
        const scalar_t* __restrict__ cn = c + n * H;
        scalar_t* __restrict__ ct = CS + u * NH + n * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) ct[j] = st[j] * gt[j] + st[H + j] * cn[j];
      }
    }
    tcs = at::tanh(cs);
  }
  const scalar_t* TC = tcs.data_ptr<scalar_t>();
  // the recurrence: carry is dh of the step before (in the backward's order) less its dy
  Tensor carry = dh0;  // (B, N, H): the incoming dh, then the products with W_hh
  carry.copy_(dh);
  dc0.copy_(dc);
  scalar_t* C = carry.data_ptr<scalar_t>();
  scalar_t* DC = dc0.data_ptr<scalar_t>();
  Tensor carry2 = carry.view({B * N, H}), dG2 = dG.view({T, B * N, G});
  const scalar_t* DY = dy.data_ptr<scalar_t>();
  scalar_t* DG = dG.data_ptr<scalar_t>();
  // per step, the factors shared by the B columns: k = d a / d c (blocks i, f, g) and d a / d h
  // (block o), p = d c / d h (through h = o tanh(c)), and f; (N, 6, H)
  std::vector<scalar_t> kbuf(N * 6 * H);
  for (const auto s : c10::irange(T)) {
    const int64_t t = d.back(s), u = t - t0;
    if (s < T - L) {  // no column active yet
      std::fill_n(DG + t * B * N * G, B * N * G, scalar_t(0));
      continue;
    }
    lstm_factors(N, H, gs, S + u * N * G, TG + u * N * gs, TC + u * NH, cp(t), kbuf.data());
    for (const auto b : c10::irange(B)) {
      if (d.idle(s, b)) {
        std::fill_n(DG + (t * B + b) * N * G, N * G, scalar_t(0));
        continue;
      }
      lstm_column(N, H, kbuf.data(), DY + (t * B + b) * NH, C + b * NH, DC + b * NH,
                  DG + (t * B + b) * N * G);
    }
    d.product(carry2, dG2, whh, s);
  }
}

// dG, dgh (T, B, N, 3H) and dh0 (B, N, H) of the GRU from the input-side and hidden-side gate
// pre-activations gi, gh (T, N, 3H) and the states the steps started from, hprev (T, N, H).
template <typename scalar_t>
void gru_cpu(const Dims& d, const Tensor& gi, const Tensor& gh, const Tensor& hprev,
             const Tensor& whh, const Tensor& dy, const Tensor& dh, Tensor& dG, Tensor& dgh,
             Tensor& dh0) {
  const int64_t T = d.T, N = d.N, B = d.B, H = d.H, NH = N * H;
  const int64_t L = d.span(), t0 = d.first();  // the gates of the steps the backward reaches
  const Tensor gir = gi.narrow(0, t0, L), ghr = gh.narrow(0, t0, L);
  const Tensor rz = at::sigmoid(gir.narrow(2, 0, 2 * H).add(ghr.narrow(2, 0, 2 * H)));
  const Tensor nt = at::tanh(at::addcmul(gir.narrow(2, 2 * H, H), rz.narrow(2, 0, H),
                                         ghr.narrow(2, 2 * H, H)));
  // per step and unit: z, and the derivatives dr, dz, dn (input side) and dn * r (hidden side)
  std::vector<scalar_t> z(L * NH), k(L * NH * 4);
  const scalar_t *RZ = rz.data_ptr<scalar_t>(), *NT = nt.data_ptr<scalar_t>();
  const scalar_t *GH = ghr.data_ptr<scalar_t>(), *HP = hprev.narrow(0, t0, L).data_ptr<scalar_t>();
  for (const auto tn : c10::irange(L * N)) {
    const scalar_t* __restrict__ y = GH + tn * 3 * H;
    const scalar_t* __restrict__ hp = HP + tn * H;
    const scalar_t* __restrict__ q = RZ + tn * 2 * H;
    const scalar_t* __restrict__ nn = NT + tn * H;
    scalar_t* __restrict__ kk = k.data() + tn * 4 * H;  // (T, N, 4, H)
    scalar_t* __restrict__ zt = z.data() + tn * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const scalar_t r = q[j], zz = q[H + j], ghn = y[2 * H + j];
      const scalar_t dn = (1 - zz) * (1 - nn[j] * nn[j]);
      kk[j] = dn * ghn * r * (1 - r);
      kk[H + j] = (hp[j] - nn[j]) * zz * (1 - zz);
      kk[2 * H + j] = dn;
      kk[3 * H + j] = dn * r;
      zt[j] = zz;
    }
  }
  Tensor m = at::empty({B * N, H}, dh.options());
  m.zero_();
  Tensor hz = dh0;  // dh * z of the step before, then dh0 = hz + m
  hz.copy_(dh);
  scalar_t *M = m.data_ptr<scalar_t>(), *HZ = hz.data_ptr<scalar_t>();
  const scalar_t* DY = dy.data_ptr<scalar_t>();
  scalar_t *DG = dG.data_ptr<scalar_t>(), *DGH = dgh.data_ptr<scalar_t>();
  const Tensor dgh2 = dgh.view({T, B * N, 3 * H});
  for (const auto s : c10::irange(T)) {
    const int64_t t = d.back(s);
    for (const auto b : c10::irange(B)) {
      if (d.idle(s, b)) {
        std::fill_n(DG + (t * B + b) * N * 3 * H, N * 3 * H, scalar_t(0));
        std::fill_n(DGH + (t * B + b) * N * 3 * H, N * 3 * H, scalar_t(0));
        continue;
      }
      for (const auto n : c10::irange(N)) {
        const int64_t r = b * N + n, o = (t * B * N + r) * 3 * H;
        const scalar_t* __restrict__ dyt = DY + (t * B + b) * NH + n * H;
        const scalar_t* __restrict__ kk = k.data() + ((t - t0) * NH + n * H) * 4;
        const scalar_t* __restrict__ zt = z.data() + (t - t0) * NH + n * H;
        const scalar_t* __restrict__ mt = M + r * H;
        scalar_t* __restrict__ hzt = HZ + r * H;
        scalar_t* __restrict__ g = DG + o;
        scalar_t* __restrict__ gh = DGH + o;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const scalar_t dhv = dyt[j] + (hzt[j] + mt[j]);
          g[j] = dhv * kk[j];
          g[H + j] = dhv * kk[H + j];
          g[2 * H + j] = dhv * kk[2 * H + j];
          gh[j] = dhv * kk[j];
          gh[H + j] = dhv * kk[H + j];
          gh[2 * H + j] = dhv * kk[3 * H + j];
          hzt[j] = dhv * zt[j];
        }
      }
    }
    d.product(m, dgh2, whh, s);
  }
  hz.add_(m.view_as(hz));
}

// dG (T, B, N, H) and dh0 (B, N, H) of the Elman cells from their outputs ys (T, N, H).
template <typename scalar_t>
void rnn_cpu(const Dims& d, bool tanh_cell, const Tensor& ys, const Tensor& whh, const Tensor& dy,
             const Tensor& dh, Tensor& dG, Tensor& dh0) {
  const int64_t T = d.T, N = d.N, B = d.B, H = d.H, NH = N * H;
  const scalar_t* Y = ys.data_ptr<scalar_t>();
  const scalar_t* DY = dy.data_ptr<scalar_t>();
  scalar_t* DG = dG.data_ptr<scalar_t>();
  dh0.copy_(dh);
  scalar_t* C = dh0.data_ptr<scalar_t>();
  Tensor carry2 = dh0.view({B * N, H});
  const Tensor dG2 = dG.view({T, B * N, H});
  for (const auto s : c10::irange(T)) {
    const int64_t t = d.back(s);
    for (const auto b : c10::irange(B)) {
      if (d.idle(s, b)) {
        std::fill_n(DG + (t * B + b) * NH, NH, scalar_t(0));
        continue;
      }
      const scalar_t* __restrict__ y = Y + t * NH;
      const scalar_t* __restrict__ dyt = DY + (t * B + b) * NH;
      const scalar_t* __restrict__ ch = C + b * NH;
      scalar_t* __restrict__ g = DG + (t * B + b) * NH;
#pragma omp simd
      for (int64_t e = 0; e < NH; ++e) {
        const scalar_t dv = tanh_cell ? 1 - y[e] * y[e] : scalar_t(y[e] > 0 ? 1 : 0);
        g[e] = (dyt[e] + ch[e]) * dv;
      }
    }
    d.product(carry2, dG2, whh, s);
  }
}

void check_same(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type() && t.device() == ref.device(),
              "recurrent_bptt: ", name, " must have the dtype and device of whh (",
              ref.scalar_type(), ", ", ref.device(), "); got ", t.scalar_type(), ", ",
              t.device());
}

// The kernel on B cotangent columns: dy (T, B, N, H), dh and dc (B, N, H).
Out bptt_columns(const std::string& mode, at::TensorList saved, const Tensor& whh,
                 const Tensor& dy_, const Tensor& dh_, const std::optional<Tensor>& dc_,
                 bool reverse) {
  const int64_t gates = mode == "LSTM" ? 4 : mode == "GRU" ? 3 : 1;
  TORCH_CHECK(gates > 1 || mode == "RNN_TANH" || mode == "RNN_RELU",
              "recurrent_bptt: mode must be LSTM, GRU, RNN_TANH or RNN_RELU; got ", mode);
  const size_t nsaved = gates == 4 ? 2 : gates == 3 ? 3 : 1;
  TORCH_CHECK(saved.size() == nsaved, "recurrent_bptt: mode ", mode, " takes ", nsaved,
              " saved tensors; got ", saved.size());
  TORCH_CHECK(whh.device().is_cpu(), "recurrent_bptt: the CPU kernel needs CPU tensors");
  TORCH_CHECK(whh.dim() == 2 && whh.size(0) == gates * whh.size(1),
              "recurrent_bptt: whh must be (", gates, " H, H); got ", whh.sizes());
  TORCH_CHECK(dy_.dim() == 4, "recurrent_bptt: dys must be (T, N, H); got ", dy_.sizes());
  const int64_t H = whh.size(1), T = dy_.size(0), B = dy_.size(1), N = dy_.size(2);
  Dims d{T, N, B, H, reverse, {}};
  TORCH_CHECK(dy_.size(3) == H, "recurrent_bptt: dys must be (T, N, ", H, "); got ",
              dy_.sizes());
  TORCH_CHECK(dh_.sizes() == at::IntArrayRef({B, N, H}), "recurrent_bptt: dh must be (N, H) = (",
              N, ", ", H, ")");
  const bool lstm = gates == 4;
  TORCH_CHECK(lstm == dc_.has_value(), "recurrent_bptt: dc is given for an LSTM only");
  if (lstm) {
    TORCH_CHECK(dc_->sizes() == dh_.sizes(), "recurrent_bptt: dc must have the shape of dh");
    check_same(*dc_, whh, "dc");
  }
  check_same(dy_, whh, "dys");
  check_same(dh_, whh, "dh");
  std::vector<Tensor> sv;
  for (const auto& t : saved) {
    check_same(t, whh, "saved");
    sv.push_back(t.contiguous());
  }
  const std::vector<int64_t> step{T, N, gates * H}, state{N, H}, steps{T, N, H};
  const char* names = lstm ? "(a (T, N, 4H), c0 (N, H))"
                      : gates == 3 ? "(gi, gh (T, N, 3H), hprev (T, N, H))"
                                   : "(ys (T, N, H))";
  TORCH_CHECK(lstm   ? sv[0].sizes() == at::IntArrayRef(step) &&
                         sv[1].sizes() == at::IntArrayRef(state)
              : gates == 3 ? sv[0].sizes() == at::IntArrayRef(step) &&
                                 sv[1].sizes() == at::IntArrayRef(step) &&
                                 sv[2].sizes() == at::IntArrayRef(steps)
                           : sv[0].sizes() == at::IntArrayRef(steps),
              "recurrent_bptt: the saved tensors of mode ", mode, " must be ", names,
              " with T = ", T, ", N = ", N, ", H = ", H);
  const Tensor w = whh.contiguous(), dy = dy_.contiguous();
  const auto opts = whh.options();
  Tensor dG = at::empty({T, B, N, gates * H}, opts), dh0 = at::empty({B, N, H}, opts);
  Tensor dgh = at::empty({0}, opts), dc0 = at::empty({0}, opts);
  if (T == 0) {  // no step: the incoming state gradients pass through
    dh0.copy_(dh_);
    if (lstm) dc0 = dc_->clone();
    if (gates == 3) dgh = at::empty({T, B, N, 3 * H}, opts);
    return {dG, dgh, dh0, dc0};
  }
  AT_DISPATCH_FLOATING_TYPES(whh.scalar_type(), "recurrent_bptt", [&] {
    d.start = first_steps<scalar_t>(d, dy, dh_, lstm ? *dc_ : Tensor());
    if (lstm) {
      dc0 = at::empty({B, N, H}, opts);
      lstm_cpu<scalar_t>(d, sv[0], sv[1], w, dy, dh_, *dc_, dG, dh0, dc0);
    } else if (gates == 3) {
      dgh = at::empty({T, B, N, 3 * H}, opts);
      gru_cpu<scalar_t>(d, sv[0], sv[1], sv[2], w, dy, dh_, dG, dgh, dh0);
    } else {
      rnn_cpu<scalar_t>(d, mode == "RNN_TANH", sv[0], w, dy, dh_, dG, dh0);
    }
  });
  return {dG, dgh, dh0, dc0};
}

Out squeeze_columns(Out out) {
  auto& [dG, dgh, dh0, dc0] = out;
  return {dG.squeeze(1), dgh.dim() == 4 ? dgh.squeeze(1) : dgh, dh0.squeeze(0),
          dc0.dim() == 3 ? dc0.squeeze(0) : dc0};
}

Out recurrent_bptt_cpu(c10::string_view mode, at::TensorList saved, const Tensor& whh,
                       const Tensor& dys, const Tensor& dh, const std::optional<Tensor>& dc,
                       bool reverse) {
  TORCH_CHECK(dys.dim() == 3 && dh.dim() == 2, "recurrent_bptt: dys must be (T, N, H) and dh "
              "(N, H); got ", dys.sizes(), " and ", dh.sizes());
  std::optional<Tensor> dc1;
  if (dc.has_value()) {
    TORCH_CHECK(dc->dim() == 2, "recurrent_bptt: dc must be (N, H); got ", dc->sizes());
    dc1 = dc->unsqueeze(0);
  }
  return squeeze_columns(bptt_columns(std::string(mode), saved, whh, dys.unsqueeze(1),
                                      dh.unsqueeze(0), dc1, reverse));
}

// The Batched (legacy vmap) kernel: dys, dh, dc carry one batch dimension of B cotangents (those
// that do not are the same for every column); the saved tensors and whh carry none.
struct Columns {
  int64_t level = -1, size = -1;

  // t's columns moved to dimension `at`; a tensor without them expanded to `size`
  Tensor unwrap(const Tensor& t, int64_t at) const {
    const auto* impl = at::maybeGetBatchedImpl(t);
    if (impl == nullptr) {
      std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
      sizes.insert(sizes.begin() + at, size);
      return t.unsqueeze(at).expand(sizes);
    }
    return impl->value().movedim(impl->bdims().front().dim(), at);
  }

  void see(const Tensor& t, const char* name) {
    const auto* impl = at::maybeGetBatchedImpl(t);
    if (impl == nullptr) return;
    TORCH_CHECK(impl->bdims().size() == 1 && !at::isBatchedTensor(impl->value()),
                "recurrent_bptt: ", name, " must carry at most one batch dimension");
    const auto& bd = impl->bdims().front();
    const int64_t n = impl->value().size(bd.dim());
    TORCH_CHECK(level < 0 || (level == bd.level() && size == n),
                "recurrent_bptt: the gradients must be batched alike");
    level = bd.level();
    size = n;
  }
};

Out recurrent_bptt_batched(c10::string_view mode, at::TensorList saved, const Tensor& whh,
                           const Tensor& dys, const Tensor& dh, const std::optional<Tensor>& dc,
                           bool reverse) {
  TORCH_CHECK(!at::isBatchedTensor(whh), "recurrent_bptt: whh must not be batched");
  for (const auto& t : saved) {
    TORCH_CHECK(!at::isBatchedTensor(t), "recurrent_bptt: the saved tensors must not be batched");
  }
  Columns cols;
  cols.see(dys, "dys");
  cols.see(dh, "dh");
  if (dc.has_value()) cols.see(*dc, "dc");
  TORCH_CHECK(cols.level >= 0, "recurrent_bptt: the Batched kernel got no batched gradient");
  TORCH_CHECK(dys.dim() == 3 && dh.dim() == 2, "recurrent_bptt: dys must be (T, N, H) and dh "
              "(N, H) per column; got ", dys.sizes(), " and ", dh.sizes());
  std::optional<Tensor> dcb;
  if (dc.has_value()) dcb = cols.unwrap(*dc, 0);
  auto [dG, dgh, dh0, dc0] = bptt_columns(std::string(mode), saved, whh, cols.unwrap(dys, 1),
                                          cols.unwrap(dh, 0), dcb, reverse);
  const int64_t lv = cols.level;
  return {at::addBatchDim(dG, lv, 1), dgh.dim() == 4 ? at::addBatchDim(dgh, lv, 1) : dgh,
          at::addBatchDim(dh0, lv, 0), dc0.dim() == 3 ? at::addBatchDim(dc0, lv, 0) : dc0};
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CPU, m) { m.impl("recurrent_bptt", &recurrent_bptt_cpu); }

TORCH_LIBRARY_IMPL(fimfast, Batched, m) { m.impl("recurrent_bptt", &recurrent_bptt_batched); }

}  // namespace fimfast
