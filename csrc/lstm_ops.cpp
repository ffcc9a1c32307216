// Operator schemas of lstm_ext, and the Python module stub that loads them.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import lstm_ext._C` runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lstm_ext, m) {
  // One single-direction layer over a whole sequence. Returns y, h_n, c_n and, for the
  // backward, the gate activations, the cell states and (with w_hr) o * tanh(c).
  m.def(
      "lstm_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse) "
      "-> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells, Tensor hidden)");
  // Gradients of lstm_forward. output_mask selects (dx, weight grads, bias grad); the
  // unselected come back empty. db is the gradient of b_ih and of b_hh alike.
  m.def(
      "lstm_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor h0, "
      "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, "
      "Tensor y, Tensor gates, Tensor cells, Tensor hidden, bool[3] output_mask) "
      "-> (Tensor dx, Tensor dh0, Tensor dc0, Tensor dw_ih, Tensor dw_hh, Tensor db, Tensor dw_hr)");
}
