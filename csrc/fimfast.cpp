// fimfast._C: the schemas of the fimfast ops and the Python module that loads them.
//
// One registration per op and device: the CPU kernels live in csrc/cpu/<op>.cpp
// (TORCH_LIBRARY_IMPL(fimfast, CPU, ...)), the CUDA kernels in csrc/cuda/<op>.cu with their torch
// bindings beside them in csrc/cuda/<op>_binding.cpp (TORCH_LIBRARY_IMPL(fimfast, CUDA, ...),
// built only with a CUDA torch, WITH_CUDA defined). Both kernels of an op check their arguments
// with the same function of csrc/include/fimfast_checks.h. Fake (meta) implementations are
// registered from Python (fimfast/_ext.py) so torch.compile and torch.library.opcheck can trace
// the ops.
//
// Host functions of the Python module (no dispatcher op): the row checks of a batch on CPU tensors
// (csrc/cpu/label_range_finite.cpp), the walks of an autograd graph (csrc/graph_walk.cpp,
// csrc/tap_walk.cpp), the check of a parameter walk (csrc/param_walk.cpp), the windows of a
// convolution's kernel (csrc/cpu/unfold_windows.cpp), the three of a one-probe HUTCHINSON step
// in one call (csrc/one_probe_step.cpp) and the fold of its squares (csrc/cpu/fold_squares.cpp),
// the two of a one-column step (csrc/one_column_step.cpp) and the fold of its squares
// (csrc/fold_lanes.cpp, csrc/form_lanes.cpp), the squares that report their finiteness
// (csrc/cpu/squares_finite.cpp), each called from Python with a Python path beside it (fimfast/finite.py,
// fimfast/hutchinson.py, fimfast/persample/walk.py, fimfast/parameters.py, fimfast/rules/conv.py,
// fimfast/prepared.py, fimfast/state.py, fimfast/persample/prepared.py,
// fimfast/persample/lanes.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "fold_lanes.h"
#include "fold_squares.h"
#include "form_lanes.h"
#include "graph_walk.h"
#include "label_range_finite.h"
#include "one_column_step.h"
#include "one_probe_step.h"
#include "param_walk.h"
#include "squares_finite.h"
#include "tap_walk.h"
#include "unfold_windows.h"

TORCH_LIBRARY(fimfast, m) {
  m.def(
      "probe_logit_grad(Tensor logits, str probe_mode, int seed, int offset, int num_probes, "
      "Tensor? labels, Tensor? lam, Tensor? vec, float sigma2) -> Tensor");
  m.def("core_topk(Tensor p, int k, str solver, int iters) -> (Tensor, Tensor)");
  m.def("sq_matmul(Tensor g, Tensor a) -> Tensor");
  m.def("shared_sq(Tensor G, Tensor A) -> Tensor");
  m.def("pair_gram_(Tensor(a!) A, Tensor[] P, bool accumulate) -> ()");
  m.def("gram_upper_(Tensor(a!) out, Tensor x, bool accumulate) -> ()");
  m.def("mirror_upper_(Tensor(a!) m, float scale) -> ()");
  m.def("norm_terms(Tensor G, Tensor X, float? eps) -> (Tensor, Tensor)");
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
  m.def("label_range_finite", &fimfast::label_range_finite_cpu,
        "label_range_finite(labels, logits) -> (min label, max label, every logit finite) of "
        "CPU tensors");
  m.def("rows_all_valid", &fimfast::rows_all_valid_cpu,
        "rows_all_valid(logits, labels, ignore_index) -> whether the batch takes every row "
        "(fimfast.batch.rows)");
  m.def("all_finite", &fimfast::all_finite_cpu,
        "all_finite(t) -> whether every entry of a floating-point CPU tensor is finite");
  m.def("has_reentrant_checkpoint", &fimfast::has_reentrant_checkpoint,
        "whether the autograd graph of a tensor holds a reentrant checkpoint segment");
  m.def("unfold_windows", &fimfast::unfold_windows_cpu,
        "unfold_windows(x, kernel, dilation, stride, padding, size) -> the windows of a "
        "convolution's kernel over a CPU tensor, zero outside it (fimfast/rules/conv.py)");
  m.def("walk_holds", &fimfast::walk_holds,
        "whether what a walk of a model's parameters read still holds (fimfast.parameters)");
  m.def("one_probe_step", &fimfast::one_probe_step,
        "one_probe_step(logits, labels, ignore_index, mode, seed, offset) -> None unless the rows "
        "are all valid, else (the one probe of probe_logit_grad as (N, C), whether the graph "
        "holds a reentrant checkpoint) (fimfast.prepared)");
  m.def("fold_squares", &fimfast::fold_squares, py::call_guard<py::gil_scoped_release>(),
        "fold_squares(states, grads) -> whether it added every grads[i] ** 2 to states[i] in "
        "place, as torch._foreach_addcmul_(states, grads, grads) (fimfast.state)");
  m.def("tap_walk", &fimfast::tap_walk,
        "tap_walk(flat, params, probes) -> (edges into each parameter, whether each probe is "
        "reached, whether a reentrant checkpoint is on the way, a hash of its nodes' types and "
        "constants) "
        "of the autograd graph of flat "
        "(fimfast.persample.walk)");
  m.def("one_column_step", &fimfast::one_column_step,
        "one_column_step(logits, labels, ignore_index, mode, seed, offset) -> None unless the "
        "rows are all valid, else the score column of probe_logit_grad (mode empirical or mc) as "
        "(1, N, C) (fimfast.persample.prepared)");
  m.def("fold_lanes", &fimfast::fold_lanes,
        "fold_lanes(values, G, A, weight, bias, transposed) -> whether it added the squares of "
        "every entry into the values (bias: sum of G**2 over rows; weight: (G**2)^T A**2), as "
        "the Python path of a prepared one-column step does, bit for bit "
        "(fimfast.persample.lanes)");
  m.def("form_lanes", &fimfast::form_lanes,
        "form_lanes(values, G, A, weight, bias, transposed) -> None, or per value whether it is "
        "known finite after fold_lanes' squares were written into the fresh values (weight: "
        "(G**2)^T A**2; bias: sum of G**2 over rows; others zero) (fimfast.persample.lanes)");
  m.def("square_finite", &fimfast::square_finite, py::call_guard<py::gil_scoped_release>(),
        "square_finite(tensors, scale) -> None, or per tensor whether every entry is finite "
        "after t = t * t * scale in place, as torch._foreach_mul_ (fimfast.step)");
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
