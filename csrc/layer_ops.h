// The ops' entry points, for any Backend: lstm_forward / lstm_inference / lstm_backward
// and rnn_forward / rnn_inference / rnn_backward (GRU, RNN tanh and relu, by `mode`),
// all on the one generic layer below.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <array>
#include <memory>
#include <string_view>
#include <vector>
#include <tuple>
#include <utility>

#include "cells.h"
#include "layer_geometry.h"
#include "time_loop.h"

namespace lstm_ext {

inline constexpr char kLstmOp[] = "lstm_ext.lstm_layer";
inline constexpr char kRnnOp[] = "lstm_ext.rnn_layer";
inline constexpr char kStackOp[] = "lstm_ext.stack_inference";
inline constexpr char kStackForwardOp[] = "lstm_ext.stack_forward";
inline constexpr char kStackBackwardOp[] = "lstm_ext.stack_backward";

// A forward's outputs: y, h_n, c_n (empty without a cell state) and, for the backward,
// what each step saved, the cell states and (with a projection) the unprojected h.
struct ForwardResult {
  Tensor y, h_n, c_n, saved, cells, hidden;
};

struct BackwardResult {
  Tensor dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr;
};

// The tensors the kernels read, contiguous; c0 and w_hr undefined where absent.
struct Operands {
  Tensor x, h0, c0, w_ih, w_hh, w_hr;
};

inline Operands contiguous_operands(const LayerArgs& a) {
  auto optional = [](const OptTensor& t) { return t ? t->contiguous() : Tensor(); };
  return {a.x.contiguous(),    a.h0.contiguous(),   optional(a.c0),
          a.w_ih.contiguous(), a.w_hh.contiguous(), optional(a.w_hr)};
}

// A layer forward, checked and with every tensor it writes allocated, ready to run.
struct ForwardPlan {
  LayerDims d;
  Schedule sc;
  Operands o;
  Tensor bias, bias_hh, saved, recurrent, y, cells, hidden;
  bool for_backward;
  int64_t block_steps;
};

// for_backward: keep what the backward needs (saved, cells, hidden); otherwise the
// forward keeps only one step of them. block_steps: at most this many steps per
// input-projection GEMM (0: all steps for the backward, for inference as many as the
// backend's inference_block_bytes hold; a stack's wavefront asks for fewer). cells_out:
// where inference keeps its running cells, (N, hidden_size), if not in a new tensor.
template <class Backend, class Cell>
ForwardPlan plan_forward(const LayerArgs& in, bool for_backward, const char* op, int64_t block_steps = 0,
                         const Tensor& cells_out = Tensor()) {
  ForwardPlan f;
  f.d = check_layer_inputs(in, Cell::kGates, op);
  const LayerDims& d = f.d;
  f.o = contiguous_operands(in);
  f.sc = make_schedule(d, in.batch_sizes);
  f.for_backward = for_backward;
  const auto opts = f.o.x.options();
  const int64_t G = Cell::kGates * d.H, W = Cell::kSaved * d.H;
  const int64_t step_bytes = std::max<int64_t>(1, d.N * W * f.o.x.element_size());
  const int64_t cache_steps =
      std::clamp<int64_t>(Backend::inference_block_bytes(f.o.x.scalar_type()) / step_bytes, 1, d.T);
  const int64_t max_block_steps = for_backward ? d.T : cache_steps;
  f.block_steps = block_steps > 0 ? std::min(block_steps, max_block_steps) : max_block_steps;

  // The cell kernels add the biases: broadcasting them into the pre-activations before
  // the input projection cost a pass over all of them (5% of an LSTM forward at H=128).
  auto bias_or_zeros = [&](const OptTensor& b) { return b ? b->contiguous() : at::zeros({G}, opts); };
  if (Cell::kSeparateRecurrent) {
    f.bias = bias_or_zeros(in.b_ih);
    f.bias_hh = bias_or_zeros(in.b_hh);
  } else {
    f.bias = in.b_ih && in.b_hh ? *in.b_ih + *in.b_hh : bias_or_zeros(in.b_ih ? in.b_ih : in.b_hh);
  }
  f.saved = at::empty(for_backward ? seq_shape(d, W) : std::vector<int64_t>{f.block_steps * d.N, W}, opts);
  f.recurrent = Cell::kSeparateRecurrent ? at::empty({d.N, G}, opts) : Tensor();
  f.y = at::empty(seq_shape(d, d.P), opts);
  const Tensor none = at::empty({0}, opts);
  f.cells = !Cell::kCarriesCell ? none
            : for_backward      ? at::empty(seq_shape(d, d.H), opts)
            : cells_out.defined() ? cells_out.copy_(f.o.c0)
                                : f.o.c0.clone(at::MemoryFormat::Contiguous);
  f.hidden = !d.projected ? none : for_backward ? at::empty(seq_shape(d, d.H), opts) : at::empty({d.N, d.H}, opts);
  return f;
}

// Runs a planned forward; `input` and `output` as in forward_time_loop. Allocates nothing
// but the backend's prepared weights.
template <class Backend, class Cell>
void run_forward(const ForwardPlan& f, const LayerProgress* input = nullptr, LayerProgress* output = nullptr) {
  const Operands& o = f.o;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.x.scalar_type(), "layer_forward", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr<scalar_t>() : nullptr; };
    const ForwardData<scalar_t> data{ptr(o.x),    ptr(o.w_ih), ptr(o.w_hh), ptr(o.w_hr), ptr(f.bias),
                                     ptr(f.bias_hh), ptr(o.h0), ptr(o.c0), ptr(f.y)};
    const ForwardState<scalar_t> state{ptr(f.saved),  ptr(f.recurrent), ptr(f.cells),
                                       ptr(f.hidden), f.for_backward,   f.block_steps};
    forward_time_loop<Backend, Cell, scalar_t>(f.d, f.sc, data, state, input, output);
  });
}

// A run forward's outputs.
template <class Cell>
ForwardResult forward_result(const ForwardPlan& f) {
  const Tensor none = at::empty({0}, f.y.options());
  const Tensor h_n = final_state(f.d, f.sc, f.y);
  if (!f.for_backward) return {f.y, h_n, Cell::kCarriesCell ? f.cells : none, none, none, none};
  return {f.y, h_n, Cell::kCarriesCell ? final_state(f.d, f.sc, f.cells) : none, f.saved, f.cells, f.hidden};
}

template <class Backend, class Cell>
ForwardResult layer_forward(const LayerArgs& in, bool for_backward, const char* op) {
  const typename Backend::DeviceGuard guard(in.x.device());
  const ForwardPlan f = plan_forward<Backend, Cell>(in, for_backward, op);
  run_forward<Backend, Cell>(f);
  return forward_result<Cell>(f);
}

// A layer backward, checked and with every tensor it writes allocated, ready to run.
struct BackwardPlan {
  LayerDims d;
  Schedule sc;
  Operands o;
  Tensor y, saved, cells, hidden, dhy, dc, d_input, d_recurrent, dh0, dr, dx;
  float dx_beta = 0;  // 1 where dx is the dhy of the layer below
};

// step_grads: where a layer of the same shape has finished with its d_input and
// d_recurrent, they serve this one too: new buffers of that size would cost page faults
// (2-4% of a 2-layer backward at B=50 T=50 H=256).
template <class Cell>
BackwardPlan plan_backward(const OptTensor& grad_y, const OptTensor& grad_hn, const OptTensor& grad_cn,
                           const LayerArgs& in, const Tensor& y_in, const Tensor& saved_in, const Tensor& cells_in,
                           const Tensor& hidden_in, bool want_dx, const char* op,
                           const BackwardPlan* step_grads = nullptr) {
  BackwardPlan b;
  b.d = check_layer_inputs(in, Cell::kGates, op);
  const LayerDims& d = b.d;
  b.o = contiguous_operands(in);
  b.y = y_in.contiguous(), b.saved = saved_in.contiguous(), b.cells = cells_in.contiguous();
  b.hidden = hidden_in.contiguous();
  const int64_t G = Cell::kGates * d.H;
  check_shape(op, b.y, seq_shape(d, d.P), "y");
  check_shape(op, b.saved, seq_shape(d, Cell::kSaved * d.H), Cell::kCarriesCell ? "gates" : "saved");
  if (Cell::kCarriesCell) check_shape(op, b.cells, seq_shape(d, d.H), "cells");
  if (d.projected) check_shape(op, b.hidden, seq_shape(d, d.H), "hidden");
  b.sc = make_schedule(d, in.batch_sizes);
  const auto opts = b.o.x.options();

  // dhy's row of h_t collects every gradient reaching h_t: from y, from h_n, and from step t+1.
  b.dhy = grad_y ? grad_y->to(opts, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous)
                 : at::zeros(seq_shape(d, d.P), opts);
  check_shape(op, b.dhy, seq_shape(d, d.P), "grad_y");
  if (grad_hn) {
    check_shape(op, *grad_hn, {d.N, d.P}, "grad_h_n");
    if (d.packed) {
      b.dhy.index_add_(0, final_rows(d, b.sc, b.o.x.device()), grad_hn->to(opts));
    } else {
      b.dhy.select(0, d.reverse ? 0 : d.T - 1).add_(*grad_hn);
    }
  }
  const Tensor none = at::empty({0}, opts);
  b.dc = none;
  if (Cell::kCarriesCell) {
    b.dc = grad_cn ? grad_cn->to(opts, false, true, at::MemoryFormat::Contiguous) : at::zeros({d.N, d.H}, opts);
    check_shape(op, b.dc, {d.N, d.H}, "grad_c_n");
  }
  auto step_grad = [&](const Tensor& free) {
    return free.defined() && free.sizes() == at::IntArrayRef(seq_shape(d, G)) ? free : at::empty(seq_shape(d, G), opts);
  };
  b.d_input = step_grad(step_grads ? step_grads->d_input : Tensor());
  b.d_recurrent = Cell::kSeparateRecurrent ? step_grad(step_grads ? step_grads->d_recurrent : Tensor()) : b.d_input;
  b.dh0 = at::zeros({d.N, d.P}, opts);
  b.dr = d.projected ? at::empty({d.N, d.H}, opts) : none;
  b.dx = want_dx ? at::empty(seq_shape(d, d.I), opts) : none;
  return b;
}

// Runs a planned backward; `input`, `output` and block_steps as in backward_time_loop.
template <class Backend, class Cell>
void run_backward(const BackwardPlan& b, const LayerProgress* input = nullptr, LayerProgress* output = nullptr,
                  int64_t block_steps = 0) {
  const Operands& o = b.o;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.x.scalar_type(), "layer_backward", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr<scalar_t>() : nullptr; };
    const BackwardData<scalar_t> data{ptr(b.saved),   ptr(b.cells),       ptr(b.y),      ptr(o.h0),
                                      ptr(o.c0),      ptr(o.w_ih),        ptr(o.w_hh),   ptr(o.w_hr),
                                      ptr(b.dhy),     ptr(b.dc),          ptr(b.d_input), ptr(b.d_recurrent),
                                      ptr(b.dh0),     ptr(b.dr),          ptr(b.dx)};
    backward_time_loop<Backend, Cell, scalar_t>(b.d, b.sc, data, input, output, block_steps, b.dx_beta);
  });
}

// A run backward's gradients. output_mask: which of (dx, weight gradients, bias
// gradients) to return; the others come back empty. dh0 (and dc0) always: they cost
// nothing extra.
template <class Backend, class Cell>
BackwardResult backward_result(const BackwardPlan& b, std::array<bool, 3> output_mask) {
  const LayerDims& d = b.d;
  const int64_t G = Cell::kGates * d.H;
  const Tensor none = at::empty({0}, b.dhy.options());
  BackwardResult r{output_mask[0] ? b.dx : none, b.dh0, Cell::kCarriesCell ? b.dc : none, none, none, none, none,
                   none};
  const Tensor d_input_2d = b.d_input.view({d.R, G}), d_recurrent_2d = b.d_recurrent.view({d.R, G});
  if (output_mask[1]) {
    r.dw_ih = Backend::weight_grad(d_input_2d, b.o.x.view({d.R, d.I}));
    if (d.packed) {
      r.dw_hh = Backend::weight_grad(d_recurrent_2d, packed_previous_hidden(d, b.sc, b.y, b.o.h0));
    } else {
      // Every step but the first reads h from y one step back (shifted views, no copy);
      // the first reads h0.
      const Tensor d_carry = b.d_recurrent.narrow(0, d.reverse ? 0 : 1, d.T - 1).reshape({(d.T - 1) * d.N, G});
      const Tensor h_carry = b.y.narrow(0, d.reverse ? 1 : 0, d.T - 1).reshape({(d.T - 1) * d.N, d.P});
      r.dw_hh = Backend::weight_grad(d_carry, h_carry);
      r.dw_hh.addmm_(b.d_recurrent.select(0, d.reverse ? d.T - 1 : 0).t(), b.o.h0);
    }
    if (d.projected) r.dw_hr = Backend::weight_grad(b.dhy.view({d.R, d.P}), b.hidden.view({d.R, d.H}));
  }
  if (output_mask[2]) {
    r.db_ih = d_input_2d.sum(0);
    // Outputs of an op may not alias: the copy costs G elements.
    r.db_hh = Cell::kSeparateRecurrent ? d_recurrent_2d.sum(0) : r.db_ih.clone();
  }
  return r;
}

template <class Backend, class Cell>
BackwardResult layer_backward(const OptTensor& grad_y, const OptTensor& grad_hn, const OptTensor& grad_cn,
                              const LayerArgs& in, const Tensor& y, const Tensor& saved, const Tensor& cells,
                              const Tensor& hidden, std::array<bool, 3> output_mask, const char* op) {
  const typename Backend::DeviceGuard guard(in.x.device());
  const BackwardPlan b = plan_backward<Cell>(grad_y, grad_hn, grad_cn, in, y, saved, cells, hidden, output_mask[0], op);
  run_backward<Backend, Cell>(b);
  return backward_result<Backend, Cell>(b, output_mask);
}

// ---- LSTM ops ----

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
    bool reverse) {
  const auto r = layer_forward<Backend, LstmCell>({x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse},
                                                  true, kLstmOp);
  return {r.y, r.h_n, r.c_n, r.saved, r.cells, r.hidden};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor> lstm_inference(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
    bool reverse) {
  const auto r = layer_forward<Backend, LstmCell>({x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse},
                                                  false, kLstmOp);
  return {r.y, r.h_n, r.c_n};
}

// db is the gradient of b_ih and of b_hh alike.
template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward(
    const OptTensor& grad_y, const OptTensor& grad_hn, const OptTensor& grad_cn, const Tensor& x,
    const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& w_hr,
    const OptTensor& batch_sizes, bool reverse, const Tensor& y, const Tensor& gates, const Tensor& cells,
    const Tensor& hidden, std::array<bool, 3> output_mask) {
  const auto r = layer_backward<Backend, LstmCell>(
      grad_y, grad_hn, grad_cn, {x, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr, batch_sizes, reverse}, y,
      gates, cells, hidden, output_mask, kLstmOp);
  return {r.dx, r.dh0, r.dc0, r.dw_ih, r.dw_hh, r.db_ih, r.dw_hr};
}

// ---- GRU and RNN ops ----

// fn(Cell{}) for the cell that torch's RNN `mode` names.
template <class Fn>
auto with_cell(c10::string_view mode, const Fn& fn) {
  const std::string_view m(mode.data(), mode.size());
  if (m == "GRU") return fn(GruCell{});
  if (m == "RNN_TANH") return fn(RnnTanhCell{});
  TORCH_CHECK(m == "RNN_RELU", kRnnOp, ": mode must be GRU, RNN_TANH or RNN_RELU, but got '", m, "'");
  return fn(RnnReluCell{});
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor> rnn_forward(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                               const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                               const OptTensor& batch_sizes, bool reverse, c10::string_view mode) {
  const auto r = with_cell(mode, [&](auto cell) {
    return layer_forward<Backend, decltype(cell)>(
        {x, h0, std::nullopt, w_ih, w_hh, b_ih, b_hh, std::nullopt, batch_sizes, reverse}, true, kRnnOp);
  });
  return {r.y, r.h_n, r.saved};
}

template <class Backend>
std::tuple<Tensor, Tensor> rnn_inference(const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
                                         const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& batch_sizes,
                                         bool reverse, c10::string_view mode) {
  const auto r = with_cell(mode, [&](auto cell) {
    return layer_forward<Backend, decltype(cell)>(
        {x, h0, std::nullopt, w_ih, w_hh, b_ih, b_hh, std::nullopt, batch_sizes, reverse}, false, kRnnOp);
  });
  return {r.y, r.h_n};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rnn_backward(
    const OptTensor& grad_y, const OptTensor& grad_hn, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const OptTensor& batch_sizes, bool reverse, c10::string_view mode, const Tensor& y,
    const Tensor& saved, std::array<bool, 3> output_mask) {
  const auto r = with_cell(mode, [&](auto cell) {
    return layer_backward<Backend, decltype(cell)>(
        grad_y, grad_hn, std::nullopt,
        {x, h0, std::nullopt, w_ih, w_hh, std::nullopt, std::nullopt, std::nullopt, batch_sizes, reverse}, y, saved,
        Tensor(), Tensor(), output_mask, kRnnOp);
  });
  return {r.dx, r.dh0, r.dw_ih, r.dw_hh, r.db_ih, r.db_hh};
}

// ---- Stacks of layers ----

// A stack of single-direction layers without dropout, each reading the y of the one below:
// h0 (L, N, P), c0 (L, N, H) for the LSTM, and per layer w_ih, w_hh, then b_ih, b_hh if
// has_biases and w_hr if has_projections. Where the Backend lets layers overlap
// (Backend::overlap_layers: on CPU, small steps or weights), each runs on its own thread a
// few steps behind the one below: a wavefront, which keeps the cores busy at shapes whose
// steps are too small to split between them. for_backward: each layer keeps what its
// backward needs, as lstm_forward / rnn_forward do.
struct StackRun {
  std::vector<ForwardPlan> plans;
  Tensor h_n, c_n;  // c_n empty without a cell state
};

// A stack's weights per layer and its number of layers, checked against h0 (L, N, *).
inline std::pair<int64_t, int64_t> stack_layers(at::TensorList weights, bool has_biases, bool has_projections,
                                                const Tensor& h0, const char* op) {
  const int64_t per_layer = 2 + 2 * has_biases + has_projections;
  const int64_t layers = static_cast<int64_t>(weights.size()) / per_layer;
  TORCH_CHECK(layers > 0 && layers * per_layer == static_cast<int64_t>(weights.size()), op, ": expected ",
              per_layer, " weights per layer, but got ", weights.size(), " in all");
  TORCH_CHECK(h0.dim() == 3 && h0.size(0) == layers, op, ": expected h0 of shape (", layers,
              ", N, *) for ", layers, " layers, but got ", h0.sizes());
  return {per_layer, layers};
}

// Layer l of a stack as a layer call, reading `input` (x, or the y of layer l - 1).
inline LayerArgs stack_layer_args(const Tensor& input, const Tensor& h0, const OptTensor& c0, at::TensorList weights,
                                  bool has_biases, bool has_projections, const OptTensor& batch_sizes, int64_t l) {
  const int64_t per_layer = 2 + 2 * has_biases + has_projections;
  const Tensor* w = weights.data() + l * per_layer;
  return {input,
          h0[l],
          c0 ? OptTensor((*c0)[l]) : std::nullopt,
          w[0],
          w[1],
          has_biases ? OptTensor(w[2]) : std::nullopt,
          has_biases ? OptTensor(w[3]) : std::nullopt,
          has_projections ? OptTensor(w[per_layer - 1]) : std::nullopt,
          batch_sizes,
          false};
}

inline int64_t stack_steps(const Tensor& x, const OptTensor& batch_sizes) {
  return batch_sizes ? batch_sizes->numel() : x.dim() > 0 ? x.size(0) : 0;
}

// Whether the layers of a stack overlap in time (Backend::overlap_layers, or for the
// backward overlap_layer_backwards), given its largest recurrent GEMM (N x P by P x G)
// and weight. A one-step call (generation) has nothing to overlap.
template <class Backend>
bool stack_overlaps(const Tensor& h0, at::TensorList weights, int64_t per_layer, int64_t steps, bool backward) {
  const int64_t layers = h0.size(0);
  int64_t step_flops = 0, weight_bytes = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const Tensor& w_hh = weights[l * per_layer + 1];
    step_flops = std::max(step_flops, 2 * h0.size(1) * w_hh.numel());
    weight_bytes = std::max(weight_bytes, static_cast<int64_t>(w_hh.nbytes()));
  }
  if (steps <= 1) return false;
  return backward ? Backend::overlap_layer_backwards(layers, step_flops)
                  : Backend::overlap_layers(layers, step_flops, weight_bytes);
}

// How many steps a layer of an overlapped stack runs between telling the next one: small
// blocks keep the wavefront's lag, and the time a thread idles at its start, short, but
// each block's input projection (or dx) is a GEMM call of its own. float32: two steps. On
// the Intel Xeon, one process alternating, a 2-layer training forward at T=100 took 3-5%
// less than with blocks of T/16 steps (B=64 H=256, B=32 H=128); B=8-16 at H=64-128,
// no_grad forwards and tiny-step backwards the same within 2%. Other dtypes: T/16. Two-step
// blocks made bfloat16 forwards at T=100 3-25% slower (its projections on AMX go through
// ATen, at a fixed cost per call), float64's within 3% either way.
inline int64_t wavefront_block_steps(int64_t steps, at::ScalarType dtype) {
  return dtype == at::kFloat ? std::min<int64_t>(steps, 2) : std::max<int64_t>(1, steps / 16);
}

template <class Backend, class Cell>
StackRun run_stack(const Tensor& x, const Tensor& h0, const OptTensor& c0, at::TensorList weights, bool has_biases,
                   bool has_projections, const OptTensor& batch_sizes, bool for_backward, const char* op) {
  const std::pair<int64_t, int64_t> shape = stack_layers(weights, has_biases, has_projections, h0, op);
  const int64_t per_layer = shape.first, layers = shape.second;
  TORCH_CHECK(c0.has_value() == Cell::kCarriesCell, op, ": c0 is for the LSTM, and it needs one");
  TORCH_CHECK(!c0 || (c0->dim() == 3 && c0->size(0) == layers), op, ": expected c0 of shape (", layers,
              ", N, hidden_size), but got ", c0 ? c0->sizes() : h0.sizes());
  const typename Backend::DeviceGuard guard(x.device());
  const int64_t steps = stack_steps(x, batch_sizes);
  const bool overlap = stack_overlaps<Backend>(h0, weights, per_layer, steps, false);
  // Every check and allocation comes first, so that running cannot fail halfway.
  // Inference: each layer's running cells are its slice of c_n, and its final h is
  // copied into h_n's: no stacking of per-layer states after the run (generation calls
  // this per character, where such small ATen calls add up).
  StackRun run;
  run.h_n = at::empty(h0.sizes(), x.options());
  run.c_n = c0 ? at::empty(c0->sizes(), x.options()) : at::empty({0}, x.options());
  std::vector<ForwardPlan>& plans = run.plans;
  plans.reserve(layers);
  for (int64_t l = 0; l < layers; ++l) {
    const LayerArgs args = stack_layer_args(l == 0 ? x : plans.back().y, h0, c0, weights, has_biases,
                                            has_projections, batch_sizes, l);
    // A layer reading another as it runs waits for each block of its input steps. The
    // first layer projects in such blocks too, or the next one would wait for all of its
    // input projection (at B=8 T=50 H=64, half of its work) before starting.
    const int64_t block_steps = overlap ? wavefront_block_steps(steps, x.scalar_type()) : 0;
    const Tensor cells_out = c0 && !for_backward ? run.c_n[l] : Tensor();
    plans.push_back(plan_forward<Backend, Cell>(args, for_backward, op, block_steps, cells_out));
  }
  std::unique_ptr<LayerProgress[]> progress(new LayerProgress[layers]);
  Backend::for_each_layer(layers, overlap, [&](int64_t l) {
    // Without overlap the layers run one after another, each as lstm_forward would.
    const LayerProgress* input = overlap && l > 0 ? &progress[l - 1] : nullptr;
    try {
      run_forward<Backend, Cell>(plans[l], input, overlap ? &progress[l] : nullptr);
    } catch (...) {
      progress[l].fail();  // the layers above stop waiting
      throw;
    }
  });
  for (int64_t l = 0; l < layers; ++l) {
    const ForwardPlan& f = plans[l];
    run.h_n[l].copy_(last_rows(f.d, f.sc, f.y));
    if (c0 && for_backward) run.c_n[l].copy_(last_rows(f.d, f.sc, f.cells));
  }
  return run;
}

inline void check_stack_mode(std::string_view mode, bool has_projections, const char* op) {
  TORCH_CHECK(mode == "LSTM" || mode == "GRU" || mode == "RNN_TANH" || mode == "RNN_RELU", op,
              ": mode must be LSTM, GRU, RNN_TANH or RNN_RELU, but got '", mode, "'");
  TORCH_CHECK(mode == "LSTM" || !has_projections, op, ": only the LSTM has projections");
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor> stack_inference(const Tensor& x, const Tensor& h0, const OptTensor& c0,
                                                   at::TensorList weights, bool has_biases, bool has_projections,
                                                   const OptTensor& batch_sizes, c10::string_view mode) {
  const std::string_view m(mode.data(), mode.size());
  check_stack_mode(m, has_projections, kStackOp);
  auto run = [&](auto cell) {
    StackRun r = run_stack<Backend, decltype(cell)>(x, h0, c0, weights, has_biases, has_projections, batch_sizes,
                                                    false, kStackOp);
    return std::make_tuple(r.plans.back().y, r.h_n, r.c_n);
  };
  return m == "LSTM" ? run(LstmCell{}) : with_cell(mode, run);
}

// The same stack for training: every layer's y (the last is the stack's), h_n, c_n, and
// per layer what its backward (lstm_backward / rnn_backward) reads: the saved step values
// ("gates" for the LSTM), the cells and the unprojected hidden (empty where the cell or
// layer has none).
template <class Backend>
std::tuple<std::vector<Tensor>, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
stack_forward(const Tensor& x, const Tensor& h0, const OptTensor& c0, at::TensorList weights, bool has_biases,
              bool has_projections, const OptTensor& batch_sizes, c10::string_view mode) {
  const std::string_view m(mode.data(), mode.size());
  check_stack_mode(m, has_projections, kStackForwardOp);
  auto run = [&](auto cell) {
    StackRun r = run_stack<Backend, decltype(cell)>(x, h0, c0, weights, has_biases, has_projections, batch_sizes,
                                                    true, kStackForwardOp);
    std::vector<Tensor> ys, saved, cells, hidden;
    // Outputs of an op may not alias: a fresh empty tensor for each that the layer lacks.
    auto or_empty = [](const Tensor& t, bool has) { return has ? t : at::empty({0}, t.options()); };
    for (const ForwardPlan& f : r.plans) {
      ys.push_back(f.y);
      saved.push_back(f.saved);
      cells.push_back(or_empty(f.cells, decltype(cell)::kCarriesCell));
      hidden.push_back(or_empty(f.hidden, f.d.projected));
    }
    return std::make_tuple(std::move(ys), r.h_n, r.c_n, std::move(saved), std::move(cells), std::move(hidden));
  };
  return m == "LSTM" ? run(LstmCell{}) : with_cell(mode, run);
}

// The gradients of stack_forward, by mode: dx, dh0 (L, N, P), dc0 (L, N, H) (empty without
// a cell state) and the weights' gradients in the weights' order. output_mask as for a
// layer: (dx, weight gradients, bias gradients), the unselected empty. Where the layers
// overlap (Backend::overlap_layer_backwards) the layer below runs a few steps behind the
// one above, which adds its dx into the layer below's dhy a block of steps at a time (the
// weight gradients follow, on all threads); elsewhere the layers run one at a time.
template <class Backend>
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> stack_backward(
    const OptTensor& grad_y, const OptTensor& grad_h_n, const OptTensor& grad_c_n, const Tensor& x,
    const Tensor& h0, const OptTensor& c0, at::TensorList weights, bool has_biases, bool has_projections,
    const OptTensor& batch_sizes, c10::string_view mode, at::TensorList ys, at::TensorList saved,
    at::TensorList cells, at::TensorList hidden, std::array<bool, 3> output_mask) {
  const char* op = kStackBackwardOp;
  const std::string_view m(mode.data(), mode.size());
  check_stack_mode(m, has_projections, op);
  const std::pair<int64_t, int64_t> shape = stack_layers(weights, has_biases, has_projections, h0, op);
  const int64_t per_layer = shape.first, layers = shape.second;
  for (const at::TensorList& list : {ys, saved, cells, hidden}) {
    TORCH_CHECK(static_cast<int64_t>(list.size()) == layers, op, ": expected ", layers,
                " tensors per saved list, one per layer, but got ", list.size());
  }
  const typename Backend::DeviceGuard guard(x.device());
  const int64_t steps = stack_steps(x, batch_sizes);
  const bool overlap = stack_overlaps<Backend>(h0, weights, per_layer, steps, true);
  auto run = [&](auto cell) {
    using Cell = decltype(cell);
    TORCH_CHECK(c0.has_value() == Cell::kCarriesCell, op, ": c0 is for the LSTM, and it needs one");
    auto state_grad = [&](const OptTensor& g, int64_t l) { return g ? OptTensor((*g)[l]) : std::nullopt; };
    // Layer l's backward, with `grad` the gradient of its y; l > 0 always computes dx.
    auto plan = [&](int64_t l, const OptTensor& grad, const BackwardPlan* step_grads = nullptr) {
      const LayerArgs args =
          stack_layer_args(l == 0 ? x : ys[l - 1], h0, c0, weights, has_biases, has_projections, batch_sizes, l);
      return plan_backward<Cell>(grad, state_grad(grad_h_n, l), state_grad(grad_c_n, l), args, ys[l], saved[l],
                                 cells[l], hidden[l], l > 0 || output_mask[0], op, step_grads);
    };
    const std::array<bool, 3> result_mask{true, output_mask[1], output_mask[2]};
    std::vector<BackwardResult> results(layers);
    if (!overlap) {
      // Layer by layer, each taking over the step-gradient buffers of the one above.
      OptTensor grad = grad_y;
      std::optional<BackwardPlan> above;
      for (int64_t l = layers - 1; l >= 0; --l) {
        BackwardPlan b = plan(l, grad, above ? &*above : nullptr);
        above.reset();
        run_backward<Backend, Cell>(b);
        results[l] = backward_result<Backend, Cell>(b, result_mask);
        grad = results[l].dx;
        if (l > 0) results[l].dx = Tensor();  // held by `grad` until the layer below has copied it
        above = std::move(b);
      }
    } else {
      // Every check and allocation first, so that no thread fails halfway. Layer l's dx
      // adds into the dhy of layer l - 1, which holds the gradient of that layer's h_n.
      std::vector<BackwardPlan> plans;
      plans.reserve(layers);
      for (int64_t l = 0; l < layers; ++l) {
        plans.push_back(plan(l, l == layers - 1 ? grad_y : std::nullopt));
        if (l > 0) {
          plans[l].dx = plans[l - 1].dhy;
          plans[l].dx_beta = 1;
        }
      }
      const int64_t block_steps = wavefront_block_steps(steps, x.scalar_type());
      std::unique_ptr<LayerProgress[]> progress(new LayerProgress[layers]);
      // Top layer first: the i-th to run is layer layers - 1 - i.
      Backend::for_each_layer(layers, true, [&](int64_t i) {
        try {
          run_backward<Backend, Cell>(plans[layers - 1 - i], i > 0 ? &progress[i - 1] : nullptr, &progress[i],
                                      block_steps);
        } catch (...) {
          progress[i].fail();  // the layers below stop waiting
          throw;
        }
      });
      for (int64_t l = 0; l < layers; ++l) results[l] = backward_result<Backend, Cell>(plans[l], result_mask);
    }
    const auto opts = x.options();
    const Tensor dh0 = at::empty(h0.sizes(), opts);
    const Tensor dc0 = c0 ? at::empty(c0->sizes(), opts) : at::empty({0}, opts);
    // Outputs of an op may not alias: a fresh empty tensor for each unselected gradient.
    auto output = [&](const Tensor& t) { return t.numel() > 0 ? t : at::empty({0}, opts); };
    std::vector<Tensor> dweights;
    for (int64_t l = 0; l < layers; ++l) {
      const BackwardResult& r = results[l];
      dh0[l].copy_(r.dh0);
      if (c0) dc0[l].copy_(r.dc0);
      dweights.push_back(output(r.dw_ih));
      dweights.push_back(output(r.dw_hh));
      if (has_biases) {
        dweights.push_back(output(r.db_ih));
        dweights.push_back(output(r.db_hh));
      }
      if (has_projections) dweights.push_back(output(r.dw_hr));
    }
    const Tensor dx = output_mask[0] ? results[0].dx : at::empty({0}, opts);
    return std::make_tuple(dx, dh0, dc0, std::move(dweights));
  };
  return m == "LSTM" ? run(LstmCell{}) : with_cell(mode, run);
}

}  // namespace lstm_ext
