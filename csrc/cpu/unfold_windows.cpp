// unfold_windows on the CPU: the windows of a convolution's kernel over a tensor, zero outside it,
// copied once into the layout of a convolution's weight (fimfast/rules/conv.py, _unfold). A host
// function of the module fimfast._C (csrc/fimfast.cpp; no dispatcher op: the rules call it on
// plain CPU tensors, with the strided-view path of conv.py beside it for everything else).
//
// The torch path is a strided view copied by one TensorIterator copy (after an F.pad for the
// padding): a scalar loop with one index computation per element whenever the innermost window
// dim steps by more than one element (a stride or a dilation), about 1.4 ns per element on the
// CPU of benchmarks/bench_layers.py. Here each window row is a plain loop (a copy for unit steps)
// between the zeros of the padding, written in the same pass (no padded copy of the input), the
// rows of every tap found once per call.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_math.h"
#include "unfold_windows.h"

namespace fimfast {
namespace {

// at least this many output elements per task
constexpr int64_t kGrain = 1 << 16;

// One spatial dim: size of the input, kernel taps, step between taps, step between windows, the
// padding before the first element, the number of windows, the input's stride; and per tap the
// windows [lo, hi) whose input index l s - p + t d lies in [0, in), found once per call (no
// division per row: a slice of many short rows, a volume's, is bound by the loop overhead).
struct Dim {
  int64_t in, k, d, s, p, L, stride;
  std::vector<int64_t> lo, hi;

  void ranges() {
    lo.resize(k);
    hi.resize(k);
    for (int64_t t = 0; t < k; ++t) {
      const int64_t off = t * d - p;  // input index of window 0
      // the first l with l s + off >= 0, and the first l with l s + off >= in
      const int64_t a = off >= 0 ? 0 : (-off + s - 1) / s;
      const int64_t b = in - off <= 0 ? 0 : (in - off + s - 1) / s;
      lo[t] = std::min(a, L);
      hi[t] = std::max(lo[t], std::min(b, L));
    }
  }
};

// The windows of tap `t` along the last dim: L elements, zero outside the input.
template <typename T>
FIMFAST_INLINE void row(const T* src, const Dim& D, int64_t t, T* out) {
  const int64_t lo = D.lo[t], hi = D.hi[t];
  std::fill(out, out + lo, T(0));
  if (hi > lo) {
    const T* p = src + (lo * D.s + t * D.d - D.p) * D.stride;
    const int64_t step = D.s * D.stride;
    if (step == 1 && hi - lo >= 64) {
      std::memcpy(out + lo, p, sizeof(T) * (hi - lo));
    } else if (step == 1) {  // a short run: a loop costs less than the call
      for (int64_t l = lo; l < hi; ++l) out[l] = p[l - lo];
    } else {
      for (int64_t l = lo; l < hi; ++l) out[l] = p[(l - lo) * step];
    }
  }
  std::fill(out + hi, out + D.L, T(0));
}

// The windows of the taps `taps` over dims `dims[0..n)` of `src`: prod(L) elements, row-major.
template <typename T>
T* block(const T* src, const Dim* dims, int64_t n, const int64_t* taps, T* out) {
  const Dim& D = dims[0];
  if (n == 1) {
    row(src, D, taps[0], out);
    return out + D.L;
  }
  int64_t inner = 1;
  for (int64_t i = 1; i < n; ++i) inner *= dims[i].L;
  const int64_t t = taps[0], lo = D.lo[t], hi = D.hi[t];
  std::fill(out, out + lo * inner, T(0));
  out += lo * inner;
  for (int64_t l = lo; l < hi; ++l) {
    out = block(src + (l * D.s + t * D.d - D.p) * D.stride, dims + 1, n - 1, taps + 1, out);
  }
  std::fill(out, out + (D.L - hi) * inner, T(0));
  return out + (D.L - hi) * inner;
}

// The windows of one leading slice `src`, written to `out` laid out (*k, *L), contiguous.
template <typename T>
void slice(const T* src, const std::vector<Dim>& dims, T* out) {
  const int64_t n = static_cast<int64_t>(dims.size());
  int64_t taps[3] = {0, 0, 0};
  while (true) {  // every combination of taps, row-major
    out = block(src, dims.data(), n, taps, out);
    int64_t i = n - 1;
    while (i >= 0 && ++taps[i] == dims[i].k) taps[i--] = 0;
    if (i < 0) return;
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
               x.stride(lead + i), {}, {}};
    dims[i].ranges();
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
