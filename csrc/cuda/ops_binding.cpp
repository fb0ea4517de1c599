// Torch bindings of the CUDA kernels: TORCH_LIBRARY_IMPL(fimfast, CUDA, ...).
//
// Built only against a CUDA torch (setup.py adds csrc/cuda/*_binding.cpp with WITH_CUDA): the
// kernels themselves (csrc/cuda/*.cu) see raw pointers and a cudaStream_t only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "fimfast_cuda.h"
#include "fimfast_rng.h"
#include "probe_modes.h"

namespace fimfast {
namespace {

cuda::DType dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::kF32;
    case at::kDouble:
      return cuda::kF64;
    case at::kHalf:
      return cuda::kF16;
    case at::kBFloat16:
      return cuda::kBF16;
    default:
      TORCH_CHECK(false, what, " must be float16, bfloat16, float32 or float64; got ",
                  t.scalar_type());
  }
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

int sm_count(const at::Tensor& t) {
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.device().index()),
             "cudaDeviceGetAttribute");
  return n;
}

// the dtype both inputs of a squared product are read in: the wider of the two (fp32 when two
// different 16-bit types meet), so one kernel instance serves every pair
at::ScalarType common_input_dtype(const at::Tensor& x, const at::Tensor& y) {
  if (x.scalar_type() == at::kDouble || y.scalar_type() == at::kDouble) return at::kDouble;
  if (x.scalar_type() == y.scalar_type()) return x.scalar_type();
  return at::kFloat;
}

at::Tensor probe_logit_grad_cuda(const at::Tensor& logits, c10::string_view mode, int64_t seed,
                                 int64_t offset, int64_t num_probes,
                                 const std::optional<at::Tensor>& labels,
                                 const std::optional<at::Tensor>& lam,
                                 const std::optional<at::Tensor>& vec, double sigma2) {
  TORCH_CHECK(logits.dim() == 2, "probe_logit_grad: logits must be 2-D; got ", logits.sizes());
  TORCH_CHECK(num_probes >= 1, "probe_logit_grad: num_probes must be >= 1; got ", num_probes);
  const c10::cuda::CUDAGuard guard(logits.device());
  ProbeArgs a;
  try {
    a.mode = parse_probe_mode(std::string(mode));
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  a.R = logits.size(0);
  a.C = logits.size(1);
  a.S = num_probes;
  a.K = 0;
  a.offset = static_cast<uint64_t>(offset);
  a.sign_keys = rng::make_keys(static_cast<uint64_t>(seed), rng::kStreamSign);
  a.unif_keys = rng::make_keys(static_cast<uint64_t>(seed), rng::kStreamUniform);
  a.sigma2 = sigma2;
  const bool f64 = logits.scalar_type() == at::kDouble;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({a.S, a.R, a.C}, logits.options().dtype(acc));
  if (out.numel() == 0) return out;
  at::Tensor lab, lam_c, vec_c;
  if (a.mode == ProbeMode::kEmpirical) {
    TORCH_CHECK(labels.has_value(), "probe_logit_grad: mode 'empirical' needs labels");
    lab = labels->to(logits.device(), at::kLong).contiguous();
    TORCH_CHECK(lab.dim() == 1 && lab.size(0) == a.R, "probe_logit_grad: labels must have shape (",
                a.R, ",); got ", lab.sizes());
    TORCH_CHECK(!lab.lt(0).logical_or(lab.ge(a.C)).any().item<bool>(),
                "probe_logit_grad: labels must be in [0, ", a.C, ")");
  }
  if (a.mode == ProbeMode::kRankk) {
    TORCH_CHECK(lam.has_value() && vec.has_value(), "probe_logit_grad: mode 'rankk' needs eig");
    TORCH_CHECK(lam->dim() == 2 && lam->size(0) == a.R,
                "probe_logit_grad: eigenvalues must be (", a.R, ", k); got ", lam->sizes());
    a.K = lam->size(1);
    TORCH_CHECK(vec->dim() == 3 && vec->size(0) == a.R && vec->size(1) == a.K &&
                    vec->size(2) == a.C,
                "probe_logit_grad: eigenvectors must be (", a.R, ", ", a.K, ", ", a.C, "); got ",
                vec->sizes());
    lam_c = lam->to(logits.device(), acc).contiguous();
    vec_c = vec->to(logits.device(), acc).contiguous();
  }
  check_cuda(cuda::probe_logit_grad(
                 logits.const_data_ptr(), dtype_of(logits, "logits"), logits.stride(0),
                 logits.stride(1), lab.defined() ? lab.const_data_ptr<int64_t>() : nullptr,
                 lam_c.defined() ? lam_c.const_data_ptr() : nullptr,
                 vec_c.defined() ? vec_c.const_data_ptr() : nullptr, 1.0 / std::sqrt(sigma2),
                 out.mutable_data_ptr(), f64, a, stream_of(logits)),
             "probe_logit_grad");
  return out;
}

std::tuple<at::Tensor, at::Tensor> core_topk_cuda(const at::Tensor& p_in, int64_t k,
                                                   c10::string_view solver, int64_t iters) {
  TORCH_CHECK(p_in.dim() == 2, "core_topk: p must be 2-D; got ", p_in.sizes());
  const int64_t R = p_in.size(0), C = p_in.size(1);
  TORCH_CHECK(k >= 1 && k <= C - 1, "core_topk: k must be in [1, C-1] = [1, ", C - 1, "]; got ", k);
  const std::string sol(solver);
  TORCH_CHECK(sol == "exact" || sol == "power",
              "core_topk: solver must be 'exact' or 'power'; got '", sol, "'");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const bool f64 = p_in.scalar_type() == at::kDouble;
  const at::Tensor p = p_in.to(f64 ? at::kDouble : at::kFloat).contiguous();
  at::Tensor lam = at::empty({R, k}, p.options());
  at::Tensor vec = at::empty({R, k, C}, p.options());
  check_cuda(cuda::core_topk(p.const_data_ptr(), f64, R, C, k, sol == "power", iters,
                             lam.mutable_data_ptr(), vec.mutable_data_ptr(), stream_of(p)),
             "core_topk");
  return {lam, vec};
}

at::Tensor sq_matmul_cuda(const at::Tensor& g_in, const at::Tensor& a_in) {
  TORCH_CHECK(g_in.dim() == 2 && a_in.dim() == 2, "sq_matmul: g and a must be 2-D; got ",
              g_in.sizes(), " and ", a_in.sizes());
  TORCH_CHECK(g_in.size(0) == a_in.size(0), "sq_matmul: g and a must have the same N; got ",
              g_in.sizes(), " and ", a_in.sizes());
  const c10::cuda::CUDAGuard guard(g_in.device());
  const auto in_dt = common_input_dtype(g_in, a_in);
  const at::Tensor g = g_in.to(in_dt), a = a_in.to(in_dt);
  const int64_t N = g.size(0), O = g.size(1), I = a.size(1);
  const bool f64 = in_dt == at::kDouble;
  const auto opts = g.options().dtype(f64 ? at::kDouble : at::kFloat);
  if (N == 0 || O == 0 || I == 0) return at::zeros({O, I}, opts);
  const int64_t splits = cuda::sq_splits(N, O, I, f64, sm_count(g));
  at::Tensor out = at::empty({splits, O, I}, opts);
  check_cuda(cuda::sq_matmul(g.const_data_ptr(), a.const_data_ptr(), dtype_of(g, "g"),
                             g.stride(0), g.stride(1), a.stride(0), a.stride(1), N, O, I, f64,
                             splits, out.mutable_data_ptr(), stream_of(g)),
             "sq_matmul");
  return splits == 1 ? out.select(0, 0) : out.sum(0);
}

at::Tensor shared_sq_cuda(const at::Tensor& G_in, const at::Tensor& A_in) {
  TORCH_CHECK(G_in.dim() == 3 && A_in.dim() == 3, "shared_sq: G and A must be 3-D; got ",
              G_in.sizes(), " and ", A_in.sizes());
  TORCH_CHECK(G_in.size(0) == A_in.size(0) && G_in.size(1) == A_in.size(1),
              "shared_sq: G and A must agree on (N, T); got ", G_in.sizes(), " and ",
              A_in.sizes());
  const c10::cuda::CUDAGuard guard(G_in.device());
  const auto in_dt = common_input_dtype(G_in, A_in);
  const at::Tensor G = G_in.to(in_dt), A = A_in.to(in_dt);
  const int64_t N = G.size(0), T = G.size(1), O = G.size(2), I = A.size(2);
  const bool f64 = in_dt == at::kDouble;
  const auto opts = G.options().dtype(f64 ? at::kDouble : at::kFloat);
  if (N == 0 || O == 0 || I == 0) return at::zeros({O, I}, opts);
  const int64_t splits = cuda::shared_splits(N, O, I, sm_count(G));
  at::Tensor out = at::empty({splits, O, I}, opts);
  const int64_t gs[3] = {G.stride(0), G.stride(1), G.stride(2)};
  const int64_t as[3] = {A.stride(0), A.stride(1), A.stride(2)};
  check_cuda(cuda::shared_sq(G.const_data_ptr(), A.const_data_ptr(), dtype_of(G, "G"), gs, as,
                             N, T, O, I, f64, splits, out.mutable_data_ptr(), stream_of(G)),
             "shared_sq");
  return splits == 1 ? out.select(0, 0) : out.sum(0);
}

void accumulate_cuda_(at::TensorList states, at::TensorList grads, c10::string_view mode,
                      double beta, double scale) {
  TORCH_CHECK(states.size() == grads.size(), "accumulate_: states and grads differ in length: ",
              states.size(), " vs ", grads.size());
  const std::string md(mode);
  TORCH_CHECK(md == "sum" || md == "ema", "accumulate_: mode must be 'sum' or 'ema'; got '", md,
              "'");
  if (states.empty()) return;
  const c10::cuda::CUDAGuard guard(states[0].device());
  std::vector<at::Tensor> keep;  // contiguous copies, alive until the launches are queued
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
  std::vector<cuda::AccumulateItem> items;
  for (size_t i = 0; i < states.size(); ++i) {
    const at::Tensor& s = states[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(s.sizes() == g.sizes(), "accumulate_: states[", i, "] and grads[", i,
                "] differ in shape: ", s.sizes(), " vs ", g.sizes());
    TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
                "accumulate_: states[", i, "] must be float32 or float64; got ", s.scalar_type());
    TORCH_CHECK(s.device() == states[0].device() && g.device() == s.device(),
                "accumulate_: states[", i, "] and grads[", i, "] must be on ", states[0].device());
    const cuda::DType gd = dtype_of(g, "grads");
    if (s.numel() == 0) continue;
    at::Tensor sc = s.is_contiguous() ? s : s.contiguous();
    if (!s.is_contiguous()) copy_back.emplace_back(s, sc);
    at::Tensor gc = g.contiguous();
    items.push_back({sc.mutable_data_ptr(), gc.const_data_ptr(), s.numel(),
                     dtype_of(sc, "states"), gd});
    keep.push_back(sc);
    keep.push_back(gc);
  }
  const double alpha = md == "ema" ? (1.0 - beta) * scale : scale;
  check_cuda(cuda::accumulate(items.data(), static_cast<int64_t>(items.size()), md == "ema", beta,
                              alpha, stream_of(states[0])),
             "accumulate_");
  for (auto& [dst, src] : copy_back) dst.copy_(src);
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CUDA, m) {
  m.impl("probe_logit_grad", &probe_logit_grad_cuda);
  m.impl("core_topk", &core_topk_cuda);
  m.impl("sq_matmul", &sq_matmul_cuda);
  m.impl("shared_sq", &shared_sq_cuda);
  m.impl("accumulate_", &accumulate_cuda_);
}

}  // namespace fimfast
