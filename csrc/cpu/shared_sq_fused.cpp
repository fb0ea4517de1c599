// shared_sq of float32 inputs on AVX-512 CPUs: sum_n (G_n^T A_n)**2 with every per-sample
// product formed in registers and squared there.
//
// A tile of 4 output rows by up to 64 output columns (16 accumulators) takes, for each sample,
// the T rank-one updates G[n, t, rows] (x) A[n, t, cols], then adds the squares of the tile to
// 16 running sums, also in registers, written once at the end. Against the batched GEMM into a
// buffer and a pass over it (csrc/cpu/shared_sq.cpp), one thread, 32 samples of 32 positions:
// 0.19 vs 0.31 ms for 192 x 64, 0.24 vs 0.37 ms for 64 x 256; 64 samples of 16 positions,
// 256 x 256: 1.4 vs 2.4 ms; 128 of 8, 512 x 512: 6.4 vs 14.5 ms; 64 of 2, 256 x 128: 0.11 vs
// 0.83 ms. From 48 positions on the GEMM is faster (32 x 64 x 192 x 64: 0.53 vs 0.44 ms; 64 x 49
// x 64 x 147: 0.79 vs 0.70 ms): longer sums of positions stay on its path (kMaxT).
#include "shared_sq_fused.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FIMFAST_FUSED_SQ 1
#endif

namespace fimfast {
namespace cpu {

#ifdef FIMFAST_FUSED_SQ
namespace {

constexpr int64_t kRows = 4;    // output rows per tile (4 x 4 accumulators + 16 sums)
constexpr int64_t kMaxT = 32;   // longer sums of positions: the GEMM path (faster from 48 on)

constexpr int64_t kChunkBytes = 512 << 10;  // A's samples per pass over the tiles (in L2)
constexpr int64_t kGroup = 16;               // G's rows packed together (one cache line)
constexpr int64_t kPackBytes = 128 << 10;    // a chunk's packed rows of G (in L2)

struct Operands {
  const float* G;
  const float* A;
  int64_t N, T, I, gs0, gs1, gs2, as0, as1;
  float* out;
  int64_t g0 = 0;  // the output row of G's first row (G a packed group of rows)
};

// out[o0:o0+R, i0:i0+16*NV] (+)= sum_n (sum_t G[n,t,o] A[n,t,i])**2 over the samples of p
// (added to out unless first), the last vector masked by m
template <int R, int NV>
__attribute__((target("avx512f"))) void tile(const Operands& p, int64_t o0, int64_t i0,
                                              __mmask16 m, bool first) {
  __m512 sum[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) sum[r][j] = _mm512_setzero_ps();
  for (int64_t n = 0; n < p.N; ++n) {
    __m512 acc[R][NV];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
    const float* g = p.G + n * p.gs0 + (o0 - p.g0) * p.gs2;
    const float* a = p.A + n * p.as0 + i0;
    for (int64_t t = 0; t < p.T; ++t) {
      const float* at = a + t * p.as1;
      __m512 av[NV];
      for (int j = 0; j < NV; ++j)
        av[j] = j == NV - 1 ? _mm512_maskz_loadu_ps(m, at + 16 * j) : _mm512_loadu_ps(at + 16 * j);
      const float* gt = g + t * p.gs1;
      for (int r = 0; r < R; ++r) {
        const __m512 gv = _mm512_set1_ps(gt[r * p.gs2]);
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(gv, av[j], acc[r][j]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NV; ++j) sum[r][j] = _mm512_fmadd_ps(acc[r][j], acc[r][j], sum[r][j]);
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) {
      float* o = p.out + (o0 + r) * p.I + i0 + 16 * j;
      const __mmask16 mj = j == NV - 1 ? m : static_cast<__mmask16>(0xFFFF);
      _mm512_mask_storeu_ps(
          o, mj, first ? sum[r][j] : _mm512_add_ps(sum[r][j], _mm512_maskz_loadu_ps(mj, o)));
    }
}

// the tiles of output rows o0 .. o0+R-1, 64 columns at a time (the last one masked)
template <int R>
void row_tiles(const Operands& p, int64_t o0, bool first) {
  for (int64_t i0 = 0; i0 < p.I; i0 += 64) {
    const int64_t w = std::min<int64_t>(64, p.I - i0);
    const int64_t nv = (w + 15) / 16;
    const auto m = static_cast<__mmask16>((1u << (w - 16 * (nv - 1))) - 1u);
    switch (nv) {
      case 4: tile<R, 4>(p, o0, i0, m, first); break;
      case 3: tile<R, 3>(p, o0, i0, m, first); break;
      case 2: tile<R, 2>(p, o0, i0, m, first); break;
      default: tile<R, 1>(p, o0, i0, m, first); break;
    }
  }
}

bool has_avx512() {
  static const bool v = __builtin_cpu_supports("avx512f");
  return v;
}

// G[n, t, g0:g0+w] of the chunk's samples -> buf[(n T + t) kGroup + 0:w]: the tiles of a group
// read their scalars from one contiguous block. Read in place, the rows of G a multiple of 1024
// bytes apart (512 or 1024 outputs: an LSTM's gates) fall in a few cache sets and are fetched
// again for every 64 columns (64 samples of 16 positions, 512 x 128: 1.92 vs 1.30 ms with the
// rows padded by 64 bytes, 1.38 ms packed; 1024 x 256: 7.6 vs 5.4 ms, 5.1 ms packed)
__attribute__((target("avx512f"))) void pack_rows(const Operands& p, int64_t g0, int64_t w,
                                                   float* buf) {
  const auto m = static_cast<__mmask16>((1u << w) - 1u);
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t t = 0; t < p.T; ++t) {
      const float* s = p.G + n * p.gs0 + t * p.gs1 + g0 * p.gs2;
      float* d = buf + (n * p.T + t) * kGroup;
      if (p.gs2 == 1) {
        _mm512_storeu_ps(d, _mm512_maskz_loadu_ps(m, s));
      } else {
        for (int64_t r = 0; r < w; ++r) d[r] = s[r * p.gs2];
      }
    }
}

// out (O, I) row-major <- sum_n (G_n^T A_n)**2, A's last dim contiguous and T I floats in
// kChunkBytes
void run(const at::Tensor& G, const at::Tensor& A, float* out) {
  const int64_t O = G.size(2);
  const Operands p{G.const_data_ptr<float>(), A.const_data_ptr<float>(), G.size(0), G.size(1),
                   A.size(2), G.stride(0), G.stride(1), G.stride(2), A.stride(0), A.stride(1),
                   out};
  // G's rows packed where a tile reads them more than once (more than 64 columns) or where they
  // are a multiple of 1024 bytes apart; otherwise read in place (packed regardless, 128 samples
  // of 8 positions, 48 x 27: 0.042 against 0.037 ms)
  const bool pack = p.I > 64 || (4 * p.gs1) % 1024 == 0;
  const int64_t rows = pack ? kGroup : kRows;  // output rows per parallel unit
  const int64_t units = (O + rows - 1) / rows;
  // the samples in chunks whose A stays in L2 while every tile reads it (a pass over
  // all of A per tile read it from memory: 4x the time at 32 x 128 positions x 256 x 256), and
  // whose packed rows of G do too
  const int64_t chunk = std::max<int64_t>(
      1, std::min(kChunkBytes / (4 * p.T * p.I),
                  pack ? kPackBytes / (4 * p.T * kGroup) : std::numeric_limits<int64_t>::max()));
  for (int64_t n0 = 0; n0 < p.N; n0 += chunk) {
    Operands q = p;
    q.N = std::min(chunk, p.N - n0);
    q.G += n0 * p.gs0;
    q.A += n0 * p.as0;
    const bool first = n0 == 0;
    // parallel over units of rows once a unit's share is above ~32k multiply-adds
    const int64_t work = std::max<int64_t>(1, q.N * q.T * q.I * rows);
    at::parallel_for(0, units, std::max<int64_t>(1, 32768 / work), [&](int64_t b0, int64_t b1) {
      thread_local std::vector<float> buf;
      if (pack && buf.size() < static_cast<size_t>(q.N * q.T * kGroup)) {
        buf.resize(q.N * q.T * kGroup);
      }
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t g0 = b * rows, w = std::min(rows, O - g0);
        Operands k = q;
        if (pack) {
          pack_rows(q, g0, w, buf.data());
          k.G = buf.data();
          k.gs0 = q.T * kGroup;
          k.gs1 = kGroup;
          k.gs2 = 1;
          k.g0 = g0;
        }
        for (int64_t o0 = g0; o0 < g0 + w; o0 += kRows) {
          switch (std::min<int64_t>(kRows, g0 + w - o0)) {
            case 4: row_tiles<4>(k, o0, first); break;
            case 3: row_tiles<3>(k, o0, first); break;
            case 2: row_tiles<2>(k, o0, first); break;
            default: row_tiles<1>(k, o0, first); break;
          }
        }
      }
    });
  }
}

}  // namespace

bool shared_sq_fused(const at::Tensor& G, const at::Tensor& A, at::Tensor& out) {
  if (!has_avx512() || G.scalar_type() != at::kFloat || A.scalar_type() != at::kFloat ||
      out.scalar_type() != at::kFloat || !out.is_contiguous() || G.size(1) > kMaxT) {
    return false;
  }
  const int64_t T = G.size(1), O = G.size(2), I = A.size(2);
  const bool direct = A.stride(2) == 1 && T * I * 4 <= kChunkBytes;
  const bool swapped = G.stride(2) == 1 && T * O * 4 <= kChunkBytes;
  // a tile's columns are the vectors: 64 of them use its loads best. Fewer than 64 on the side
  // of A but 64 or more on the side of G: the transposed products (I, O), transposed back (128
  // samples of 32 positions, 64 x 8: 0.04 vs 0.09 ms, 64 x 32: 0.16 vs 0.17-0.23 ms; 64 x 27 at
  // 16 positions: 0.07 vs 0.09 ms). Fewer than 64 on both sides: the GEMM's (32 x 27 at 32
  // positions: 0.08 against 0.10 ms fused) unless the sums are short (8 positions or fewer,
  // where the GEMM calls cost the most)
  if (direct && (I >= 64 || (T <= 8 && !(swapped && O >= 64)))) {
    run(G, A, out.mutable_data_ptr<float>());
    return true;
  }
  if (swapped && O >= 64) {
    at::Tensor tr = at::empty({I, O}, out.options());
    run(A, G, tr.mutable_data_ptr<float>());
    out.copy_(tr.t());
    return true;
  }
  return false;
}
#else
bool shared_sq_fused(const at::Tensor&, const at::Tensor&, at::Tensor&) { return false; }
#endif

}  // namespace cpu
}  // namespace fimfast
