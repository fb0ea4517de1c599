// Argument checks of the fimfast ops, written once and called by both kernels of each op: the CPU
// kernel (csrc/cpu/<op>.cpp) and the CUDA binding (csrc/cuda/<op>_binding.cpp).
//
// Every message starts with the op's name and names the argument it is about, so a call of
// torch.ops.fimfast.<op> that skips the Python contracts (fimfast/ops/__init__.py) fails with the
// same error on every device. Host code only: the .cu files never include this header.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include "probe_modes.h"

namespace fimfast {
namespace checks {

// ---- argument kinds ------------------------------------------------------------------------

// `name` of `op` has `dim` dimensions
inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D; got shape ", t.sizes());
}

// the input dtypes every kernel reads (accumulation is float32, or float64 for float64 inputs)
inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// `name` of `op` is float16, bfloat16, float32 or float64
inline void check_float_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_kernel_float(t.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64; got ", t.scalar_type());
}

// `y` of `op` is on the device of `x`
inline void check_same_device(const char* op, const char* x_name, const at::Tensor& x,
                              const char* y_name, const at::Tensor& y) {
  TORCH_CHECK(x.device() == y.device(), op, ": ", y_name, " must be on the device of ", x_name,
              " (", x.device(), "); got ", y.device());
}

// ---- probe_logit_grad ----------------------------------------------------------------------

// logits (R, C) float, num_probes >= 1; returns the parsed mode
inline ProbeMode check_probe_logit_grad(const at::Tensor& logits, c10::string_view mode,
                                        int64_t num_probes) {
  check_dim("probe_logit_grad", "logits", logits, 2);
  check_float_input("probe_logit_grad", "logits", logits);
  TORCH_CHECK(num_probes >= 1, "probe_logit_grad: num_probes must be >= 1; got ", num_probes);
  ProbeMode parsed = ProbeMode::kHutchinson;
  try {
    parsed = parse_probe_mode(std::string(mode));
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  return parsed;
}

// labels of mode 'empirical' are given
inline void check_probe_labels_given(const std::optional<at::Tensor>& labels) {
  TORCH_CHECK(labels.has_value(), "probe_logit_grad: mode 'empirical' needs labels");
}

// labels of mode 'empirical' are (R,) and in [0, C); `lab` is the labels as contiguous int64, on
// either device. The first label out of range is named.
inline void check_probe_labels(const at::Tensor& lab, int64_t R, int64_t C) {
  TORCH_CHECK(lab.dim() == 1 && lab.size(0) == R, "probe_logit_grad: labels must have shape (", R,
              ",); got ", lab.sizes());
  if (!lab.is_cpu()) {
    // one reduction on the labels' device; only a failing call copies them to the host
    if (!lab.lt(0).logical_or(lab.ge(C)).any().item<bool>()) return;
  }
  const at::Tensor host = lab.cpu();  // the tensor itself when it is on the CPU
  const int64_t* y = host.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(y[r] >= 0 && y[r] < C, "probe_logit_grad: labels must be in [0, ", C,
                "); got labels[", r, "] = ", y[r]);
  }
}

// eigenpairs of mode 'rankk': lam (R, K), vec (R, K, C); returns K
inline int64_t check_probe_eig(const std::optional<at::Tensor>& lam,
                               const std::optional<at::Tensor>& vec, int64_t R, int64_t C) {
  TORCH_CHECK(lam.has_value() && vec.has_value(),
              "probe_logit_grad: mode 'rankk' needs eig (lam and vec)");
  TORCH_CHECK(lam->dim() == 2 && lam->size(0) == R, "probe_logit_grad: lam (eigenvalues) must be (",
              R, ", k); got ", lam->sizes());
  const int64_t K = lam->size(1);
  TORCH_CHECK(vec->dim() == 3 && vec->size(0) == R && vec->size(1) == K && vec->size(2) == C,
              "probe_logit_grad: vec (eigenvectors) must be (", R, ", ", K, ", ", C, "); got ",
              vec->sizes());
  check_float_input("probe_logit_grad", "lam", *lam);
  check_float_input("probe_logit_grad", "vec", *vec);
  return K;
}

// One probe_logit_grad call checked and laid out for its kernel, on either device: the kernel's
// arguments, its output (S, R, C) in the accumulation dtype (float64 for float64 logits, else
// float32), the labels as contiguous int64 (mode 'empirical') and the eigenpairs as contiguous
// accumulation-dtype tensors (mode 'rankk'), all on the device of the logits; the tensors a mode
// does not use are undefined.
struct ProbeCall {
  ProbeArgs args;
  at::Tensor out, labels, lam, vec;
};

inline ProbeCall prepare_probe_logit_grad(const at::Tensor& logits, c10::string_view mode,
                                          int64_t seed, int64_t offset, int64_t num_probes,
                                          const std::optional<at::Tensor>& labels,
                                          const std::optional<at::Tensor>& lam,
                                          const std::optional<at::Tensor>& vec, double sigma2) {
  ProbeCall call;
  ProbeArgs& a = call.args;
  a.mode = check_probe_logit_grad(logits, mode, num_probes);
  a.R = logits.size(0);
  a.C = logits.size(1);
  a.S = num_probes;
  a.K = 0;
  a.offset = static_cast<uint64_t>(offset);
  a.sign_keys = rng::make_keys(static_cast<uint64_t>(seed), rng::kStreamSign);
  a.unif_keys = rng::make_keys(static_cast<uint64_t>(seed), rng::kStreamUniform);
  a.sigma2 = sigma2;
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  call.out = at::empty({a.S, a.R, a.C}, logits.options().dtype(acc));
  if (call.out.numel() == 0) return call;
  if (a.mode == ProbeMode::kEmpirical) {
    check_probe_labels_given(labels);
    call.labels = labels->to(logits.device(), at::kLong).contiguous();
    check_probe_labels(call.labels, a.R, a.C);
  }
  if (a.mode == ProbeMode::kRankk) {
    a.K = check_probe_eig(lam, vec, a.R, a.C);
    call.lam = lam->to(logits.device(), acc).contiguous();
    call.vec = vec->to(logits.device(), acc).contiguous();
  }
  return call;
}

// ---- core_topk -----------------------------------------------------------------------------

// p (R, C) float, k in [1, C-1], solver 'exact' or 'power'; returns true for 'power'
inline bool check_core_topk(const at::Tensor& p, int64_t k, c10::string_view solver) {
  check_dim("core_topk", "p", p, 2);
  check_float_input("core_topk", "p", p);
  const int64_t C = p.size(1);
  TORCH_CHECK(k >= 1 && k <= C - 1, "core_topk: k must be in [1, C-1] = [1, ", C - 1, "]; got ", k);
  const std::string sol(solver);
  TORCH_CHECK(sol == "exact" || sol == "power",
              "core_topk: solver must be 'exact' or 'power'; got '", sol, "'");
  return sol == "power";
}

// ---- sq_matmul, shared_sq ------------------------------------------------------------------

// g (N, O) and a (N, I), float, one device
inline void check_sq_matmul(const at::Tensor& g, const at::Tensor& a) {
  check_dim("sq_matmul", "g", g, 2);
  check_dim("sq_matmul", "a", a, 2);
  TORCH_CHECK(g.size(0) == a.size(0), "sq_matmul: g and a must have the same N; got ", g.sizes(),
              " and ", a.sizes());
  check_float_input("sq_matmul", "g", g);
  check_float_input("sq_matmul", "a", a);
  check_same_device("sq_matmul", "g", g, "a", a);
}

// G (N, T, O) and A (N, T, I), float, one device
inline void check_shared_sq(const at::Tensor& G, const at::Tensor& A) {
  check_dim("shared_sq", "G", G, 3);
  check_dim("shared_sq", "A", A, 3);
  TORCH_CHECK(G.size(0) == A.size(0) && G.size(1) == A.size(1),
              "shared_sq: G and A must agree on (N, T); got ", G.sizes(), " and ", A.sizes());
  check_float_input("shared_sq", "G", G);
  check_float_input("shared_sq", "A", A);
  check_same_device("shared_sq", "G", G, "A", A);
}

// ---- pair_gram_ -----------------------------------------------------------------------------

// P: T >= 1 floating (M, N, O) tensors of one shape, on A's device; A (N, T (T + 1) / 2, O)
// float32/float64, contiguous.
inline void check_pair_gram(const at::Tensor& A, at::TensorList P) {
  TORCH_CHECK(!P.empty(), "pair_gram_: P must hold at least one position");
  const int64_t T = static_cast<int64_t>(P.size());
  for (const auto& p : P) {
    check_dim("pair_gram_", "P[t]", p, 3);
    check_float_input("pair_gram_", "P[t]", p);
    check_same_device("pair_gram_", "A", A, "P[t]", p);
    TORCH_CHECK(p.sizes() == P[0].sizes(), "pair_gram_: every P[t] must have P[0]'s shape ",
                P[0].sizes(), "; got ", p.sizes());
  }
  const int64_t N = P[0].size(1), O = P[0].size(2);
  TORCH_CHECK(A.dim() == 3 && A.size(0) == N && A.size(1) == T * (T + 1) / 2 && A.size(2) == O,
              "pair_gram_: A must be (N, T (T + 1) / 2, O) = (", N, ", ", T * (T + 1) / 2, ", ", O,
              "); got ", A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "pair_gram_: A must be float32 or float64; got ", A.scalar_type());
  TORCH_CHECK(A.is_contiguous(), "pair_gram_: A must be contiguous");
}

// ---- accumulate_ ---------------------------------------------------------------------------

// Every pair before any state is written (a bad pair leaves all states untouched): lists of one
// length, mode 'sum' or 'ema', states[i] float32/float64 shaped as grads[i], grads[i] float, all
// on the device of states[0]. Returns true for 'ema'.
inline bool check_accumulate(at::TensorList states, at::TensorList grads, c10::string_view mode) {
  TORCH_CHECK(states.size() == grads.size(), "accumulate_: states and grads differ in length: ",
              states.size(), " vs ", grads.size());
  const std::string md(mode);
  TORCH_CHECK(md == "sum" || md == "ema", "accumulate_: mode must be 'sum' or 'ema'; got '", md,
              "'");
  // the messages are formatted only on failure: this loop runs once per tensor pair per step
  for (size_t i = 0; i < states.size(); ++i) {
    const at::Tensor& s = states[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(s.sizes() == g.sizes(), "accumulate_: states[", i, "] and grads[", i,
                "] differ in shape: ", s.sizes(), " vs ", g.sizes());
    TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
                "accumulate_: states[", i, "] must be float32 or float64; got ", s.scalar_type());
    TORCH_CHECK(is_kernel_float(g.scalar_type()), "accumulate_: grads[", i,
                "] must be float16, bfloat16, float32 or float64; got ", g.scalar_type());
    TORCH_CHECK(s.device() == states[0].device(), "accumulate_: states[", i,
                "] must be on the device of states[0] (", states[0].device(), "); got ",
                s.device());
    TORCH_CHECK(g.device() == s.device(), "accumulate_: grads[", i,
                "] must be on the device of states[", i, "] (", s.device(), "); got ", g.device());
  }
  return md == "ema";
}

}  // namespace checks
}  // namespace fimfast
