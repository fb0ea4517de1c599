// unfold_windows on the CPU: the windows of a convolution's kernel over a tensor, zero outside it,
// copied once into the layout of a convolution's weight (fimfast/rules/conv.py, _unfold). A host
// function of the module fimfast._C (csrc/fimfast.cpp; no dispatcher op: the rules call it on
// plain CPU tensors, with the strided-view path of conv.py beside it for everything else).
//
// The torch path is a strided view copied by one TensorIterator copy (after an F.pad for the
// padding): a scalar loop with one index computation per element whenever the innermost window
// dim steps by more than one element (a stride or a dilation), about 1.4 ns per element on the
// CPU of benchmarks/bench_layers.py. Here each run of one window row is a plain loop, a copy for
// unit steps, with the zero padding written in the same pass (no padded copy of the input).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "unfold_windows.h"

namespace fimfast {
namespace {

// at least this many output elements per task
constexpr int64_t kGrain = 1 << 16;

// One spatial dim: size of the input, kernel taps, step between taps, step between windows, the
// padding before the first element, and the number of windows.
struct Dim {
  int64_t in, k, d, s, p, L, stride;
};

// Window positions l of tap t whose input index l s - p + t d lies in [0, in): [lo, hi).
inline void valid_range(const Dim& D, int64_t t, int64_t* lo, int64_t* hi) {
  const int64_t off = t * D.d - D.p;  // input index of window 0
  // smallest l with l s + off >= 0, and the first l with l s + off >= in
  int64_t a = off >= 0 ? 0 : (-off + D.s - 1) / D.s;
  int64_t b = D.in - off <= 0 ? 0 : (D.in - off + D.s - 1) / D.s;
  *lo = std::min(a, D.L);
  *hi = std::max(*lo, std::min(b, D.L));
}

template <typename T>
void row(const T* src, const Dim& D, int64_t t, T* out) {
  int64_t lo, hi;
  valid_range(D, t, &lo, &hi);
  std::fill(out, out + lo, T(0));
  const T* p = src + (lo * D.s + t * D.d - D.p) * D.stride;
  const int64_t step = D.s * D.stride;
  if (step == 1) {
    std::memcpy(out + lo, p, sizeof(T) * (hi - lo));
  } else {
    for (int64_t l = lo; l < hi; ++l) out[l] = p[(l - lo) * step];
  }
  std::fill(out + hi, out + D.L, T(0));
}

// The windows of one leading slice `src` (spatial dims `dims`, 1 to 3), written to `out` laid out
// (*k, *L), contiguous.
template <typename T>
void slice(const T* src, const std::vector<Dim>& dims, T* out) {
  const int64_t n = static_cast<int64_t>(dims.size());
  const Dim& last = dims[n - 1];
  if (n == 1) {
    for (int64_t t = 0; t < last.k; ++t) row(src, last, t, out + t * last.L);
    return;
  }
  // the outer dims: every (tap, window) pair, zero rows where the input index is out of range
  int64_t outer_taps = 1, outer_L = 1;
  for (int64_t i = 0; i < n - 1; ++i) {
    outer_taps *= dims[i].k;
    outer_L *= dims[i].L;
  }
  const int64_t taps_last = last.k, L_last = last.L;
  std::vector<int64_t> tap(n - 1), pos(n - 1);
  for (int64_t ot = 0; ot < outer_taps; ++ot) {
    int64_t r = ot;
    for (int64_t i = n - 2; i >= 0; --i) {
      tap[i] = r % dims[i].k;
      r /= dims[i].k;
    }
    for (int64_t t = 0; t < taps_last; ++t) {
      // (*k, *L): tap index (ot, t) row-major over the taps, then the windows
      T* base = out + (ot * taps_last + t) * outer_L * L_last;
      for (int64_t ol = 0; ol < outer_L; ++ol) {
        int64_t q = ol;
        for (int64_t i = n - 2; i >= 0; --i) {
          pos[i] = q % dims[i].L;
          q /= dims[i].L;
        }
        T* o = base + ol * L_last;
        int64_t offset = 0;
        bool inside = true;
        for (int64_t i = 0; i < n - 1 && inside; ++i) {
          const int64_t j = pos[i] * dims[i].s - dims[i].p + tap[i] * dims[i].d;
          inside = j >= 0 && j < dims[i].in;
          offset += j * dims[i].stride;
        }
        if (inside) {
          row(src + offset, last, t, o);
        } else {
          std::fill(o, o + L_last, T(0));
        }
      }
    }
  }
}

}  // namespace

at::Tensor unfold_windows_cpu(const at::Tensor& x, const std::vector<int64_t>& kernel,
                              const std::vector<int64_t>& dilation,
                              const std::vector<int64_t>& stride,
                              const std::vector<int64_t>& padding,
                              const std::vector<int64_t>& size) {
  const int64_t n = static_cast<int64_t>(kernel.size());
  TORCH_CHECK(n >= 1 && n <= 3, "unfold_windows: 1 to 3 spatial dims; got ", n);
  TORCH_CHECK(static_cast<int64_t>(dilation.size()) == n && static_cast<int64_t>(stride.size()) == n &&
                  static_cast<int64_t>(padding.size()) == n && static_cast<int64_t>(size.size()) == n,
              "unfold_windows: kernel, dilation, stride, padding and size must have one entry "
              "per spatial dim");
  TORCH_CHECK(x.device().is_cpu(), "unfold_windows: a CPU tensor is needed");
  TORCH_CHECK(x.dim() > n, "unfold_windows: x must have a leading dim before its ", n,
              " spatial dims; got shape ", x.sizes());
  const int64_t lead = x.dim() - n;
  std::vector<Dim> dims(n);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().begin() + lead);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(kernel[i] >= 1 && dilation[i] >= 1 && stride[i] >= 1 && padding[i] >= 0 &&
                    size[i] >= 0,
                "unfold_windows: kernel, dilation and stride must be >= 1, padding and size >= 0");
    dims[i] = {x.size(lead + i), kernel[i], dilation[i], stride[i], padding[i], size[i],
               x.stride(lead + i)};
    shape.push_back(kernel[i]);
  }
  for (int64_t i = 0; i < n; ++i) shape.push_back(size[i]);
  at::Tensor out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  int64_t per = 1;
  for (int64_t i = 0; i < n; ++i) per *= kernel[i] * size[i];
  int64_t slices = 1;
  for (int64_t i = 0; i < lead; ++i) slices *= x.size(i);
  if (per == 0 || slices == 0) return out;
  const auto sizes = x.sizes().vec(), strides = x.strides().vec();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unfold_windows", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kGrain / per);
    at::parallel_for(0, slices, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t r = b, offset = 0;  // the leading index of slice b, row-major, in x's strides
        for (int64_t i = lead - 1; i >= 0; --i) {
          offset += (r % sizes[i]) * strides[i];
          r /= sizes[i];
        }
        slice(src + offset, dims, dst + b * per);
      }
    });
  });
  return out;
}

}  // namespace fimfast
