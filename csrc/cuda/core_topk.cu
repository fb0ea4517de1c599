// core_topk on the GPU: one thread block per row of probabilities.
//
// No sort: class c is "taken" once an eigenvalue above it used it as its upper pole, which is
// (p_c, c) > (hi, ia) in the order (probability, class index); the next pole pair is a block
// argmax over the classes not taken. "exact" runs the safeguarded rational/Newton/bisection
// iteration of fimfast/ops/torch_ref.py on the secular equation (two block sums per step), with
// the reference's tie (Helmert) and zero-probability (indicator) eigenvectors; "power" runs power
// iteration with modified Gram-Schmidt, each thread updating its own classes of the k vectors in
// the output. Signs follow torch_ref.fix_signs.
#include <cuda_runtime.h>
#include <math.h>

#include <cfloat>

#include "cuda_common.cuh"
#include "fimfast_cuda.h"

namespace fimfast {
namespace cuda {
namespace {

constexpr int kSignTieUlps = 64;  // torch_ref.SIGN_TIE_ULPS

template <typename T>
struct Limits;
template <>
struct Limits<float> {
  static __device__ __forceinline__ float eps() { return FLT_EPSILON; }
  static __device__ __forceinline__ float tiny() { return FLT_MIN; }
};
template <>
struct Limits<double> {
  static __device__ __forceinline__ double eps() { return DBL_EPSILON; }
  static __device__ __forceinline__ double tiny() { return DBL_MIN; }
};

template <typename T>
struct Scratch {
  T v[32];
  int64_t i[32];
};

// class c ranks below (hv, hi_idx) in the order (probability, class index)
template <typename T>
__device__ __forceinline__ bool below(T pc, int64_t c, T hv, int64_t hi_idx) {
  return pc < hv || (pc == hv && c < hi_idx);
}

// the largest (probability, class) among the classes below (bound_v, bound_i)
template <typename T>
__device__ void argmax_below(const T* p, int64_t C, T bound_v, int64_t bound_i, T* best_v,
                             int64_t* best_i, Scratch<T>& sc) {
  T lv = -1;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    if (below(p[c], c, bound_v, bound_i) && p[c] > lv) lv = p[c];
  }
  const T v = block_allreduce(lv, MaxOp(), sc.v);
  int64_t li = -1;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    if (below(p[c], c, bound_v, bound_i) && p[c] == v && c > li) li = c;
  }
  *best_i = block_allreduce(li, MaxOp(), sc.i);
  *best_v = v;
}

// g = sum q/delta, dg = sum q/delta^2, delta = (q - origin) - tau, q = p/scale
template <typename T>
__device__ void secular(const T* p, int64_t C, T scale, T origin, T tau, T* g, T* dg,
                        Scratch<T>& sc) {
  T s = 0, ds = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const T q = p[c] / scale;
    const T delta = (q - origin) - tau;
    const T rr = q / delta;
    s += rr;
    ds += rr / delta;
  }
  *g = block_allreduce(s, SumOp(), sc.v);
  *dg = block_allreduce(ds, SumOp(), sc.v);
}

// normalise row v (own classes of this thread), then apply the sign rule
template <typename T>
__device__ void normalise_and_sign(T* v, int64_t C, Scratch<T>& sc) {
  T l2 = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) l2 += v[c] * v[c];
  const T nrm = sqrt(block_allreduce(l2, SumOp(), sc.v));
  T lmax = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    v[c] /= nrm;
    lmax = fabs(v[c]) > lmax ? fabs(v[c]) : lmax;
  }
  const T amax = block_allreduce(lmax, MaxOp(), sc.v);
  const T thr = amax * (T(1) - kSignTieUlps * Limits<T>::eps());
  int64_t lfirst = C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    if (fabs(v[c]) >= thr && c < lfirst) lfirst = c;
  }
  const int64_t first = block_allreduce(lfirst, MinOp(), sc.i);  // syncs: v[first] is visible
  const bool flip = v[first] < 0;
  __syncthreads();  // every thread has read v[first] before its owner may negate it
  if (flip) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) v[c] = -v[c];
  }
}

template <typename T>
__global__ void exact_kernel(const T* __restrict__ P, int64_t C, int64_t K, T* __restrict__ L,
                             T* __restrict__ V) {
  __shared__ Scratch<T> sc;
  const int64_t r = blockIdx.x;
  const T* p = P + r * C;
  const T eps = Limits<T>::eps();
  T prev_v = INFINITY;
  int64_t prev_i = C;
  for (int64_t j = 0; j < K; ++j) {
    T hi, lo;
    int64_t ia, ilo;
    argmax_below(p, C, prev_v, prev_i, &hi, &ia, sc);
    argmax_below(p, C, hi, ia, &lo, &ilo, sc);
    const bool tie = (hi - lo) <= 8 * eps * hi;
    const bool zlo = (lo <= 0) && !tie;
    const T scale = hi > 0 ? hi : T(1);
    const T lo_s = lo / scale, hi_s = hi / scale, gap = hi_s - lo_s;
    T origin = -1, tau = 0;  // fixed pairs: off every pole (q >= 0); the vector is replaced
    if (!tie && !zlo) {
      T g_mid, dg_mid;
      secular(p, C, scale, T(0.5) * (lo_s + hi_s), T(0), &g_mid, &dg_mid, sc);
      const bool left = g_mid >= 0;
      origin = left ? lo_s : hi_s;
      T t_lo = left ? T(0) : T(-0.5) * gap;
      T t_hi = left ? T(0.5) * gap : T(0);
      tau = T(0.5) * (t_lo + t_hi);
      for (int it = 0; it < 200; ++it) {
        T g, dg;
        secular(p, C, scale, origin, tau, &g, &dg, sc);
        if (g < 0) t_lo = tau;
        if (g > 0) t_hi = tau;
        const T s_ = dg * tau * tau;
        const T rational = s_ / (g + s_ / tau);
        const T newton = tau - g / dg;
        const bool ok_r = rational > t_lo && rational < t_hi && isfinite(rational) &&
                          rational != tau;
        const bool ok_n = newton > t_lo && newton < t_hi && isfinite(newton) && newton != tau;
        const T nxt = ok_r ? rational : (ok_n ? newton : T(0.5) * (t_lo + t_hi));
        // converged when tau (the distance to the nearest pole) stops moving relative to itself
        const bool done = g == 0 || fabs(nxt - tau) <= 2 * eps * fabs(tau);
        if (g != 0) tau = nxt;
        if (done) break;  // every thread holds the same g and tau: uniform control flow
      }
    }
    T* v = V + (r * K + j) * C;
    int64_t bad_l = 0;
    T n_mem_l = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const T q = p[c] / scale;
      v[c] = q / ((q - origin) - tau);
      bad_l |= isfinite(v[c]) ? 0 : 1;
      n_mem_l += (below(p[c], c, hi, ia) && (hi - p[c]) <= 8 * eps * hi) ? T(1) : T(0);
    }
    const bool bad = block_allreduce(bad_l, MaxOp(), sc.i) != 0;
    const T n_mem = block_allreduce(n_mem_l, SumOp(), sc.v);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      if (zlo) {
        v[c] = p[c] <= 0 ? T(1) : T(0);  // eigenvalue 0: indicator of the zero classes
      } else if (tie) {
        // Helmert vector of the tie group below ia: 1 on the group, -size at ia
        const bool member = below(p[c], c, hi, ia) && (hi - p[c]) <= 8 * eps * hi;
        v[c] = member ? T(1) : (c == ia ? -n_mem : T(0));
      } else if (bad) {
        v[c] = isfinite(v[c]) ? T(0) : T(1);  // a root on a pole: that class alone
      }
    }
    normalise_and_sign(v, C, sc);
    if (threadIdx.x == 0) L[r * K + j] = tie ? hi : (zlo ? T(0) : (origin + tau) * scale);
    prev_v = hi;
    prev_i = ia;
  }
}

// w <- I v = p*v - p (p.v) on this thread's classes; returns nothing (w may alias v)
template <typename T>
__device__ void apply_core(const T* p, const T* v, T* w, int64_t C, Scratch<T>& sc) {
  T l = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) l += p[c] * v[c];
  const T pv = block_allreduce(l, SumOp(), sc.v);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) w[c] = p[c] * v[c] - p[c] * pv;
}

template <typename T>
__global__ void power_kernel(const T* __restrict__ P, int64_t C, int64_t K, int64_t iters,
                             T* __restrict__ L, T* __restrict__ V) {
  __shared__ Scratch<T> sc;
  const int64_t r = blockIdx.x;
  const T* p = P + r * C;
  T* Vr = V + r * K * C;
  // start vectors e_top_j - 1/C, top by descending probability, ties to the lower class: the
  // classes not taken are those below (prev_v, -prev_i) in the order (probability, -index)
  T prev_v = INFINITY;
  int64_t prev_i = -1;
  for (int64_t j = 0; j < K; ++j) {
    T lv = -1;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const bool avail = p[c] < prev_v || (p[c] == prev_v && c > prev_i);
      if (avail && p[c] > lv) lv = p[c];
    }
    const T hv = block_allreduce(lv, MaxOp(), sc.v);
    int64_t li = C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const bool avail = p[c] < prev_v || (p[c] == prev_v && c > prev_i);
      if (avail && p[c] == hv && c < li) li = c;
    }
    const int64_t idx = block_allreduce(li, MinOp(), sc.i);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      Vr[j * C + c] = (c == idx ? T(1) : T(0)) - T(1) / static_cast<T>(C);
    }
    prev_v = hv;
    prev_i = idx;
  }
  for (int64_t it = 0; it < iters; ++it) {
    for (int64_t j = 0; j < K; ++j) {
      T* w = Vr + j * C;
      apply_core(p, w, w, C, sc);
      for (int64_t i = 0; i < j; ++i) {
        const T* y = Vr + i * C;
        T l = 0;
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) l += w[c] * y[c];
        const T d = block_allreduce(l, SumOp(), sc.v);
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) w[c] -= d * y[c];
      }
      T l2 = 0;
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) l2 += w[c] * w[c];
      T nrm = sqrt(block_allreduce(l2, SumOp(), sc.v));
      nrm = nrm > Limits<T>::tiny() ? nrm : Limits<T>::tiny();
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) w[c] /= nrm;
    }
  }
  for (int64_t j = 0; j < K; ++j) {
    T* v = Vr + j * C;
    T l = 0, pv_l = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) pv_l += p[c] * v[c];
    const T pv = block_allreduce(pv_l, SumOp(), sc.v);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) l += v[c] * (p[c] * v[c] - p[c] * pv);
    const T lam = block_allreduce(l, SumOp(), sc.v);
    if (threadIdx.x == 0) L[r * K + j] = lam;
    // the sign rule (the vector is already unit: no normalisation, as the reference)
    T lmax = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      lmax = fabs(v[c]) > lmax ? fabs(v[c]) : lmax;
    }
    const T amax = block_allreduce(lmax, MaxOp(), sc.v);
    const T thr = amax * (T(1) - kSignTieUlps * Limits<T>::eps());
    int64_t lfirst = C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      if (fabs(v[c]) >= thr && c < lfirst) lfirst = c;
    }
    const int64_t first = block_allreduce(lfirst, MinOp(), sc.i);
    const bool flip = v[first] < 0;
    __syncthreads();  // every thread has read v[first] before its owner may negate it
    if (flip) {
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) v[c] = -v[c];
    }
  }
}

template <typename T>
cudaError_t launch(const void* p, int64_t R, int64_t C, int64_t k, bool power, int64_t iters,
                   void* lam, void* vec, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  // the iteration is latency-bound on block reductions: a few warps per row are enough
  const int threads = C <= 256 ? 64 : (C <= 2048 ? 128 : 256);
  if (power) {
    power_kernel<T><<<static_cast<unsigned>(R), threads, 0, stream>>>(
        static_cast<const T*>(p), C, k, iters, static_cast<T*>(lam), static_cast<T*>(vec));
  } else {
    exact_kernel<T><<<static_cast<unsigned>(R), threads, 0, stream>>>(
        static_cast<const T*>(p), C, k, static_cast<T*>(lam), static_cast<T*>(vec));
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t core_topk(const void* p, bool f64, int64_t R, int64_t C, int64_t k, bool power,
                      int64_t iters, void* lam, void* vec, cudaStream_t stream) {
  return f64 ? launch<double>(p, R, C, k, power, iters, lam, vec, stream)
             : launch<float>(p, R, C, k, power, iters, lam, vec, stream);
}

}  // namespace cuda
}  // namespace fimfast
