// The windows of a convolution's kernel over a tensor on the CPU (csrc/cpu/unfold_windows.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace fimfast {

// x (*lead, *spatial) with 1 to 3 spatial dims, any strides: out (*lead, *kernel, *size),
// contiguous, out[..., t, l] = x[..., l * stride - padding + t * dilation] per spatial dim, zero
// where that index lies outside the input
at::Tensor unfold_windows_cpu(const at::Tensor& x, const std::vector<int64_t>& kernel,
                              const std::vector<int64_t>& dilation,
                              const std::vector<int64_t>& stride,
                              const std::vector<int64_t>& padding,
                              const std::vector<int64_t>& size);

}  // namespace fimfast
