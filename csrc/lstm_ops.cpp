// Operator schemas of lstm_ext, their autocast rule, and the Python module stub.
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <Python.h>
#include <torch/library.h>

#include <optional>
#include <vector>

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
  // The same three for the cells without a cell state, by torch's RNN mode: "GRU",
  // "RNN_TANH" or "RNN_RELU". `saved` is what the backward needs of each step (the GRU's
  // r, z, n and W_hn h + b_hn; the RNN's h).
  m.def(
      "rnn_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? batch_sizes, bool reverse, str mode) -> (Tensor y, Tensor h_n, Tensor saved)");
  m.def(
      "rnn_inference(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? batch_sizes, bool reverse, str mode) -> (Tensor y, Tensor h_n)");
  m.def(
      "rnn_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, "
      "Tensor? batch_sizes, bool reverse, str mode, Tensor y, Tensor saved, bool[3] output_mask) "
      "-> (Tensor dx, Tensor dh0, Tensor dw_ih, Tensor dw_hh, Tensor db_ih, Tensor db_hh)");
  // Inference through a stack of single-direction layers without dropout, by mode ("LSTM"
  // or an RNN mode): h0 (L, N, P), c0 (L, N, H) for the LSTM, and per layer w_ih, w_hh,
  // [b_ih, b_hh,] [w_hr]. Returns the last layer's y, and h_n, c_n (L, N, *); c_n is
  // empty without a cell state. On CPU the layers overlap in time (a wavefront).
  m.def(
      "stack_inference(Tensor x, Tensor h0, Tensor? c0, Tensor[] weights, bool has_biases, "
      "bool has_projections, Tensor? batch_sizes, str mode) -> (Tensor y, Tensor h_n, Tensor c_n)");
  // The same stack for training, without autograd of its own (lstm_ext.ops wraps it):
  // every layer's y, h_n, c_n, and per layer what lstm_backward / rnn_backward read
  // (saved: the LSTM's gates or an RNN mode's saved values; cells and hidden empty where
  // the layer has none).
  m.def(
      "stack_forward(Tensor x, Tensor h0, Tensor? c0, Tensor[] weights, bool has_biases, "
      "bool has_projections, Tensor? batch_sizes, str mode) "
      "-> (Tensor[] ys, Tensor h_n, Tensor c_n, Tensor[] saved, Tensor[] cells, Tensor[] hidden)");
  // Its gradients: dx, dh0, dc0 (empty without a cell state) and the weights' gradients in
  // the weights' order; output_mask selects (dx, weight grads, bias grads), the unselected
  // come back empty. On CPU the layers' backwards overlap in time like the forwards.
  m.def(
      "stack_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor h0, Tensor? c0, "
      "Tensor[] weights, bool has_biases, bool has_projections, Tensor? batch_sizes, str mode, Tensor[] ys, "
      "Tensor[] saved, Tensor[] cells, Tensor[] hidden, bool[3] output_mask) "
      "-> (Tensor dx, Tensor dh0, Tensor dc0, Tensor[] dweights)");
}

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr char kForward[] = "lstm_ext::lstm_forward";
constexpr char kInference[] = "lstm_ext::lstm_inference";
constexpr char kBackward[] = "lstm_ext::lstm_backward";
constexpr char kRnnForward[] = "lstm_ext::rnn_forward";
constexpr char kRnnInference[] = "lstm_ext::rnn_inference";
constexpr char kRnnBackward[] = "lstm_ext::rnn_backward";
constexpr char kStackInference[] = "lstm_ext::stack_inference";
constexpr char kStackForward[] = "lstm_ext::stack_forward";
constexpr char kStackBackward[] = "lstm_ext::stack_backward";

using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using InferenceResult = std::tuple<Tensor, Tensor, Tensor>;
// The ops' C++ signatures (the schemas above).
using ForwardSignature = ForwardResult(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                       const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool);
using InferenceSignature = InferenceResult(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                           const OptTensor&, bool);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, bool, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, std::array<bool, 3>);
using RnnForwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                               const Tensor&, const OptTensor&, const OptTensor&,
                                                               const OptTensor&, bool, c10::string_view);
using RnnInferenceSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const OptTensor&, const OptTensor&, const OptTensor&, bool,
                                                         c10::string_view);
using StackInferenceSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                                   at::TensorList, bool, bool, const OptTensor&,
                                                                   c10::string_view);
using StackForwardSignature =
    std::tuple<std::vector<Tensor>, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>(
        const Tensor&, const Tensor&, const OptTensor&, at::TensorList, bool, bool, const OptTensor&,
        c10::string_view);
using StackBackwardSignature = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>>(
    const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const OptTensor&,
    at::TensorList, bool, bool, const OptTensor&, c10::string_view, at::TensorList, at::TensorList, at::TensorList,
    at::TensorList, std::array<bool, 3>);
using RnnBackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const OptTensor&, bool, c10::string_view, const Tensor&, const Tensor&, std::array<bool, 3>);

// Under autocast, run the layer in the autocast dtype, as nn.LSTM, nn.RNN and (on CUDA)
// nn.GRU do: the casts are ordinary ops, so autograd sees them and returns gradients in
// each input's dtype. On CPU nn.GRU keeps its state, and so its output, in the
// parameters' dtype: the GRU op runs uncast there.
inline bool is_gru(c10::string_view mode) { return mode == "GRU"; }
template <class T>
inline bool is_gru(const T&) {
  return false;
}

// An argument in the autocast dtype: tensors (and optional ones) cast, lists of them
// element by element, anything else as it is.
template <class T>
decltype(auto) autocast_arg(at::ScalarType dtype, const T& arg, c10::DeviceType device) {
  return at::autocast::cached_cast(dtype, arg, device);
}
inline std::vector<Tensor> autocast_arg(at::ScalarType dtype, at::TensorList args, c10::DeviceType device) {
  std::vector<Tensor> cast;
  cast.reserve(args.size());
  for (const Tensor& t : args) cast.push_back(at::autocast::cached_cast(dtype, t, device));
  return cast;
}

template <c10::DeviceType device, const char* op_name, class Signature>
struct Autocast;
template <c10::DeviceType device, const char* op_name, class Result, class... Args>
struct Autocast<device, op_name, Result(Args...)> {
  static Result call(Args... args) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow(op_name, "").typed<Result(Args...)>();
    if (device == c10::DeviceType::CPU && (is_gru(args) || ...)) return op.call(args...);
    const auto dtype = at::autocast::get_autocast_dtype(device);
    return op.call(autocast_arg(dtype, args, device)...);
  }
};

// Derivative guards. The ops' only derivatives are lstm_forward's and rnn_forward's
// reverse-mode ones (registered from Python; stack_forward's comes from lstm_ext.ops'
// StackFunction, which calls it under no_grad); anything else must fail loudly instead of
// returning outputs with no derivative attached. lstm_ext.functional's layers route
// forward-mode AD and torch.func transforms to the plain-PyTorch layer, so only direct op
// calls get here.
inline bool needs_derivative(const Tensor& t, bool reverse_mode) {
  return (reverse_mode && c10::GradMode::is_enabled() && t.requires_grad()) || t._fw_grad(/*level=*/0).defined();
}
inline bool needs_derivative(const OptTensor& t, bool reverse_mode) {
  return t.has_value() && needs_derivative(*t, reverse_mode);
}
inline bool needs_derivative(at::TensorList ts, bool reverse_mode) {
  for (const Tensor& t : ts) {
    if (needs_derivative(t, reverse_mode)) return true;
  }
  return false;
}
template <class T>
inline bool needs_derivative(const T&, bool) {
  return false;  // bools, bool[3], strings
}

// Refuses inputs that need a derivative the op does not have, then runs the op below
// autograd: `reverse_mode` also refuses inputs that require grad (used as the Autograd
// kernel of ops without one), else only forward-mode tangents (under lstm_forward's
// registered autograd, as its ADInplaceOrView kernel).
template <const char* op_name, bool reverse_mode, class Signature>
struct RefuseDerivatives;
template <const char* op_name, bool reverse_mode, class Result, class... Args>
struct RefuseDerivatives<op_name, reverse_mode, Result(Args...)> {
  static Result call(Args... args) {
    TORCH_CHECK(!(needs_derivative(args, reverse_mode) || ...), op_name, " has no ",
                reverse_mode ? "derivative" : "forward-mode derivative",
                ", but an input requires one; use lstm_ext.functional's layers, which pick a differentiable path");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow(op_name, "").typed<Result(Args...)>();
    return op.call(args...);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(lstm_ext, Autograd, m) {
  m.impl("lstm_inference", &RefuseDerivatives<kInference, true, InferenceSignature>::call);
  m.impl("lstm_backward", &RefuseDerivatives<kBackward, true, BackwardSignature>::call);
  m.impl("rnn_inference", &RefuseDerivatives<kRnnInference, true, RnnInferenceSignature>::call);
  m.impl("rnn_backward", &RefuseDerivatives<kRnnBackward, true, RnnBackwardSignature>::call);
  m.impl("stack_inference", &RefuseDerivatives<kStackInference, true, StackInferenceSignature>::call);
  m.impl("stack_forward", &RefuseDerivatives<kStackForward, true, StackForwardSignature>::call);
  m.impl("stack_backward", &RefuseDerivatives<kStackBackward, true, StackBackwardSignature>::call);
}

TORCH_LIBRARY_IMPL(lstm_ext, ADInplaceOrView, m) {
  m.impl("lstm_forward", &RefuseDerivatives<kForward, false, ForwardSignature>::call);
  m.impl("rnn_forward", &RefuseDerivatives<kRnnForward, false, RnnForwardSignature>::call);
}

namespace {
// The autocast kernels of one device.
template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  m.impl("lstm_forward", &Autocast<device, kForward, ForwardSignature>::call);
  m.impl("lstm_inference", &Autocast<device, kInference, InferenceSignature>::call);
  m.impl("rnn_forward", &Autocast<device, kRnnForward, RnnForwardSignature>::call);
  m.impl("rnn_inference", &Autocast<device, kRnnInference, RnnInferenceSignature>::call);
  if constexpr (device == c10::DeviceType::CPU) {  // a CPU-only op
    m.impl("stack_inference", &Autocast<device, kStackInference, StackInferenceSignature>::call);
  }
}
}  // namespace

TORCH_LIBRARY_IMPL(lstm_ext, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }

TORCH_LIBRARY_IMPL(lstm_ext, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }
