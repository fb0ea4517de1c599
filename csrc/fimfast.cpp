// fimfast._C: the schemas of the fimfast ops and the Python module that loads them.
//
// One registration per op and device: the CPU kernels live in csrc/cpu/<op>.cpp
// (TORCH_LIBRARY_IMPL(fimfast, CPU, ...)), the CUDA kernels in csrc/cuda/<op>.cu with their torch
// bindings beside them in csrc/cuda/<op>_binding.cpp (TORCH_LIBRARY_IMPL(fimfast, CUDA, ...),
// built only with a CUDA torch, WITH_CUDA defined). Both kernels of an op check their arguments
// with the same function of csrc/include/fimfast_checks.h. Fake (meta) implementations are
// registered from Python (fimfast/_ext.py) so torch.compile and torch.library.opcheck can trace
// the ops.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(fimfast, m) {
  m.def(
      "probe_logit_grad(Tensor logits, str probe_mode, int seed, int offset, int num_probes, "
      "Tensor? labels, Tensor? lam, Tensor? vec, float sigma2) -> Tensor");
  m.def("core_topk(Tensor p, int k, str solver, int iters) -> (Tensor, Tensor)");
  m.def("sq_matmul(Tensor g, Tensor a) -> Tensor");
  m.def("shared_sq(Tensor G, Tensor A) -> Tensor");
  m.def(
      "accumulate_(Tensor(a!)[] states, Tensor[] grads, str update_mode, float beta, "
      "float scale) -> ()");
  m.def(
      "recurrent_bptt(str mode, Tensor[] saved, Tensor whh, Tensor dys, Tensor dh, Tensor? dc, "
      "bool reverse) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "recurrent_forward(str mode, Tensor gi, Tensor h0, Tensor? c0, Tensor whh, Tensor? bhh, "
      "bool reverse) -> (Tensor, Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fimfast compiled kernels (ops registered under torch.ops.fimfast)";
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
