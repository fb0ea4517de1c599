// Row kernels of probe_logit_grad on the CPU (no torch headers).
//
// This file has no include guard on purpose: csrc/cpu/probe_logit_grad.cpp includes it once per
// instruction set, inside `namespace FIMFAST_ISA`, and dispatches at run time (the AVX2 copy is
// 1.8x faster on the softmax than the x86-64 baseline one, measured on an AMD EPYC).
//
// namespace FIMFAST_ISA { ... } is opened by the includer.

// Sign mask of bit t of a 32-bit word, as a table so the test is a vector AND + compare on SSE2
// (per-lane variable shifts need AVX2).
alignas(64) static constexpr uint32_t kBit[32] = {
    1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
    1u << 8,  1u << 9,  1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
    1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
    1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};

template <typename acc_t>
struct SignMask;
template <>
struct SignMask<float> {
  using bits_t = uint32_t;
  static constexpr bits_t kSign = 0x80000000u;
};
template <>
struct SignMask<double> {
  using bits_t = uint64_t;
  static constexpr bits_t kSign = 0x8000000000000000ull;
};

// o[c] = xi_c * v[c] for the sign-stream counters base .. base + n - 1. A block of 32 counters
// starting anywhere straddles at most two hash words: their 64-bit concatenation shifted by
// (base & 31) gives its 32 sign bits, so the generator costs one hash per 32 entries.
template <typename acc_t>
FIMFAST_INLINE void apply_signs(rng::Keys k, uint64_t base, int64_t n, const acc_t* v, acc_t* o) {
  using bits_t = typename SignMask<acc_t>::bits_t;
  constexpr bits_t kSign = SignMask<acc_t>::kSign;
  const uint32_t sh = static_cast<uint32_t>(base & 31u);
  uint64_t w = base >> 5;
  uint32_t h0 = rng::hash(k, w);
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    const uint32_t h1 = rng::hash(k, ++w);
    const uint32_t bits =
        static_cast<uint32_t>(((static_cast<uint64_t>(h1) << 32) | h0) >> sh);
    h0 = h1;
    for (int t = 0; t < 32; ++t) {
      const bits_t m = (bits & kBit[t]) == 0u ? bits_t(0) : kSign;
      o[c + t] = cpu::bit_cast<acc_t>(cpu::bit_cast<bits_t>(v[c + t]) ^ m);
    }
  }
  if (c < n) {
    const uint32_t h1 = rng::hash(k, w + 1);
    const uint32_t bits =
        static_cast<uint32_t>(((static_cast<uint64_t>(h1) << 32) | h0) >> sh);
    for (int64_t t = 0; t < n - c; ++t) o[c + t] = cpu::flip_sign(v[c + t], (bits >> t) & 1u);
  }
}

template <typename acc_t, typename in_t>
FIMFAST_INLINE void load_row(const in_t* src, int64_t stride, int64_t C, acc_t* dst) {
  if (stride == 1) {
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<acc_t>(src[c]);
  } else {
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<acc_t>(src[c * stride]);
  }
}

#ifndef FIMFAST_NOINLINE
#if defined(__GNUC__)
#define FIMFAST_NOINLINE __attribute__((noinline))
#else
#define FIMFAST_NOINLINE
#endif
#endif

// x <- softmax(x), max-shifted; exp is cpu::exp_f (vectorisable, <= 2 ulp in float, exactly 1
// at 0). Returns 1 / sum, which is p of the leading classes (those with e = 1).
template <typename acc_t>
FIMFAST_INLINE acc_t softmax_inplace(acc_t* x, int64_t C) {
  const acc_t m = cpu::max16(x, C);
  for (int64_t c = 0; c < C; ++c) x[c] = cpu::exp_f(x[c] - m);
  const acc_t inv = acc_t(1) / cpu::sum16(x, C);
  for (int64_t c = 0; c < C; ++c) x[c] *= inv;
  return inv;
}

// Sum of p[c] over the classes other than the leading ones (p[c] != lead), 16 partial sums as
// sum16: 1 - p of a leading class is this sum plus (ties - 1) lead, with no difference of
// numbers near 1 (fimfast/ops/softmax_rest.py). Only rows with p_lead > 1/2 (or tied leading
// classes, for HUTCHINSON) need it: elsewhere 1 - p >= 1/2 has no cancellation.
template <typename acc_t>
FIMFAST_INLINE acc_t sum16_below(const acc_t* p, int64_t n, acc_t lead) {
  acc_t acc[16] = {};
  const int64_t nb = n - n % 16;
  for (int64_t c = 0; c < nb; c += 16) {
    for (int t = 0; t < 16; ++t) acc[t] += p[c + t] == lead ? acc_t(0) : p[c + t];
  }
  acc_t tail = 0;
  for (int64_t c = nb; c < n; ++c) tail += p[c] == lead ? acc_t(0) : p[c];
  acc_t s = 0;
  for (int t = 0; t < 16; ++t) s += acc[t];
  return s + tail;
}

// 1 - p[y] of a label, exact to rounding on a confident row (one leading class above 1/2)
template <typename acc_t>
FIMFAST_INLINE acc_t one_minus(const acc_t* p, int64_t C, int64_t y, acc_t lead) {
  if (p[y] == lead && lead > acc_t(0.5)) return sum16_below(p, C, lead);
  return acc_t(1) - p[y];
}

// The leading classes of a HUTCHINSON row whose mix cancels at them: one leading class above
// 1/2, or several tied ones (two of one sign share nearly all of the mass). Empty otherwise:
// then w - p (sum w) has 1 - p >= 1/2 at every class.
template <typename acc_t>
struct LeadRow {
  std::vector<int64_t> at;  // their indices
  acc_t below = 0;          // the other classes' p
};

// ties: the number of leading classes (counted in the loop that takes sqrt(p): free there)
template <typename acc_t>
FIMFAST_INLINE void find_leads(const acc_t* p, int64_t C, acc_t lead, int32_t ties,
                               LeadRow<acc_t>& L) {
  L.at.clear();
  if (ties < 2 && !(lead > acc_t(0.5))) return;
  for (int64_t c = 0; c < C; ++c) {
    if (p[c] == lead) L.at.push_back(c);
  }
  L.below = sum16_below(p, C, lead);
}

// HUTCHINSON's mix o <- w - p (sum w), o holding w (plain_mix where nothing cancels). At the
// leading classes of L (lead_mix), with the sums of
// w below them and at them (one magnitude |w| there: k = at / w is an exact integer),
// w (below + (ties - k) lead) - lead (sum of w below) (p units: below is the others' p); ties - k
// is twice the tied classes of the other sign: no difference of numbers near 1 (nor near 1/2).
template <typename acc_t>
FIMFAST_INLINE void plain_mix(acc_t* o, const acc_t* p, int64_t C) {
  const acc_t dot = cpu::sum16(o, C);  // sqrt(p) . xi
  for (int64_t c = 0; c < C; ++c) o[c] -= p[c] * dot;
}

// (kept out of line: the rows that need it are few, and plain_mix's loop stays as it was)
template <typename acc_t>
FIMFAST_NOINLINE void lead_mix(acc_t* o, const acc_t* p, int64_t C, acc_t lead,
                               const LeadRow<acc_t>& L) {
  acc_t wl[64];
  const int64_t n = static_cast<int64_t>(L.at.size());
  acc_t at = 0;
  for (int64_t i = 0; i < n && i < 64; ++i) {
    wl[i] = o[L.at[i]];
    at += wl[i];
    o[L.at[i]] = acc_t(0);
  }
  if (n > 64) {  // so many exactly tied classes: 1 - p >= 1/2 (p <= 1/65), no cancellation
    for (int64_t i = 0; i < 64; ++i) o[L.at[i]] = wl[i];
    plain_mix(o, p, C);
    return;
  }
  const acc_t below = cpu::sum16(o, C);
  const acc_t dot = below + at;
  for (int64_t c = 0; c < C; ++c) o[c] -= p[c] * dot;
  const acc_t ties = static_cast<acc_t>(n);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t k = at / wl[i];
    o[L.at[i]] = wl[i] * (L.below + (ties - k) * lead) - lead * below;
  }
}

// Rows [r0, r1) of dz (S, R, C); buffers are per call (one call per thread chunk).
template <typename acc_t, typename in_t>
void probe_row_range(const ProbeArgs& a, const in_t* logits, int64_t row_stride,
                     int64_t col_stride, const int64_t* labels, const acc_t* lam,
                     const acc_t* vec, acc_t* out, int64_t r0, int64_t r1) {
  const int64_t R = a.R, C = a.C, S = a.S, K = a.K;
  std::vector<acc_t> p(C), sp(C), sl(K);
  LeadRow<acc_t> leads;
  std::vector<acc_t> cdf(a.mode == ProbeMode::kMc ? C : 0);
  for (int64_t r = r0; r < r1; ++r) {
    const in_t* src = logits + r * row_stride;
    switch (a.mode) {
      case ProbeMode::kGaussian: {
        // xi / sqrt(sigma2): the constant rounded once to acc_t, as the reference's scalar mul
        std::fill(sp.begin(), sp.end(), static_cast<acc_t>(1.0 / std::sqrt(a.sigma2)));
        for (int64_t s = 0; s < S; ++s) {
          const int64_t row = s * R + r;
          apply_signs(a.sign_keys, a.offset + static_cast<uint64_t>(row * C), C, sp.data(),
                      out + row * C);
        }
        break;
      }
      case ProbeMode::kBernoulli: {
        load_row(src, col_stride, C, p.data());
        for (int64_t c = 0; c < C; ++c) {
          // sqrt(s (1 - s)) = 1 / (e^{z/2} + e^{-z/2}): no cancellation in either tail
          const acc_t h = acc_t(0.5) * p[c];
          sp[c] = acc_t(1) / (cpu::exp_f(h) + cpu::exp_f(-h));
        }
        for (int64_t s = 0; s < S; ++s) {
          const int64_t row = s * R + r;
          apply_signs(a.sign_keys, a.offset + static_cast<uint64_t>(row * C), C, sp.data(),
                      out + row * C);
        }
        break;
      }
      case ProbeMode::kHutchinson:
      case ProbeMode::kSqrt:
      case ProbeMode::kDg: {
        load_row(src, col_stride, C, p.data());
        const acc_t lead = softmax_inplace(p.data(), C);
        int32_t ties = 0;
        for (int64_t c = 0; c < C; ++c) {
          sp[c] = std::sqrt(p[c]);
          ties += p[c] == lead ? 1 : 0;
        }
        if (a.mode == ProbeMode::kHutchinson) find_leads(p.data(), C, lead, ties, leads);
        for (int64_t s = 0; s < S; ++s) {
          const int64_t row = s * R + r;
          acc_t* o = out + row * C;
          apply_signs(a.sign_keys, a.offset + static_cast<uint64_t>(row * C), C, sp.data(), o);
          if (a.mode == ProbeMode::kHutchinson) {
            if (leads.at.empty()) {
              plain_mix(o, p.data(), C);
            } else {
              lead_mix(o, p.data(), C, lead, leads);
            }
          }
        }
        break;
      }
      case ProbeMode::kEmpirical: {
        load_row(src, col_stride, C, p.data());
        const acc_t lead = softmax_inplace(p.data(), C);
        const int64_t y = labels[r];
        const acc_t om = one_minus(p.data(), C, y, lead);
        for (int64_t s = 0; s < S; ++s) {
          acc_t* o = out + (s * R + r) * C;
          for (int64_t c = 0; c < C; ++c) o[c] = -p[c];
          o[y] = om;
        }
        break;
      }
      case ProbeMode::kMc: {
        load_row(src, col_stride, C, p.data());
        const acc_t lead = softmax_inplace(p.data(), C);
        // cumulative sums carried in double and rounded per entry, as torch.cumsum on the CPU
        double run = 0.0;
        for (int64_t c = 0; c < C; ++c) {
          run += static_cast<double>(p[c]);
          cdf[c] = static_cast<acc_t>(run);
        }
        for (int64_t s = 0; s < S; ++s) {
          const int64_t row = s * R + r;
          const acc_t u = static_cast<acc_t>(
              rng::uniform_f(a.unif_keys, a.offset + static_cast<uint64_t>(row)));
          // label = number of classes whose cumulative probability is <= u (cdf is monotone)
          int64_t y = std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin();
          y = std::min<int64_t>(y, C - 1);
          acc_t* o = out + row * C;
          for (int64_t c = 0; c < C; ++c) o[c] = -p[c];
          o[y] = one_minus(p.data(), C, y, lead);
        }
        break;
      }
      case ProbeMode::kRankk: {
        const acc_t* lr = lam + r * K;
        const acc_t* vr = vec + r * K * C;
        for (int64_t j = 0; j < K; ++j) sl[j] = std::sqrt(std::max(lr[j], acc_t(0)));
        for (int64_t s = 0; s < S; ++s) {
          const int64_t row = s * R + r;
          // coef_j = xi_j sqrt(lam_j), counters offset + (s*R + r)*k + j
          acc_t coef[64];
          acc_t* o = out + row * C;
          std::fill(o, o + C, acc_t(0));
          for (int64_t j0 = 0; j0 < K; j0 += 64) {
            const int64_t nj = std::min<int64_t>(64, K - j0);
            apply_signs(a.sign_keys, a.offset + static_cast<uint64_t>(row * K + j0), nj,
                        sl.data() + j0, coef);
            for (int64_t j = 0; j < nj; ++j) {
              const acc_t cj = coef[j];
              const acc_t* v = vr + (j0 + j) * C;
              for (int64_t c = 0; c < C; ++c) o[c] += cj * v[c];
            }
          }
        }
        break;
      }
    }
  }
}
