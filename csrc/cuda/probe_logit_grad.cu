// probe_logit_grad on the GPU: one thread block per logit row.
//
// The row is read once: rows of up to 48 KiB (12288 float32 classes) are kept in shared memory as
// exp(z - max) after the max pass, longer rows are re-read from global memory (L2). Then every
// probe of the row is written once. Signs and uniforms come from the counter-based generator of
// fimfast_rng.h, one hash per element (integer work is free next to the memory traffic).
#include <cuda_runtime.h>
#include <math.h>

#include "cuda_common.cuh"
#include "fimfast_cuda.h"
#include "fimfast_rng.h"

namespace fimfast {
namespace cuda {
namespace {

constexpr int64_t kMaxCacheBytes = 48 * 1024;

template <typename acc_t>
struct Scratch {
  acc_t v[32];
  double d[32];
  int i[32];
};

template <typename in_t, typename acc_t>
__global__ void probe_kernel(const in_t* __restrict__ X, int64_t stride_r, int64_t stride_c,
                             const int64_t* __restrict__ labels, const acc_t* __restrict__ lam,
                             const acc_t* __restrict__ vec, acc_t inv_sigma,
                             acc_t* __restrict__ out, ProbeArgs a, bool cache) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* row = reinterpret_cast<acc_t*>(smem_raw);  // C values when cache
  __shared__ Scratch<acc_t> sc;
  const int64_t r = blockIdx.x;
  const int64_t R = a.R, C = a.C, K = a.K;
  const int tid = threadIdx.x, bd = blockDim.x;
  const in_t* x = X + r * stride_r;
  const ProbeMode mode = a.mode;
  const bool softmax = mode == ProbeMode::kHutchinson || mode == ProbeMode::kSqrt ||
                       mode == ProbeMode::kDg || mode == ProbeMode::kEmpirical ||
                       mode == ProbeMode::kMc;
  acc_t m = 0, inv = 1, q = 0, below = 0, ties = 0;
  if (softmax) {
    acc_t lmax = -INFINITY;
    for (int64_t c = tid; c < C; c += bd) {
      const acc_t v = to_acc<acc_t>(x[c * stride_c]);
      if (cache) row[c] = v;
      lmax = v > lmax ? v : lmax;
    }
    m = block_allreduce(lmax, MaxOp(), sc.v);
    // the sum as below + ties: the classes with e = 1 (set exactly at the max) apart, so that
    // 1 - p of a leading class, q = (below + ties - 1) / sum, needs no difference of numbers
    // near 1 (a confident row keeps its relative accuracy)
    acc_t lbelow = 0, lties = 0;
    for (int64_t c = tid; c < C; c += bd) {
      const acc_t d = (cache ? row[c] : to_acc<acc_t>(x[c * stride_c])) - m;
      const acc_t e = d == acc_t(0) ? acc_t(1) : exp(d);
      if (cache) row[c] = e;
      if (e == acc_t(1)) {  // exactly at the max, or below it by less than exp resolves
        lties += acc_t(1);
      } else {
        lbelow += e;
      }
    }
    below = block_allreduce(lbelow, SumOp(), sc.v);
    ties = block_allreduce(lties, SumOp(), sc.v);
    inv = acc_t(1) / (below + ties);
    q = (below + (ties - acc_t(1))) * inv;
  }
  // e = exp(z - m) of class c of this row (softmax modes), exactly 1 at a leading class
  auto expo = [&](int64_t c) -> acc_t {
    if (cache) return row[c];
    const acc_t d = to_acc<acc_t>(x[c * stride_c]) - m;
    return d == acc_t(0) ? acc_t(1) : exp(d);
  };
  // probability of class c; 1 - p of a class with e = 1 is q (all such classes share p)
  auto prob = [&](int64_t c) -> acc_t { return expo(c) * inv; };
  auto one_minus = [&](acc_t e, acc_t p) -> acc_t { return e == acc_t(1) ? q : acc_t(1) - p; };
  for (int64_t s = 0; s < a.S; ++s) {
    const int64_t rowid = s * R + r;
    acc_t* o = out + rowid * C;
    const uint64_t base = a.offset + static_cast<uint64_t>(rowid * C);
    switch (mode) {
      case ProbeMode::kHutchinson:
      case ProbeMode::kSqrt:
      case ProbeMode::kDg: {
        // sqrt(p) . xi as the classes with e < 1 and those with e = 1 (one magnitude of w)
        acc_t d_below = 0, d_lead = 0;
        if (mode == ProbeMode::kHutchinson) {
          acc_t lb = 0, ll = 0;
          for (int64_t c = tid; c < C; c += bd) {
            const acc_t e = expo(c);
            const acc_t sp = sqrt(e * inv);
            const acc_t w = rng::sign_bit(a.sign_keys, base + c) ? -sp : sp;
            if (e == acc_t(1)) {
              ll += w;
            } else {
              lb += w;
            }
          }
          d_below = block_allreduce(lb, SumOp(), sc.v);
          d_lead = block_allreduce(ll, SumOp(), sc.v);
        }
        for (int64_t c = tid; c < C; c += bd) {
          const acc_t e = expo(c);
          const acc_t p = e * inv;
          const acc_t sp = sqrt(p);
          const acc_t w = rng::sign_bit(a.sign_keys, base + c) ? -sp : sp;
          if (mode != ProbeMode::kHutchinson) {
            o[c] = w;
          } else if (e == acc_t(1)) {
            // w (below + ties - k) / sum - p (w below), k = d_lead / w an exact integer (the
            // tied classes' w have one magnitude): no difference of numbers near 1 or 1/2
            o[c] = w * ((below + (ties - d_lead / w)) * inv) - p * d_below;
          } else {
            o[c] = w - p * (d_below + d_lead);
          }
        }
        break;
      }
      case ProbeMode::kBernoulli: {
        for (int64_t c = tid; c < C; c += bd) {
          // sqrt(s (1 - s)) = 1 / (e^{z/2} + e^{-z/2}): no cancellation in either tail
          const acc_t h = acc_t(0.5) * to_acc<acc_t>(x[c * stride_c]);
          const acc_t amp = acc_t(1) / (exp(h) + exp(-h));
          o[c] = rng::sign_bit(a.sign_keys, base + c) ? -amp : amp;
        }
        break;
      }
      case ProbeMode::kGaussian: {
        for (int64_t c = tid; c < C; c += bd) {
          o[c] = rng::sign_bit(a.sign_keys, base + c) ? -inv_sigma : inv_sigma;
        }
        break;
      }
      case ProbeMode::kEmpirical: {
        const int64_t y = labels[r];
        for (int64_t c = tid; c < C; c += bd) {
          const acc_t e = expo(c), p = e * inv;
          o[c] = c == y ? one_minus(e, p) : -p;
        }
        break;
      }
      case ProbeMode::kMc: {
        const acc_t u = static_cast<acc_t>(
            rng::uniform_f(a.unif_keys, a.offset + static_cast<uint64_t>(rowid)));
        // thread t owns the classes [t*chunk, (t+1)*chunk): an exclusive scan of the chunk sums
        // gives each thread its running CDF (carried in double, as torch.cumsum on the CPU)
        const int64_t chunk = (C + bd - 1) / bd;
        const int64_t c0 = tid * chunk, c1 = c0 + chunk < C ? c0 + chunk : C;
        double part = 0.0;
        for (int64_t c = c0; c < c1; ++c) part += static_cast<double>(prob(c));
        double run = block_exclusive_scan(part, sc.d);
        int cnt = 0;
        for (int64_t c = c0; c < c1; ++c) {
          run += static_cast<double>(prob(c));
          cnt += static_cast<acc_t>(run) <= u;
        }
        int64_t y = block_allreduce(cnt, SumOp(), sc.i);
        y = y < C - 1 ? y : C - 1;
        for (int64_t c = tid; c < C; c += bd) {
          const acc_t e = expo(c), p = e * inv;
          o[c] = c == y ? one_minus(e, p) : -p;
        }
        break;
      }
      case ProbeMode::kRankk: {
        const uint64_t kbase = a.offset + static_cast<uint64_t>(rowid * K);
        const acc_t* lr = lam + r * K;
        const acc_t* vr = vec + r * K * C;
        for (int64_t c = tid; c < C; c += bd) {
          acc_t acc = 0;
          for (int64_t j = 0; j < K; ++j) {
            const acc_t l = lr[j] > acc_t(0) ? lr[j] : acc_t(0);
            const acc_t sl = sqrt(l);
            acc += (rng::sign_bit(a.sign_keys, kbase + j) ? -sl : sl) * vr[j * C + c];
          }
          o[c] = acc;
        }
        break;
      }
    }
  }
}

template <typename in_t, typename acc_t>
cudaError_t launch(const void* logits, int64_t stride_r, int64_t stride_c, const int64_t* labels,
                   const void* lam, const void* vec, double inv_sigma, void* out,
                   const ProbeArgs& a, cudaStream_t stream) {
  if (a.R == 0 || a.C == 0) return cudaSuccess;
  const bool softmax = a.mode != ProbeMode::kBernoulli && a.mode != ProbeMode::kGaussian &&
                       a.mode != ProbeMode::kRankk;
  const bool cache = softmax && a.C * static_cast<int64_t>(sizeof(acc_t)) <= kMaxCacheBytes;
  const size_t smem = cache ? static_cast<size_t>(a.C) * sizeof(acc_t) : 0;
  probe_kernel<in_t, acc_t><<<static_cast<unsigned>(a.R), threads_for(a.C), smem, stream>>>(
      static_cast<const in_t*>(logits), stride_r, stride_c, labels,
      static_cast<const acc_t*>(lam), static_cast<const acc_t*>(vec),
      static_cast<acc_t>(inv_sigma), static_cast<acc_t*>(out), a, cache);
  return cudaGetLastError();
}

}  // namespace

cudaError_t probe_logit_grad(const void* logits, DType dtype, int64_t stride_r, int64_t stride_c,
                             const int64_t* labels, const void* lam, const void* vec,
                             double inv_sigma, void* out, bool f64, const ProbeArgs& args,
                             cudaStream_t stream) {
  if (f64) {
    if (dtype != kF64) return cudaErrorInvalidValue;
    return launch<double, double>(logits, stride_r, stride_c, labels, lam, vec, inv_sigma, out,
                                  args, stream);
  }
  switch (dtype) {
    case kF32:
      return launch<float, float>(logits, stride_r, stride_c, labels, lam, vec, inv_sigma, out,
                                  args, stream);
    case kF16:
      return launch<__half, float>(logits, stride_r, stride_c, labels, lam, vec, inv_sigma, out,
                                   args, stream);
    case kBF16:
      return launch<__nv_bfloat16, float>(logits, stride_r, stride_c, labels, lam, vec,
                                          inv_sigma, out, args, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fimfast
