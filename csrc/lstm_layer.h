// The LSTM layer's time loop, written once for every device.
//
// A layer is: one GEMM projecting the inputs of all T steps, then per step one
// recurrent GEMM and one fused pointwise kernel; the backward mirrors it and ends
// with large GEMMs over all steps for the weight gradients. Only the per-step GEMM
// and the pointwise kernels differ between devices; a `Backend` (cpu/lstm_cpu.cpp,
// cuda/lstm_cuda.cu) supplies them, working on raw pointers so that the time loop
// itself allocates nothing. Every per-step GEMM multiplies by a weight on the right,
// so a Backend has
//   gemm(m, A, lda, W, beta, C, ldc): row-major C (m x n) = A (m x k) op(W) + beta * C,
//     with W a WeightOperand, or what prepare returned for it;
//   prepare(W, use): called once per op call for each weight of the forward and the
//     per-step backward GEMMs (a GemmUse: which GEMM, over how many steps, the rows of
//     most calls), so that the backend can lay it out for them once rather than at every
//     step, and pick its implementation;
//   cell_forward(const ForwardStep<scalar_t>&) and cell_backward(const BackwardStep<scalar_t>&);
//   weight_grad(dg, a): dg^T a, a weight gradient over all steps, from 2-D tensors.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace lstm_ext {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// A sequence is time-major rows: (T, N, ...) with N rows per step, or, with batch_sizes,
// PackedSequence.data's (R, ...) with the batch_sizes[t] rows of step t after those of
// the steps before it (batch entry b of step t at row offset[t] + b).
struct LayerDims {
  int64_t T, N, R, I, H, P;  // steps, batch, rows of the sequence, input, hidden, output (projection) size
  bool reverse, packed, projected;
};

// One time step in processing order. Its rows [0, rows) are sequence rows row0 + b;
// rows [0, n_carry) continue from the step processed before (its row prev_row0 + b),
// rows [n_carry, rows) start here from h0/c0.
struct Step {
  int64_t rows, n_carry, row0, prev_row0;
};

struct Schedule {
  std::vector<Step> steps;      // in processing order
  std::vector<int64_t> offset;  // (T + 1): step t's first sequence row, then R
};

// The right operand of a per-step GEMM: a row-major weight (rows x cols), or its transpose.
template <typename scalar_t>
struct WeightOperand {
  const scalar_t* data;
  int64_t rows, cols;
  bool transposed;
  int64_t k() const { return transposed ? cols : rows; }
  int64_t n() const { return transposed ? rows : cols; }
};

// The GEMMs of a layer that multiply by a prepared weight.
enum class GemmRole { kInputProjection, kRecurrent, kProjection, kRecurrentGrad, kProjectionGrad, kInputGrad };

// What a prepared weight serves: the GEMMs of `role` over `steps` steps of the sequence,
// all or most of them (packed sequences: the steps of the longest) with `rows` rows.
struct GemmUse {
  GemmRole role;
  int64_t steps, rows;
};

// Pointers of one forward step. All row-major and contiguous, row strides 4H or H.
template <typename scalar_t>
struct ForwardStep {
  scalar_t* gates;           // (rows, 4H): pre-activations less the bias in, activations out
  const scalar_t* bias;      // (4H): b_ih + b_hh, zeros without biases
  const scalar_t* c_carry;   // previous step's cells (rows < n_carry), or null
  const scalar_t* c0;        // (N, H)
  scalar_t* c_out;           // (rows, H)
  scalar_t* h_out;           // (rows, H): o * tanh(c)
  int64_t rows, n_carry, hidden;
};

template <typename scalar_t>
struct BackwardStep {
  const scalar_t* gates;     // (rows, 4H) saved activations
  const scalar_t* c;         // (rows, H) this step's cells
  const scalar_t* c_carry;   // previous step's cells, or null
  const scalar_t* c0;
  const scalar_t* dh;        // (rows, H) gradient reaching o * tanh(c)
  scalar_t* dc;              // (rows, H) in: gradient of c from the next step; out: of c_prev
  scalar_t* d_gates;         // (rows, 4H) gradient of the pre-activations
  int64_t rows, n_carry, hidden;
};

inline const char* kOpName = "lstm_ext.lstm_layer";

inline void check_same(const Tensor& ref, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), kOpName, ": expected ", name, " on ", ref.device(),
              " like x, but got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), kOpName, ": expected ", name, " of dtype ",
              ref.scalar_type(), " like x, but got ", t.scalar_type());
}

inline void check_shape(const Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, kOpName, ": expected ", name, " of shape ", expected,
              ", but got ", t.sizes());
}

inline LayerDims check_layer_inputs(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                    const OptTensor& b_hh, const OptTensor& w_hr,
                                    const OptTensor& batch_sizes, bool reverse) {
  LayerDims d;
  d.packed = batch_sizes.has_value();
  if (d.packed) {
    const Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.device().is_cpu() && bs.scalar_type() == at::kLong && bs.dim() == 1,
                kOpName, ": expected batch_sizes as a 1-D int64 CPU tensor, but got ",
                bs.scalar_type(), " on ", bs.device(), " of shape ", bs.sizes());
    TORCH_CHECK(x.dim() == 2, kOpName, ": with batch_sizes, expected x of shape (sum(batch_sizes), input_size) "
                "(PackedSequence.data), but got ", x.dim(), "-D input of shape ", x.sizes());
    const Tensor b = bs.contiguous();
    const int64_t* p = b.data_ptr<int64_t>();
    d.T = bs.size(0);
    d.N = d.T > 0 ? p[0] : 0;
    int64_t rows = 0;
    for (int64_t t = 0; t < d.T; ++t) {
      TORCH_CHECK(p[t] >= 0 && (t == 0 || p[t] <= p[t - 1]), kOpName,
                  ": expected non-increasing, non-negative batch_sizes, but got ", t == 0 ? 0 : p[t - 1],
                  " then ", p[t], " at step ", t);
      rows += p[t];
    }
    TORCH_CHECK(x.size(0) == rows, kOpName, ": expected x with sum(batch_sizes) = ", rows,
                " rows, but got ", x.size(0));
    d.R = rows;
  } else {
    TORCH_CHECK(x.dim() == 3, kOpName, ": expected x of shape (T, N, input_size), but got ", x.dim(),
                "-D input of shape ", x.sizes());
    d.T = x.size(0);
    d.N = x.size(1);
    d.R = d.T * d.N;
  }
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), kOpName,
              ": expected a floating point x, but got ", x.scalar_type());
  TORCH_CHECK(c0.dim() == 2, kOpName, ": expected c0 of shape (N, hidden_size), but got ", c0.sizes());
  TORCH_CHECK(h0.dim() == 2, kOpName, ": expected h0 of shape (N, proj_size or hidden_size), but got ",
              h0.sizes());
  d.I = x.size(-1);
  d.H = c0.size(1);
  d.P = h0.size(1);
  d.reverse = reverse;
  d.projected = w_hr.has_value();
  TORCH_CHECK(d.T > 0, kOpName, ": expected a sequence of at least one step, but got T = 0");
  TORCH_CHECK(d.H > 0, kOpName, ": expected hidden_size > 0");
  TORCH_CHECK(d.projected || d.P == d.H, kOpName, ": without w_hr, h0 must have hidden_size = ", d.H,
              " columns, but got ", d.P);
  check_same(x, h0, "h0");
  check_same(x, c0, "c0");
  check_same(x, w_ih, "w_ih");
  check_same(x, w_hh, "w_hh");
  check_shape(h0, {d.N, d.P}, "h0");
  check_shape(c0, {d.N, d.H}, "c0");
  check_shape(w_ih, {4 * d.H, d.I}, "w_ih");
  check_shape(w_hh, {4 * d.H, d.P}, "w_hh");
  if (b_ih) {
    check_same(x, *b_ih, "b_ih");
    check_shape(*b_ih, {4 * d.H}, "b_ih");
  }
  if (b_hh) {
    check_same(x, *b_hh, "b_hh");
    check_shape(*b_hh, {4 * d.H}, "b_hh");
  }
  if (w_hr) {
    check_same(x, *w_hr, "w_hr");
    check_shape(*w_hr, {d.P, d.H}, "w_hr");
  }
  return d;
}

// Steps in the order they are processed, with the rows each one updates.
inline Schedule make_schedule(const LayerDims& d, const OptTensor& batch_sizes) {
  Tensor bs;
  if (batch_sizes) bs = batch_sizes->contiguous();
  auto rows_at = [&](int64_t t) { return bs.defined() ? bs.data_ptr<int64_t>()[t] : d.N; };
  Schedule sc;
  sc.offset.resize(d.T + 1, 0);
  for (int64_t t = 0; t < d.T; ++t) sc.offset[t + 1] = sc.offset[t] + rows_at(t);
  sc.steps.reserve(d.T);
  for (int64_t s = 0; s < d.T; ++s) {
    const int64_t t = d.reverse ? d.T - 1 - s : s;
    const int64_t prev = s == 0 ? -1 : (d.reverse ? t + 1 : t - 1);
    const int64_t rows = rows_at(t);
    const int64_t n_carry = prev < 0 ? 0 : std::min(rows, rows_at(prev));
    sc.steps.push_back({rows, n_carry, sc.offset[t], prev < 0 ? 0 : sc.offset[prev]});
  }
  return sc;
}

// Shape of a sequence of `cols` features: (T, N, cols), or (R, cols) when packed.
inline std::vector<int64_t> seq_shape(const LayerDims& d, int64_t cols) {
  if (d.packed) return {d.R, cols};
  return {d.T, d.N, cols};
}

// For each batch entry, the sequence row of its last processed step, as an index on `device`.
inline Tensor final_rows(const LayerDims& d, const Schedule& sc, c10::Device device) {
  std::vector<int64_t> rows(d.N, 0);
  for (const Step& s : sc.steps) {  // later steps overwrite earlier ones
    for (int64_t b = 0; b < s.rows; ++b) rows[b] = s.row0 + b;
  }
  return at::tensor(at::ArrayRef<int64_t>(rows), at::kLong).to(device);
}

// seq's rows holding each batch entry's state after its last step: (N, cols).
inline Tensor final_state(const LayerDims& d, const Schedule& sc, const Tensor& seq) {
  if (!d.packed) return seq.select(0, d.reverse ? 0 : d.T - 1).clone();
  return seq.index_select(0, final_rows(d, sc, seq.device()));
}

// Where a forward keeps its per-step state. For the backward (per_step): every step's
// gates, cells and, with a projection, unprojected h. For inference: the gates of a block
// of steps, reused from block to block, one step's h, and the running cells, updated in
// place from c0; all stay small and hot in cache, and a forward allocates far less.
template <typename scalar_t>
struct ForwardState {
  scalar_t* gates;      // (T or block_steps, N, 4H)
  scalar_t* cells;      // (T, N, H), or (N, H) holding c0 on entry and c_n on exit
  scalar_t* hidden;     // (T or 1, N, H), only with a projection
  bool per_step;
  int64_t block_steps;  // steps per input-projection GEMM: T when per_step
};

template <class Backend, typename scalar_t>
void forward_time_loop(const LayerDims& d, const Schedule& sc, const scalar_t* x,
                       const scalar_t* w_ih, const scalar_t* bias, const scalar_t* w_hh, const scalar_t* w_hr,
                       const scalar_t* h0, const scalar_t* c0, scalar_t* y, const ForwardState<scalar_t>& st) {
  const int64_t G = 4 * d.H;
  // The (rows, H) cells and hidden of the step at sequence row `row0`: inference keeps one.
  auto state_at = [&](scalar_t* base, int64_t row0) { return base + (st.per_step ? row0 * d.H : 0); };
  // The input projection runs once over all rows, or per block of steps for inference.
  const int64_t projected_rows = std::min(st.block_steps * d.N, d.R);
  const auto w_ih_t =
      Backend::prepare(WeightOperand<scalar_t>{w_ih, G, d.I, true}, {GemmRole::kInputProjection, d.T, projected_rows});
  const auto w_hh_t = Backend::prepare(WeightOperand<scalar_t>{w_hh, G, d.P, true}, {GemmRole::kRecurrent, d.T, d.N});
  // Without a projection w_hr is null: its operand is left empty, and unused.
  const auto w_hr_t = Backend::prepare(WeightOperand<scalar_t>{w_hr, d.projected ? d.P : 0, d.H, true},
                                       {GemmRole::kProjection, d.T, d.N});
  for (int64_t s0 = 0; s0 < d.T; s0 += st.block_steps) {
    // One GEMM projects the inputs of the block's steps, times [t_lo, t_lo + n), which
    // are sequence rows [row_lo, row_hi).
    const int64_t n = std::min(st.block_steps, d.T - s0);
    const int64_t t_lo = d.reverse ? d.T - s0 - n : s0;
    const int64_t row_lo = sc.offset[t_lo], row_hi = sc.offset[t_lo + n];
    scalar_t* g_block = st.gates + (st.per_step ? row_lo * G : 0);
    Backend::gemm(row_hi - row_lo, x + row_lo * d.I, d.I, w_ih_t, 0, g_block, G);
    for (int64_t k = s0; k < s0 + n; ++k) {
      const Step& s = sc.steps[k];
      if (s.rows == 0) continue;
      scalar_t* g = g_block + (s.row0 - row_lo) * G;
      if (s.n_carry > 0) {
        Backend::gemm(s.n_carry, y + s.prev_row0 * d.P, d.P, w_hh_t, 1, g, G);
      }
      if (s.rows > s.n_carry) {
        Backend::gemm(s.rows - s.n_carry, h0 + s.n_carry * d.P, d.P, w_hh_t, 1, g + s.n_carry * G, G);
      }
      scalar_t* y_t = y + s.row0 * d.P;
      scalar_t* h_t = d.projected ? state_at(st.hidden, s.row0) : y_t;
      // In place for inference: every element reads its own previous cell before writing it.
      const scalar_t* c_carry = s.n_carry > 0 ? state_at(st.cells, s.prev_row0) : nullptr;
      ForwardStep<scalar_t> step{g, bias, c_carry, st.per_step ? c0 : st.cells, state_at(st.cells, s.row0),
                                 h_t, s.rows, s.n_carry, d.H};
      Backend::cell_forward(step);
      if (d.projected) {
        Backend::gemm(s.rows, h_t, d.H, w_hr_t, 0, y_t, d.P);
      }
    }
  }
}

template <class Backend, typename scalar_t>
void backward_time_loop(const LayerDims& d, const Schedule& sc, const scalar_t* gates,
                        const scalar_t* cells, const scalar_t* w_hh, const scalar_t* w_hr,
                        const scalar_t* c0, const scalar_t* w_ih, scalar_t* dhy, scalar_t* dc,
                        scalar_t* d_gates, scalar_t* dh0, scalar_t* dr, scalar_t* dx) {
  const int64_t G = 4 * d.H;
  const auto w_hh_n =
      Backend::prepare(WeightOperand<scalar_t>{w_hh, G, d.P, false}, {GemmRole::kRecurrentGrad, d.T, d.N});
  const auto w_hr_n = Backend::prepare(WeightOperand<scalar_t>{w_hr, d.projected ? d.P : 0, d.H, false},
                                       {GemmRole::kProjectionGrad, d.T, d.N});
  for (auto it = sc.steps.rbegin(); it != sc.steps.rend(); ++it) {
    const Step& s = *it;
    if (s.rows == 0) continue;
    const scalar_t* dh = dhy + s.row0 * d.P;
    if (d.projected) {
      Backend::gemm(s.rows, dh, d.P, w_hr_n, 0, dr, d.H);
      dh = dr;
    }
    scalar_t* dg = d_gates + s.row0 * G;
    BackwardStep<scalar_t> step{gates + s.row0 * G, cells + s.row0 * d.H,
                                s.n_carry > 0 ? cells + s.prev_row0 * d.H : nullptr, c0, dh, dc, dg,
                                s.rows, s.n_carry, d.H};
    Backend::cell_backward(step);
    // dh of the previous step accumulates onto the output gradient already there.
    if (s.n_carry > 0) {
      Backend::gemm(s.n_carry, dg, G, w_hh_n, 1, dhy + s.prev_row0 * d.P, d.P);
    }
    if (s.rows > s.n_carry) {
      Backend::gemm(s.rows - s.n_carry, dg + s.n_carry * G, G, w_hh_n, 0, dh0 + s.n_carry * d.P, d.P);
    }
  }
  if (dx != nullptr) {
    const auto w_ih_n = Backend::prepare(WeightOperand<scalar_t>{w_ih, G, d.I, false}, {GemmRole::kInputGrad, d.T, d.R});
    Backend::gemm(d.R, d_gates, G, w_ih_n, 0, dx, d.I);
  }
}

// A packed sequence's h of the previous step for every row, (R, P): y's row there for
// rows that continue, h0's for rows that start at their step.
inline Tensor packed_previous_hidden(const LayerDims& d, const Schedule& sc, const Tensor& y, const Tensor& h0) {
  std::vector<int64_t> source(d.R);  // rows of cat(y, h0)
  for (const Step& s : sc.steps) {
    for (int64_t b = 0; b < s.rows; ++b) source[s.row0 + b] = b < s.n_carry ? s.prev_row0 + b : d.R + b;
  }
  const Tensor index = at::tensor(at::ArrayRef<int64_t>(source), at::kLong).to(y.device());
  return at::cat({y, h0}).index_select(0, index);
}

// for_backward: also return what lstm_backward needs (gates, cells, hidden); otherwise
// those come back empty and the forward keeps only one step of them.
template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_impl(
    const Tensor& x_in, const Tensor& h0_in, const Tensor& c0_in, const Tensor& w_ih_in,
    const Tensor& w_hh_in, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr_in,
    const OptTensor& batch_sizes, bool reverse, bool for_backward) {
  const LayerDims d =
      check_layer_inputs(x_in, h0_in, c0_in, w_ih_in, w_hh_in, b_ih, b_hh, w_hr_in, batch_sizes, reverse);
  const Tensor x = x_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const Tensor w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const Tensor w_hr = d.projected ? w_hr_in->contiguous() : Tensor();
  const Schedule sc = make_schedule(d, batch_sizes);
  const auto opts = x.options();
  // Inference projects blocks of steps whose gates take about 512 KiB, half an L2 here.
  const int64_t step_bytes = std::max<int64_t>(1, d.N * 4 * d.H * x.element_size());
  const int64_t block_steps = for_backward ? d.T : std::clamp<int64_t>((512 << 10) / step_bytes, 1, d.T);

  // The cell kernels add the bias: broadcasting it into the gates before the input
  // projection cost a pass over all T x N x 4H of them (5% of a forward at H=128).
  Tensor gates = for_backward ? at::empty(seq_shape(d, 4 * d.H), opts) : at::empty({block_steps * d.N, 4 * d.H}, opts);
  const Tensor bias = b_ih && b_hh ? *b_ih + *b_hh
                      : b_ih        ? b_ih->contiguous()
                      : b_hh        ? b_hh->contiguous()
                                    : at::zeros({4 * d.H}, opts);
  Tensor y = at::empty(seq_shape(d, d.P), opts);
  Tensor cells = for_backward ? at::empty(seq_shape(d, d.H), opts) : c0.clone(at::MemoryFormat::Contiguous);
  Tensor hidden = !d.projected ? at::empty({0}, opts)
                  : for_backward ? at::empty(seq_shape(d, d.H), opts)
                                 : at::empty({d.N, d.H}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_forward", [&] {
    const ForwardState<scalar_t> state{gates.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(),
                                       d.projected ? hidden.data_ptr<scalar_t>() : nullptr, for_backward,
                                       block_steps};
    forward_time_loop<Backend, scalar_t>(
        d, sc, x.data_ptr<scalar_t>(), w_ih.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
        w_hh.data_ptr<scalar_t>(), d.projected ? w_hr.data_ptr<scalar_t>() : nullptr, h0.data_ptr<scalar_t>(),
        c0.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), state);
  });

  const Tensor h_n = final_state(d, sc, y);
  if (!for_backward) {
    const Tensor none = at::empty({0}, opts);
    return {y, h_n, cells, none, none, none};
  }
  return {y, h_n, final_state(d, sc, cells), gates, cells, hidden};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
    bool reverse) {
  return lstm_forward_impl<Backend>(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, true);
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor> lstm_inference(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
    bool reverse) {
  auto out = lstm_forward_impl<Backend>(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, false);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

// output_mask: which of (dx, weight gradients, bias gradient) to compute; the others
// come back empty. dh0 and dc0 are always computed: they cost nothing extra.
template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward(
    const OptTensor& grad_y, const OptTensor& grad_hn, const OptTensor& grad_cn, const Tensor& x_in,
    const Tensor& h0_in, const Tensor& c0_in, const Tensor& w_ih_in, const Tensor& w_hh_in,
    const OptTensor& w_hr_in, const OptTensor& batch_sizes, bool reverse, const Tensor& y_in,
    const Tensor& gates_in, const Tensor& cells_in, const Tensor& hidden_in,
    std::array<bool, 3> output_mask) {
  const LayerDims d = check_layer_inputs(x_in, h0_in, c0_in, w_ih_in, w_hh_in, std::nullopt,
                                         std::nullopt, w_hr_in, batch_sizes, reverse);
  const Tensor x = x_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const Tensor w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const Tensor w_hr = d.projected ? w_hr_in->contiguous() : Tensor();
  const Tensor y = y_in.contiguous(), gates = gates_in.contiguous(), cells = cells_in.contiguous();
  const Tensor hidden = hidden_in.contiguous();
  check_shape(y, seq_shape(d, d.P), "y");
  check_shape(gates, seq_shape(d, 4 * d.H), "gates");
  check_shape(cells, seq_shape(d, d.H), "cells");
  if (d.projected) check_shape(hidden, seq_shape(d, d.H), "hidden");
  const Schedule sc = make_schedule(d, batch_sizes);
  const auto opts = x.options();

  // dhy's row of h_t collects every gradient reaching h_t: from y, from h_n, and from step t+1.
  Tensor dhy = grad_y ? grad_y->to(opts, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous)
                      : at::zeros(seq_shape(d, d.P), opts);
  check_shape(dhy, seq_shape(d, d.P), "grad_y");
  if (grad_hn) {
    check_shape(*grad_hn, {d.N, d.P}, "grad_h_n");
    if (d.packed) {
      dhy.index_add_(0, final_rows(d, sc, x.device()), grad_hn->to(opts));
    } else {
      dhy.select(0, d.reverse ? 0 : d.T - 1).add_(*grad_hn);
    }
  }
  Tensor dc = grad_cn ? grad_cn->to(opts, false, true, at::MemoryFormat::Contiguous) : at::zeros({d.N, d.H}, opts);
  check_shape(dc, {d.N, d.H}, "grad_c_n");
  Tensor d_gates = at::empty(seq_shape(d, 4 * d.H), opts);
  Tensor dh0 = at::zeros({d.N, d.P}, opts);
  Tensor dr = d.projected ? at::empty({d.N, d.H}, opts) : Tensor();
  const Tensor none = at::empty({0}, opts);
  Tensor dx = output_mask[0] ? at::empty(seq_shape(d, d.I), opts) : none;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_backward", [&] {
    backward_time_loop<Backend, scalar_t>(
        d, sc, gates.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(),
        d.projected ? w_hr.data_ptr<scalar_t>() : nullptr, c0.data_ptr<scalar_t>(), w_ih.data_ptr<scalar_t>(),
        dhy.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(), d_gates.data_ptr<scalar_t>(),
        dh0.data_ptr<scalar_t>(), d.projected ? dr.data_ptr<scalar_t>() : nullptr,
        output_mask[0] ? dx.data_ptr<scalar_t>() : nullptr);
  });

  const Tensor dg2d = d_gates.view({d.R, 4 * d.H});
  Tensor dw_ih = none, dw_hh = none, dw_hr = none;
  if (output_mask[1]) {
    dw_ih = Backend::weight_grad(dg2d, x.view({d.R, d.I}));
    if (d.packed) {
      dw_hh = Backend::weight_grad(dg2d, packed_previous_hidden(d, sc, y, h0));
    } else {
      // Every step but the first reads h from y one step back (shifted views, no copy);
      // the first reads h0.
      const Tensor dg_carry = d_gates.narrow(0, d.reverse ? 0 : 1, d.T - 1).reshape({(d.T - 1) * d.N, 4 * d.H});
      const Tensor h_carry = y.narrow(0, d.reverse ? 1 : 0, d.T - 1).reshape({(d.T - 1) * d.N, d.P});
      dw_hh = Backend::weight_grad(dg_carry, h_carry);
      dw_hh.addmm_(d_gates.select(0, d.reverse ? d.T - 1 : 0).t(), h0);
    }
    if (d.projected) dw_hr = Backend::weight_grad(dhy.view({d.R, d.P}), hidden.view({d.R, d.H}));
  }
  Tensor db = output_mask[2] ? dg2d.sum(0) : none;
  return {dx, dh0, dc, dw_ih, dw_hh, db, dw_hr};
}

}  // namespace lstm_ext
