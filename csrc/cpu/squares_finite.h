// Squares that report whether they are finite, in the pass that writes them
// (csrc/cpu/squares_finite.cpp; fimfast/known_finite.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace fimfast {

// t = t * t, then t = t * scale unless scale == 1, in place for every tensor, what
// torch._foreach_mul_(ts, ts) and torch._foreach_mul_(ts, scale) compute, bit for bit; with, per
// tensor, whether every result is finite. None, with nothing written, unless every tensor is a
// CPU float32|float64 contiguous tensor that may be written in place (no gradient required, not
// an inference tensor); the caller then runs torch's.
std::optional<std::vector<bool>> square_finite(const std::vector<at::Tensor>& ts, double scale);

// x**2 in dtype dt as a fresh contiguous tensor (x.square() bit for bit), with the largest square
// in `top` (NaN when a square is NaN; +inf when one overflows). Defined for a contiguous x of
// dtype dt (float32|float64); false, with nothing formed, otherwise.
bool square_top(const at::Tensor& x, at::ScalarType dt, at::Tensor& out, double& top);

}  // namespace fimfast
