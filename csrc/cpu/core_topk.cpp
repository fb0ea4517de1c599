// core_topk on the CPU: top-k eigenpairs of diag(p) - p p^T, one row per task.
//
// "exact": the secular solver of fimfast/ops/torch_ref.py (core_topk_torch) row by row, in the
// same sorted order; the iteration stops per eigenvalue (instead of when the whole batch has
// converged) once tau stops moving relative to itself. "power": power iteration with modified Gram-Schmidt, as the
// reference.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "fimfast_checks.h"

namespace fimfast {
namespace {

// g(lambda) = sum_c qs_c / ((qs_c - origin) - tau) and its derivative (see _secular)
template <typename T>
inline void secular(const T* qs, int64_t C, T origin, T tau, T* g, T* dg) {
  T s = 0, ds = 0;
  for (int64_t c = 0; c < C; ++c) {
    const T delta = (qs[c] - origin) - tau;
    const T r = qs[c] / delta;
    s += r;
    ds += r / delta;
  }
  *g = s;
  *dg = ds;
}

// entries within this many ulps of the largest magnitude count as equally large (torch_ref's
// SIGN_TIE_ULPS): the first of them, in class order, decides the sign
constexpr int kSignTieUlps = 64;

// flip v so that its largest-magnitude entry (the first near-largest, in class order) is positive
template <typename T>
inline void fix_sign(T* v, int64_t C) {
  T amax = 0;
  for (int64_t c = 0; c < C; ++c) amax = std::max(amax, std::abs(v[c]));
  const T thr = amax * (T(1) - kSignTieUlps * std::numeric_limits<T>::epsilon());
  for (int64_t c = 0; c < C; ++c) {
    if (std::abs(v[c]) >= thr) {
      if (v[c] < 0) {
        for (int64_t d = 0; d < C; ++d) v[d] = -v[d];
      }
      return;
    }
  }
}

template <typename T>
void exact_row(const T* prow, int64_t C, int64_t K, T* lam, T* vec, std::vector<int64_t>& perm,
               std::vector<T>& q, std::vector<T>& qs, std::vector<T>& v) {
  const T eps = std::numeric_limits<T>::epsilon();
  std::iota(perm.begin(), perm.end(), int64_t(0));
  // ascending, ties by class index: the order every backend uses for tied probabilities
  std::sort(perm.begin(), perm.end(), [&](int64_t x, int64_t y) {
    return prow[x] < prow[y] || (prow[x] == prow[y] && x < y);
  });
  for (int64_t c = 0; c < C; ++c) q[c] = prow[perm[c]];
  for (int64_t j = 0; j < K; ++j) {
    const int64_t a = C - 1 - j;
    const T hi = q[a], lo = q[a - 1];
    const bool tie = (hi - lo) <= 8 * eps * hi;
    const bool zlo = (lo <= 0) && !tie;
    const T scale = hi > 0 ? hi : T(1);
    for (int64_t c = 0; c < C; ++c) qs[c] = q[c] / scale;
    const T lo_s = lo / scale, hi_s = hi / scale;
    const T gap = hi_s - lo_s;
    T origin = 0, tau = 0;
    if (!tie && !zlo) {
      const T mid = T(0.5) * (lo_s + hi_s);
      T g_mid, dg_mid;
      secular(qs.data(), C, mid, T(0), &g_mid, &dg_mid);
      const bool left = g_mid >= 0;
      origin = left ? lo_s : hi_s;
      T t_lo = left ? T(0) : T(-0.5) * gap;
      T t_hi = left ? T(0.5) * gap : T(0);
      tau = T(0.5) * (t_lo + t_hi);
      for (int it = 0; it < 200; ++it) {
        T g, dg;
        secular(qs.data(), C, origin, tau, &g, &dg);
        if (g < 0) t_lo = tau;
        if (g > 0) t_hi = tau;
        // rational step of the pole at the origin, else Newton, else bisection (as the reference)
        const T s_ = dg * tau * tau;
        const T rational = s_ / (g + s_ / tau);
        const T newton = tau - g / dg;
        const bool ok_r =
            rational > t_lo && rational < t_hi && std::isfinite(rational) && rational != tau;
        const bool ok_n = newton > t_lo && newton < t_hi && std::isfinite(newton) && newton != tau;
        const T nxt = ok_r ? rational : (ok_n ? newton : T(0.5) * (t_lo + t_hi));
        // converged when tau itself (the distance to the nearest pole) stops moving: tighter
        // than the reference's test on lambda = origin + tau, and what the eigenvector
        // p_c / (p_c - lambda) needs when lambda sits between two close poles (the reference's
        // test left 8e-5 of eigenvector error where this one leaves 5e-8, float32, C = 513)
        const bool done = g == 0 || std::abs(nxt - tau) <= 2 * eps * std::abs(tau);
        if (g != 0) tau = nxt;
        if (done) break;
      }
    }
    bool bad = false;
    for (int64_t c = 0; c < C; ++c) {
      v[c] = qs[c] / ((qs[c] - origin) - tau);
      bad |= !std::isfinite(v[c]);
    }
    T lj = tie ? hi : (origin + tau) * scale;
    if (zlo) {
      // eigenvalue 0 of the zero classes: the indicator of the zero group
      lj = 0;
      for (int64_t c = 0; c < C; ++c) v[c] = q[c] <= 0 ? T(1) : T(0);
    } else if (tie) {
      // Helmert vector of the tie group ending at sorted position a
      const T qa = q[a];
      int64_t start = 0;
      for (int64_t c = a - 1; c >= 0; --c) {
        if (qa - q[c] > 8 * eps * qa) {
          start = c + 1;
          break;
        }
      }
      const T i = static_cast<T>(a - start);
      for (int64_t c = 0; c < C; ++c) v[c] = (c >= start && c < a) ? T(1) : T(0);
      v[a] = -i;
    } else if (bad) {
      // a root on a pole to within rounding: the class of the infinite entry alone
      for (int64_t c = 0; c < C; ++c) v[c] = std::isfinite(v[c]) ? T(0) : T(1);
    }
    T nrm2 = 0;
    for (int64_t c = 0; c < C; ++c) nrm2 += v[c] * v[c];
    const T nrm = std::sqrt(nrm2);
    lam[j] = lj;
    T* out = vec + j * C;
    for (int64_t c = 0; c < C; ++c) out[perm[c]] = v[c] / nrm;
    fix_sign(out, C);
  }
}

// I v = p * v - p (p . v), in place into w
template <typename T>
inline void apply_core(const T* p, const T* v, T* w, int64_t C) {
  T pv = 0;
  for (int64_t c = 0; c < C; ++c) pv += p[c] * v[c];
  for (int64_t c = 0; c < C; ++c) w[c] = p[c] * v[c] - p[c] * pv;
}

template <typename T>
void power_row(const T* p, int64_t C, int64_t K, int64_t iters, T* lam, T* V,
               std::vector<int64_t>& perm, std::vector<T>& w) {
  const T tiny = std::numeric_limits<T>::min();
  // start vectors e_{top_j} - 1/C, top by descending probability (ties: lower class first)
  std::iota(perm.begin(), perm.end(), int64_t(0));
  std::partial_sort(perm.begin(), perm.begin() + K, perm.end(), [&](int64_t x, int64_t y) {
    return p[x] > p[y] || (p[x] == p[y] && x < y);
  });
  for (int64_t j = 0; j < K; ++j) {
    T* v = V + j * C;
    for (int64_t c = 0; c < C; ++c) v[c] = -T(1) / static_cast<T>(C);
    v[perm[j]] += T(1);
  }
  auto gram_schmidt = [&](int64_t j) {
    T* x = V + j * C;
    for (int64_t i = 0; i < j; ++i) {
      const T* y = V + i * C;
      T d = 0;
      for (int64_t c = 0; c < C; ++c) d += x[c] * y[c];
      for (int64_t c = 0; c < C; ++c) x[c] -= d * y[c];
    }
    T n2 = 0;
    for (int64_t c = 0; c < C; ++c) n2 += x[c] * x[c];
    const T n = std::max(std::sqrt(n2), tiny);
    for (int64_t c = 0; c < C; ++c) x[c] /= n;
  };
  for (int64_t it = 0; it < iters; ++it) {
    for (int64_t j = 0; j < K; ++j) {
      T* v = V + j * C;
      apply_core(p, v, w.data(), C);
      std::copy(w.begin(), w.begin() + C, v);
      gram_schmidt(j);
    }
  }
  for (int64_t j = 0; j < K; ++j) {
    T* v = V + j * C;
    apply_core(p, v, w.data(), C);
    T l = 0;
    for (int64_t c = 0; c < C; ++c) l += v[c] * w[c];
    lam[j] = l;
    fix_sign(v, C);
  }
}

std::tuple<at::Tensor, at::Tensor> core_topk_cpu(const at::Tensor& p_in, int64_t k,
                                                  c10::string_view solver, int64_t iters) {
  const bool power = checks::check_core_topk(p_in, k, solver);
  const int64_t R = p_in.size(0), C = p_in.size(1);
  const auto dt = p_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor p = p_in.to(dt).contiguous();
  at::Tensor lam = at::empty({R, k}, p.options());
  at::Tensor vec = at::empty({R, k, C}, p.options());
  if (R == 0) return {lam, vec};
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(C * k, 1));
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const T* pp = p.const_data_ptr<T>();
    T* lp = lam.mutable_data_ptr<T>();
    T* vp = vec.mutable_data_ptr<T>();
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      std::vector<int64_t> perm(C);
      std::vector<T> q(C), qs(C), v(C);
      for (int64_t r = r0; r < r1; ++r) {
        if (!power) {
          exact_row<T>(pp + r * C, C, k, lp + r * k, vp + r * k * C, perm, q, qs, v);
        } else {
          power_row<T>(pp + r * C, C, k, iters, lp + r * k, vp + r * k * C, perm, v);
        }
      }
    });
  };
  if (dt == at::kDouble) {
    run(double(0));
  } else {
    run(float(0));
  }
  return {lam, vec};
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CPU, m) { m.impl("core_topk", &core_topk_cpu); }

}  // namespace fimfast
