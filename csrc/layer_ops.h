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

#include "cells.h"
#include "layer_geometry.h"
#include "time_loop.h"

namespace lstm_ext {

inline constexpr char kLstmOp[] = "lstm_ext.lstm_layer";
inline constexpr char kRnnOp[] = "lstm_ext.rnn_layer";
inline constexpr char kStackOp[] = "lstm_ext.stack_inference";

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
// input-projection GEMM of inference (0: no limit but the cache's). cells_out: where
// inference keeps its running cells, (N, hidden_size), if not in a new tensor.
template <class Cell>
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
  // Inference projects blocks of steps whose saved values take about 512 KiB, half an L2 here.
  const int64_t step_bytes = std::max<int64_t>(1, d.N * W * f.o.x.element_size());
  const int64_t cache_steps = std::clamp<int64_t>((512 << 10) / step_bytes, 1, d.T);
  f.block_steps = for_backward ? d.T : block_steps > 0 ? std::min(block_steps, cache_steps) : cache_steps;

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
  const ForwardPlan f = plan_forward<Cell>(in, for_backward, op);
  run_forward<Backend, Cell>(f);
  return forward_result<Cell>(f);
}

// output_mask: which of (dx, weight gradients, bias gradients) to compute; the others
// come back empty. dh0 (and dc0) are always computed: they cost nothing extra.
template <class Backend, class Cell>
BackwardResult layer_backward(const OptTensor& grad_y, const OptTensor& grad_hn, const OptTensor& grad_cn,
                              const LayerArgs& in, const Tensor& y_in, const Tensor& saved_in,
                              const Tensor& cells_in, const Tensor& hidden_in, std::array<bool, 3> output_mask,
                              const char* op) {
  const LayerDims d = check_layer_inputs(in, Cell::kGates, op);
  const typename Backend::DeviceGuard guard(in.x.device());
  const Operands o = contiguous_operands(in);
  const Tensor &x = o.x, &h0 = o.h0, &c0 = o.c0, &w_ih = o.w_ih, &w_hh = o.w_hh, &w_hr = o.w_hr;
  const Tensor y = y_in.contiguous(), saved = saved_in.contiguous(), cells = cells_in.contiguous();
  const Tensor hidden = hidden_in.contiguous();
  const int64_t G = Cell::kGates * d.H;
  check_shape(op, y, seq_shape(d, d.P), "y");
  check_shape(op, saved, seq_shape(d, Cell::kSaved * d.H), Cell::kCarriesCell ? "gates" : "saved");
  if (Cell::kCarriesCell) check_shape(op, cells, seq_shape(d, d.H), "cells");
  if (d.projected) check_shape(op, hidden, seq_shape(d, d.H), "hidden");
  const Schedule sc = make_schedule(d, in.batch_sizes);
  const auto opts = x.options();

  // dhy's row of h_t collects every gradient reaching h_t: from y, from h_n, and from step t+1.
  Tensor dhy = grad_y ? grad_y->to(opts, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous)
                      : at::zeros(seq_shape(d, d.P), opts);
  check_shape(op, dhy, seq_shape(d, d.P), "grad_y");
  if (grad_hn) {
    check_shape(op, *grad_hn, {d.N, d.P}, "grad_h_n");
    if (d.packed) {
      dhy.index_add_(0, final_rows(d, sc, x.device()), grad_hn->to(opts));
    } else {
      dhy.select(0, d.reverse ? 0 : d.T - 1).add_(*grad_hn);
    }
  }
  const Tensor none = at::empty({0}, opts);
  Tensor dc = none;
  if (Cell::kCarriesCell) {
    dc = grad_cn ? grad_cn->to(opts, false, true, at::MemoryFormat::Contiguous) : at::zeros({d.N, d.H}, opts);
    check_shape(op, dc, {d.N, d.H}, "grad_c_n");
  }
  Tensor d_input = at::empty(seq_shape(d, G), opts);
  Tensor d_recurrent = Cell::kSeparateRecurrent ? at::empty(seq_shape(d, G), opts) : d_input;
  Tensor dh0 = at::zeros({d.N, d.P}, opts);
  Tensor dr = d.projected ? at::empty({d.N, d.H}, opts) : none;
  Tensor dx = output_mask[0] ? at::empty(seq_shape(d, d.I), opts) : none;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_backward", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr<scalar_t>() : nullptr; };
    const BackwardData<scalar_t> data{ptr(saved), ptr(cells), ptr(y),       ptr(h0),  ptr(c0),
                                      ptr(w_ih),  ptr(w_hh),  ptr(w_hr),    ptr(dhy), ptr(dc),
                                      ptr(d_input), ptr(d_recurrent), ptr(dh0), ptr(dr), ptr(dx)};
    backward_time_loop<Backend, Cell, scalar_t>(d, sc, data);
  });

  BackwardResult r{dx, dh0, Cell::kCarriesCell ? dc : none, none, none, none, none, none};
  const Tensor d_input_2d = d_input.view({d.R, G}), d_recurrent_2d = d_recurrent.view({d.R, G});
  if (output_mask[1]) {
    r.dw_ih = Backend::weight_grad(d_input_2d, x.view({d.R, d.I}));
    if (d.packed) {
      r.dw_hh = Backend::weight_grad(d_recurrent_2d, packed_previous_hidden(d, sc, y, h0));
    } else {
      // Every step but the first reads h from y one step back (shifted views, no copy);
      // the first reads h0.
      const Tensor d_carry = d_recurrent.narrow(0, d.reverse ? 0 : 1, d.T - 1).reshape({(d.T - 1) * d.N, G});
      const Tensor h_carry = y.narrow(0, d.reverse ? 1 : 0, d.T - 1).reshape({(d.T - 1) * d.N, d.P});
      r.dw_hh = Backend::weight_grad(d_carry, h_carry);
      r.dw_hh.addmm_(d_recurrent.select(0, d.reverse ? d.T - 1 : 0).t(), h0);
    }
    if (d.projected) r.dw_hr = Backend::weight_grad(dhy.view({d.R, d.P}), hidden.view({d.R, d.H}));
  }
  if (output_mask[2]) {
    r.db_ih = d_input_2d.sum(0);
    // Outputs of an op may not alias: the copy costs G elements.
    r.db_hh = Cell::kSeparateRecurrent ? d_recurrent_2d.sum(0) : r.db_ih.clone();
  }
  return r;
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

// Inference through a stack of single-direction layers without dropout, each reading the
// y of the one below: h0 (L, N, P), c0 (L, N, H) for the LSTM, and per layer w_ih, w_hh,
// then b_ih, b_hh if has_biases and w_hr if has_projections. Where the Backend lets
// layers overlap (Backend::overlap_layers: on CPU, small steps or weights), each runs on its own
// thread a few steps behind the one below: a wavefront, which keeps the cores busy at
// shapes whose steps are too small to split between them.
template <class Backend, class Cell>
std::tuple<Tensor, Tensor, Tensor> stack_forward(const Tensor& x, const Tensor& h0, const OptTensor& c0,
                                                 at::TensorList weights, bool has_biases, bool has_projections,
                                                 const OptTensor& batch_sizes) {
  const int64_t per_layer = 2 + 2 * has_biases + has_projections;
  const int64_t layers = static_cast<int64_t>(weights.size()) / per_layer;
  TORCH_CHECK(layers > 0 && layers * per_layer == static_cast<int64_t>(weights.size()), kStackOp, ": expected ",
              per_layer, " weights per layer, but got ", weights.size(), " in all");
  TORCH_CHECK(h0.dim() == 3 && h0.size(0) == layers, kStackOp, ": expected h0 of shape (", layers,
              ", N, *) for ", layers, " layers, but got ", h0.sizes());
  TORCH_CHECK(c0.has_value() == Cell::kCarriesCell, kStackOp, ": c0 is for the LSTM, and it needs one");
  TORCH_CHECK(!c0 || (c0->dim() == 3 && c0->size(0) == layers), kStackOp, ": expected c0 of shape (", layers,
              ", N, hidden_size), but got ", c0 ? c0->sizes() : h0.sizes());
  const typename Backend::DeviceGuard guard(x.device());
  // The largest layer's step: its recurrent GEMM, N x P by P x G.
  int64_t step_flops = 0, weight_bytes = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const Tensor& w_hh = weights[l * per_layer + 1];
    step_flops = std::max(step_flops, 2 * h0.size(1) * w_hh.numel());
    weight_bytes = std::max(weight_bytes, static_cast<int64_t>(w_hh.nbytes()));
  }
  // A one-step call (generation) has nothing to overlap.
  const int64_t steps = batch_sizes ? batch_sizes->numel() : x.dim() > 0 ? x.size(0) : 0;
  const bool overlap = steps > 1 && Backend::overlap_layers(layers, step_flops, weight_bytes);
  // Every check and allocation comes first, so that running cannot fail halfway.
  // Each layer's running cells are its slice of c_n, and its final h is copied into
  // h_n's: no stacking of per-layer states after the run (generation calls this per
  // character, where such small ATen calls add up).
  const Tensor h_n = at::empty(h0.sizes(), x.options());
  const Tensor c_n = c0 ? at::empty(c0->sizes(), x.options()) : at::empty({0}, x.options());
  std::vector<ForwardPlan> plans;
  plans.reserve(layers);
  for (int64_t l = 0; l < layers; ++l) {
    const Tensor* w = weights.data() + l * per_layer;
    const LayerArgs args{l == 0 ? x : plans.back().y,
                         h0[l],
                         c0 ? OptTensor((*c0)[l]) : std::nullopt,
                         w[0],
                         w[1],
                         has_biases ? OptTensor(w[2]) : std::nullopt,
                         has_biases ? OptTensor(w[3]) : std::nullopt,
                         has_projections ? OptTensor(w[per_layer - 1]) : std::nullopt,
                         batch_sizes,
                         false};
    // A layer reading another as it runs waits for each block of its input steps: small
    // blocks keep the wavefront's lag, and the time a thread idles at its start, short.
    // The first layer projects in such blocks too, or the next one would wait for all of
    // its input projection (at B=8 T=50 H=64, half of its work) before starting.
    const int64_t block_steps = overlap ? std::max<int64_t>(1, steps / 16) : 0;
    plans.push_back(plan_forward<Cell>(args, false, kStackOp, block_steps, c0 ? c_n[l] : Tensor()));
  }
  std::unique_ptr<LayerProgress[]> progress(new LayerProgress[layers]);
  Backend::for_each_layer(layers, overlap, [&](int64_t l) {
    try {
      run_forward<Backend, Cell>(plans[l], l > 0 ? &progress[l - 1] : nullptr, &progress[l]);
    } catch (...) {
      progress[l].fail();  // the layers above stop waiting
      throw;
    }
  });
  for (int64_t l = 0; l < layers; ++l) {
    h_n[l].copy_(last_rows(plans[l].d, plans[l].sc, plans[l].y));
  }
  return {plans.back().y, h_n, c_n};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor> stack_inference(const Tensor& x, const Tensor& h0, const OptTensor& c0,
                                                   at::TensorList weights, bool has_biases, bool has_projections,
                                                   const OptTensor& batch_sizes, c10::string_view mode) {
  const std::string_view m(mode.data(), mode.size());
  TORCH_CHECK(m == "LSTM" || m == "GRU" || m == "RNN_TANH" || m == "RNN_RELU", kStackOp,
              ": mode must be LSTM, GRU, RNN_TANH or RNN_RELU, but got '", m, "'");
  TORCH_CHECK(m == "LSTM" || !has_projections, kStackOp, ": only the LSTM has projections");
  auto run = [&](auto cell) {
    return stack_forward<Backend, decltype(cell)>(x, h0, c0, weights, has_biases, has_projections, batch_sizes);
  };
  return m == "LSTM" ? run(LstmCell{}) : with_cell(mode, run);
}

}  // namespace lstm_ext
