// gram_upper_ on the CPU: the upper triangle (diagonal included) of out (n, n) (+)= x^T x for x
// (R, n), a symmetric rank-R update; the entries below the diagonal are left unspecified (the
// readers mirror the upper triangle, fimfast/structured/sums.py).
//
// Where the torch links MKL, its BLAS driver of ssyrk / dsyrk (exported by libtorch_cpu but not
// declared by torch: declared weak here on Linux, null without MKL) computes the triangle alone,
// half the multiply-adds of the full product, in one call. It is used after a check of its calling
// convention on a small case, once per process; otherwise (no MKL, a failed check, a layout BLAS
// cannot read, sizes past 32 bits) the upper block rows are summed with at::addmm_ (as the torch
// reference, fimfast/ops/gram.py, does from Python).
//
// mirror_upper_ completes such a sum where it is read: the upper triangle scaled in place and
// copied below the diagonal, in strips of 64 rows (32 in float64) through a transposed tile in L1
// (8 x 8 squares where the columns are not of unit stride).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#if defined(__linux__)
#define FIMFAST_MKL_SYRK 1
extern "C" {
// Fortran conventions (every argument by pointer). The integers are passed as 64-bit values
// below 2^31: read right by an LP64 (32-bit int) MKL on a little-endian machine too.
void mkl_blas_ssyrk(const char* uplo, const char* trans, const int64_t* n, const int64_t* k,
                    const float* alpha, const float* a, const int64_t* lda, const float* beta,
                    float* c, const int64_t* ldc) __attribute__((weak));
void mkl_blas_dsyrk(const char* uplo, const char* trans, const int64_t* n, const int64_t* k,
                    const double* alpha, const double* a, const int64_t* lda, const double* beta,
                    double* c, const int64_t* ldc) __attribute__((weak));
}
#endif

namespace fimfast {
namespace {

constexpr int64_t kBlock = 128;  // rows of a block of the fallback (as the torch reference)

template <typename T>
using SyrkFn = void (*)(const char*, const char*, const int64_t*, const int64_t*, const T*,
                        const T*, const int64_t*, const T*, T*, const int64_t*);

template <typename T>
SyrkFn<T> syrk_symbol();
#ifdef FIMFAST_MKL_SYRK
template <>
SyrkFn<float> syrk_symbol<float>() {
  return &mkl_blas_ssyrk;
}
template <>
SyrkFn<double> syrk_symbol<double>() {
  return &mkl_blas_dsyrk;
}
#else
template <>
SyrkFn<float> syrk_symbol<float>() {
  return nullptr;
}
template <>
SyrkFn<double> syrk_symbol<double>() {
  return nullptr;
}
#endif

// C (column-major, ld ldc) (+)= A A^T (trans 'N', A n x k) or A^T A (trans 'T', A k x n),
// triangle uplo
template <typename T>
void syrk(SyrkFn<T> f, char uplo, char trans, int64_t n, int64_t k, const T* a, int64_t lda,
          T beta, T* c, int64_t ldc) {
  const T alpha = 1;
  f(&uplo, &trans, &n, &k, &alpha, a, &lda, &beta, c, &ldc);
}

// whether f computes the upper triangle of a row-major x^T x, with and without beta, leaving the
// rest of C as it was
template <typename T>
bool syrk_works(SyrkFn<T> f) {
  const T x[6] = {1, 2, 3, 4, 5, 6};                     // (3, 2) row-major
  T c[6] = {-7, -7, -7, -7, -7, -7};                     // (2, 2) row-major, row stride 3
  syrk<T>(f, 'L', 'N', 2, 3, x, 2, T(0), c, 3);          // x^T x = [[35, 44], [44, 56]]
  syrk<T>(f, 'L', 'N', 2, 3, x, 2, T(1), c, 3);          // twice
  const T y[6] = {1, 3, 5, 2, 4, 6};                     // x as (2, 3) row-major: x's columns
  T d[4] = {-7, -7, -7, -7};
  syrk<T>(f, 'L', 'T', 2, 3, y, 3, T(0), d, 2);          // the same product, x stored by columns
  return c[0] == 70 && c[1] == 88 && c[2] == -7 && c[3] == -7 && c[4] == 112 && c[5] == -7 &&
         d[0] == 35 && d[1] == 44 && d[2] == -7 && d[3] == 56;
}

template <typename T>
SyrkFn<T> checked_syrk() {
  static const SyrkFn<T> fn = [] {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    SyrkFn<T> f = syrk_symbol<T>();
    return (f != nullptr && syrk_works<T>(f)) ? f : nullptr;
#else
    return static_cast<SyrkFn<T>>(nullptr);
#endif
  }();
  return fn;
}

bool fits(int64_t v) { return v <= std::numeric_limits<int32_t>::max(); }

// the BLAS path: false where the layout or the sizes do not allow it
template <typename T>
bool gram_syrk(at::Tensor& out, const at::Tensor& x, bool accumulate) {
  const SyrkFn<T> f = checked_syrk<T>();
  if (f == nullptr) return false;
  const int64_t R = x.size(0), n = x.size(1);
  // out row-major (ld = stride 0): column-major C = out^T, so out's upper triangle is C's lower
  const int64_t ldc = out.stride(0);
  if (out.stride(1) != 1 || ldc < n) return false;
  char trans;
  int64_t lda;
  if (x.stride(1) == 1 && x.stride(0) >= n) {  // x (R, n) row-major: A = x^T (n x R), C = A A^T
    trans = 'N';
    lda = x.stride(0);
  } else if (x.stride(0) == 1 && x.stride(1) >= R) {  // x stored by columns: A (R x n), A^T A
    trans = 'T';
    lda = x.stride(1);
  } else {
    return false;
  }
  if (!fits(R) || !fits(n) || !fits(lda) || !fits(ldc)) return false;
  syrk<T>(f, 'L', trans, n, R, x.const_data_ptr<T>(), std::max<int64_t>(lda, 1),
          accumulate ? T(1) : T(0), out.mutable_data_ptr<T>(), std::max<int64_t>(ldc, 1));
  return true;
}

void gram_upper_cpu(at::Tensor& out, const at::Tensor& x, bool accumulate) {
  TORCH_CHECK(x.dim() == 2, "gram_upper_: x must be 2-D (rows, n); got shape ", x.sizes());
  const int64_t R = x.size(0), n = x.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == n && out.size(1) == n,
              "gram_upper_: out must be (n, n) = (", n, ", ", n, "); got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "gram_upper_: out must be float32 or float64; got ", out.scalar_type());
  TORCH_CHECK(x.scalar_type() == out.scalar_type(), "gram_upper_: x must have out's dtype ",
              out.scalar_type(), "; got ", x.scalar_type());
  TORCH_CHECK(x.device() == out.device(), "gram_upper_: x and out must be on one device");
  if (n == 0) return;
  if (R == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  const bool done = out.scalar_type() == at::kFloat ? gram_syrk<float>(out, x, accumulate)
                                                     : gram_syrk<double>(out, x, accumulate);
  if (done) return;
  const at::Tensor xt = x.t();
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t b = std::min(kBlock, n - i);
    out.narrow(0, i, b).narrow(1, i, n - i).addmm_(xt.narrow(0, i, b), x.narrow(1, i, n - i),
                                                   accumulate ? 1 : 0, 1);
  }
}

// m's upper triangle (diagonal included) times scale, and its transpose below the diagonal, in
// 8 x 8 squares (any strides)
template <typename T>
void mirror_tiles(T* m, int64_t n, int64_t s0, int64_t s1, T scale) {
  constexpr int64_t sq = 8;
  for (int64_t i0 = 0; i0 < n; i0 += sq) {
    const int64_t i1 = std::min(i0 + sq, n);
    for (int64_t j0 = i0; j0 < n; j0 += sq) {
      const int64_t j1 = std::min(j0 + sq, n);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = std::max(j0, i); j < j1; ++j) {
          const T v = m[i * s0 + j * s1] * scale;
          m[i * s0 + j * s1] = v;
          m[j * s0 + i * s1] = v;
        }
      }
    }
  }
}

// The same for rows of unit stride (the sums' own buffers and their leading views), in strips of
// B rows: each B x B tile right of the diagonal is read (and scaled) row by row into a transposed
// buffer in L1, then written below the diagonal as B contiguous runs of B values (256 bytes, whole
// cache lines), so that a strip's reads stay in L2 and its writes use every line they fetch (about
// 2/3 of the time of the 8 x 8 squares where the matrix is not in cache: the five factors of an
// MLP 784-512-256-10, float32, one thread).
template <typename T, int64_t B>
void mirror_strips(T* m, int64_t n, int64_t s0, T scale) {
  T buf[B][B];
  const bool scaled = scale != T(1);
  for (int64_t i0 = 0; i0 < n; i0 += B) {
    const int64_t bi = std::min(B, n - i0);
    for (int64_t i = i0; i < i0 + bi; ++i) {  // the diagonal tile
      T* r = m + i * s0;
      for (int64_t j = i; j < i0 + bi; ++j) {
        const T v = r[j] * scale;
        r[j] = v;
        m[j * s0 + i] = v;
      }
    }
    for (int64_t j0 = i0 + bi; j0 < n; j0 += B) {
      const int64_t bj = std::min(B, n - j0);
      for (int64_t ii = 0; ii < bi; ++ii) {
        T* r = m + (i0 + ii) * s0 + j0;
        if (scaled) {
          for (int64_t jj = 0; jj < bj; ++jj) {
            const T v = r[jj] * scale;
            r[jj] = v;
            buf[jj][ii] = v;
          }
        } else {
          for (int64_t jj = 0; jj < bj; ++jj) buf[jj][ii] = r[jj];
        }
      }
      for (int64_t jj = 0; jj < bj; ++jj) {
        T* w = m + (j0 + jj) * s0 + i0;
        for (int64_t ii = 0; ii < bi; ++ii) w[ii] = buf[jj][ii];
      }
    }
  }
}

void mirror_upper_cpu(at::Tensor& m, double scale) {
  TORCH_CHECK(m.dim() == 2 && m.size(0) == m.size(1),
              "mirror_upper_: m must be a square matrix; got shape ", m.sizes());
  TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble,
              "mirror_upper_: m must be float32 or float64; got ", m.scalar_type());
  const int64_t n = m.size(0);
  if (n == 0) return;
  const bool rows = m.stride(1) == 1;
  if (m.scalar_type() == at::kFloat) {
    float* p = m.mutable_data_ptr<float>();
    const float s = static_cast<float>(scale);
    rows ? mirror_strips<float, 64>(p, n, m.stride(0), s)
         : mirror_tiles<float>(p, n, m.stride(0), m.stride(1), s);
  } else {
    double* p = m.mutable_data_ptr<double>();
    rows ? mirror_strips<double, 32>(p, n, m.stride(0), scale)
         : mirror_tiles<double>(p, n, m.stride(0), m.stride(1), scale);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fimfast, CPU, m) {
  m.impl("gram_upper_", &gram_upper_cpu);
  m.impl("mirror_upper_", &mirror_upper_cpu);
}

}  // namespace fimfast
