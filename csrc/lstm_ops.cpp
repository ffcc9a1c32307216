// Operator schemas of lstm_ext, their autocast rule, and the Python module stub.
#include <ATen/autocast_mode.h>
#include <Python.h>
#include <torch/library.h>

#include <optional>

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
  // lstm_forward without what the backward needs (and without autograd): for no_grad
  // and inference, faster and T times smaller in memory.
  m.def(
      "lstm_inference(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse) "
      "-> (Tensor y, Tensor h_n, Tensor c_n)");
  // Gradients of lstm_forward. output_mask selects (dx, weight grads, bias grad); the
  // unselected come back empty. db is the gradient of b_ih and of b_hh alike.
  m.def(
      "lstm_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor h0, "
      "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, "
      "Tensor y, Tensor gates, Tensor cells, Tensor hidden, bool[3] output_mask) "
      "-> (Tensor dx, Tensor dh0, Tensor dc0, Tensor dw_ih, Tensor dw_hh, Tensor db, Tensor dw_hr)");
}

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr char kForward[] = "lstm_ext::lstm_forward";
constexpr char kInference[] = "lstm_ext::lstm_inference";

// Under autocast, run the layer in the autocast dtype, as nn.LSTM does: the casts are
// ordinary ops, so autograd sees them and returns gradients in each input's dtype.
template <c10::DeviceType device, const char* op_name, class Result>
Result layer_autocast(const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                      const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                      const OptTensor& batch_sizes, bool reverse) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const auto dtype = at::autocast::get_autocast_dtype(device);
  auto cast = [&](const auto& t) { return at::autocast::cached_cast(dtype, t, device); };
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(op_name, "")
                       .typed<decltype(layer_autocast<device, op_name, Result>)>();
  return op.call(cast(x), cast(h0), cast(c0), cast(w_ih), cast(w_hh), cast(b_ih), cast(b_hh), cast(w_hr),
                 batch_sizes, reverse);
}

using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using InferenceResult = std::tuple<Tensor, Tensor, Tensor>;

}  // namespace

TORCH_LIBRARY_IMPL(lstm_ext, AutocastCPU, m) {
  m.impl("lstm_forward", &layer_autocast<c10::DeviceType::CPU, kForward, ForwardResult>);
  m.impl("lstm_inference", &layer_autocast<c10::DeviceType::CPU, kInference, InferenceResult>);
}

TORCH_LIBRARY_IMPL(lstm_ext, AutocastCUDA, m) {
  m.impl("lstm_forward", &layer_autocast<c10::DeviceType::CUDA, kForward, ForwardResult>);
  m.impl("lstm_inference", &layer_autocast<c10::DeviceType::CUDA, kInference, InferenceResult>);
}
