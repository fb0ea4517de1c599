// The CPU kernel of the op probe_logit_grad (csrc/cpu/probe_logit_grad.cpp), for the host
// functions that call it without the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>

namespace fimfast {

// torch.ops.fimfast.probe_logit_grad on CPU tensors: (S, R, C) float32|float64
at::Tensor probe_logit_grad_cpu(const at::Tensor& logits, c10::string_view mode, int64_t seed,
                                int64_t offset, int64_t num_probes,
                                const std::optional<at::Tensor>& labels,
                                const std::optional<at::Tensor>& lam,
                                const std::optional<at::Tensor>& vec, double sigma2);

}  // namespace fimfast
