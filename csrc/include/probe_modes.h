// Modes of probe_logit_grad, shared by the CPU kernels and the CUDA bindings.
#pragma once

#include <stdexcept>
#include <string>

#include "fimfast_rng.h"

namespace fimfast {

// The numeric values are the mode ids the CUDA launchers take (csrc/cuda/probe_logit_grad.cu).
enum class ProbeMode : int {
  kHutchinson = 0,
  kSqrt = 1,
  kDg = 2,
  kRankk = 3,
  kEmpirical = 4,
  kMc = 5,
  kBernoulli = 6,
  kGaussian = 7,
};

inline ProbeMode parse_probe_mode(const std::string& mode) {
  if (mode == "hutchinson") return ProbeMode::kHutchinson;
  if (mode == "sqrt") return ProbeMode::kSqrt;
  if (mode == "dg") return ProbeMode::kDg;
  if (mode == "rankk") return ProbeMode::kRankk;
  if (mode == "empirical") return ProbeMode::kEmpirical;
  if (mode == "mc") return ProbeMode::kMc;
  if (mode == "bernoulli") return ProbeMode::kBernoulli;
  if (mode == "gaussian") return ProbeMode::kGaussian;
  throw std::invalid_argument("probe_logit_grad: unknown mode '" + mode + "'");
}

// Everything a probe_logit_grad kernel needs besides the pointers.
struct ProbeArgs {
  ProbeMode mode;
  int64_t R, C, S, K;  // rows, classes, probes, eigenpairs (rankk)
  uint64_t offset;     // first counter of the call
  rng::Keys sign_keys, unif_keys;
  double sigma2;
};

}  // namespace fimfast
