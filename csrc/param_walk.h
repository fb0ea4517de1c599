// The check of csrc/param_walk.cpp.
#pragma once

#include <torch/extension.h>

namespace fimfast {

// whether the dictionaries, requires_grad flags and sizes a parameter walk read still hold
bool walk_holds(const py::list& tables, const py::tuple& met, const py::tuple& grads,
                const py::tuple& params, const py::tuple& shapes);

}  // namespace fimfast
