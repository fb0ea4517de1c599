// walk_holds: whether what a walk of a model's parameters read still holds (fimfast/parameters.py,
// ParamWalk), checked without the interpreter: a loop over the dictionaries and parameters the
// walk read, comparing objects by identity and reading each parameter's requires_grad and sizes.
#include <torch/extension.h>

#include "param_walk.h"

namespace fimfast {
namespace {

// the dictionary `d` has exactly the keys and values of the tuples (by identity, in order)
bool same_items(PyObject* d, PyObject* keys, PyObject* values) {
  if (!PyDict_Check(d) || PyDict_Size(d) != PyTuple_GET_SIZE(keys)) return false;
  Py_ssize_t pos = 0, i = 0;
  PyObject *k, *v;
  while (PyDict_Next(d, &pos, &k, &v)) {
    if (k != PyTuple_GET_ITEM(keys, i) || v != PyTuple_GET_ITEM(values, i)) return false;
    ++i;
  }
  return true;
}

}  // namespace

bool walk_holds(const py::list& tables, const py::tuple& met, const py::tuple& grads,
                const py::tuple& params, const py::tuple& shapes) {
  // tables: (module.__dict__, attribute, dict, keys, values) of every dictionary read
  for (py::handle entry : tables) {
    PyObject* t = entry.ptr();
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 5) throw py::type_error("walk_holds: tables");
    PyObject* attrs = PyTuple_GET_ITEM(t, 0);
    if (!PyDict_Check(attrs)) return false;
    PyObject* d = PyDict_GetItemWithError(attrs, PyTuple_GET_ITEM(t, 1));  // borrowed
    if (d == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return false;
    }
    if (d != PyTuple_GET_ITEM(t, 2) ||
        !same_items(d, PyTuple_GET_ITEM(t, 3), PyTuple_GET_ITEM(t, 4))) {
      return false;
    }
  }
  // every parameter met keeps its requires_grad
  const Py_ssize_t n = PyTuple_GET_SIZE(met.ptr());
  if (PyTuple_GET_SIZE(grads.ptr()) != n) throw py::value_error("walk_holds: met and grads");
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = PyTuple_GET_ITEM(met.ptr(), i);
    if (!THPVariable_Check(p)) return false;
    if (THPVariable_Unpack(p).requires_grad() != (PyTuple_GET_ITEM(grads.ptr(), i) == Py_True)) {
      return false;
    }
  }
  // every trainable parameter keeps its sizes
  const Py_ssize_t m = PyTuple_GET_SIZE(params.ptr());
  if (PyTuple_GET_SIZE(shapes.ptr()) != m) throw py::value_error("walk_holds: params and shapes");
  for (Py_ssize_t i = 0; i < m; ++i) {
    PyObject* p = PyTuple_GET_ITEM(params.ptr(), i);
    PyObject* shape = PyTuple_GET_ITEM(shapes.ptr(), i);
    if (!THPVariable_Check(p) || !PyTuple_Check(shape)) return false;
    const at::Tensor& t = THPVariable_Unpack(p);
    if (t.is_nested() || t.layout() != at::kStrided) return false;  // let the walk decide
    const auto sizes = t.sizes();
    if (static_cast<Py_ssize_t>(sizes.size()) != PyTuple_GET_SIZE(shape)) return false;
    for (size_t j = 0; j < sizes.size(); ++j) {
      const long long s = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, j));
      if (s == -1 && PyErr_Occurred()) throw py::error_already_set();
      if (s != sizes[j]) return false;
    }
  }
  return true;
}

}  // namespace fimfast
