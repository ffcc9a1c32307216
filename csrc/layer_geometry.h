// A layer's sequence geometry: its dimensions and checks, the order of its steps and
// the rows each one updates, and where each batch entry's final state lies.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
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

inline void check_same(const char* op, const Tensor& ref, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name, " on ", ref.device(),
              " like x, but got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " of dtype ",
              ref.scalar_type(), " like x, but got ", t.scalar_type());
}

inline void check_shape(const char* op, const Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, op, ": expected ", name, " of shape ", expected,
              ", but got ", t.sizes());
}

// The tensors of one layer call. c0 and w_hr only for the LSTM.
struct LayerArgs {
  Tensor x, h0;
  OptTensor c0;
  Tensor w_ih, w_hh;
  OptTensor b_ih, b_hh, w_hr, batch_sizes;
  bool reverse;
};

// Checks a call of a cell with `gates` gates, in the words of op `op`; its dimensions.
inline LayerDims check_layer_inputs(const LayerArgs& a, int64_t gates, const char* op) {
  const Tensor &x = a.x, &h0 = a.h0;
  const OptTensor& batch_sizes = a.batch_sizes;
  LayerDims d;
  d.packed = batch_sizes.has_value();
  if (d.packed) {
    const Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.device().is_cpu() && bs.scalar_type() == at::kLong && bs.dim() == 1,
                op, ": expected batch_sizes as a 1-D int64 CPU tensor, but got ",
                bs.scalar_type(), " on ", bs.device(), " of shape ", bs.sizes());
    TORCH_CHECK(x.dim() == 2, op, ": with batch_sizes, expected x of shape (sum(batch_sizes), input_size) "
                "(PackedSequence.data), but got ", x.dim(), "-D input of shape ", x.sizes());
    const Tensor b = bs.contiguous();
    const int64_t* p = b.data_ptr<int64_t>();
    d.T = bs.size(0);
    d.N = d.T > 0 ? p[0] : 0;
    int64_t rows = 0;
    for (int64_t t = 0; t < d.T; ++t) {
      TORCH_CHECK(p[t] >= 0 && (t == 0 || p[t] <= p[t - 1]), op,
                  ": expected non-increasing, non-negative batch_sizes, but got ", t == 0 ? 0 : p[t - 1],
                  " then ", p[t], " at step ", t);
      rows += p[t];
    }
    TORCH_CHECK(x.size(0) == rows, op, ": expected x with sum(batch_sizes) = ", rows,
                " rows, but got ", x.size(0));
    d.R = rows;
  } else {
    TORCH_CHECK(x.dim() == 3, op, ": expected x of shape (T, N, input_size), but got ", x.dim(),
                "-D input of shape ", x.sizes());
    d.T = x.size(0);
    d.N = x.size(1);
    d.R = d.T * d.N;
  }
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": expected a floating point x, but got ", x.scalar_type());
  if (a.c0) {
    TORCH_CHECK(a.c0->dim() == 2, op, ": expected c0 of shape (N, hidden_size), but got ", a.c0->sizes());
  }
  TORCH_CHECK(h0.dim() == 2, op, ": expected h0 of shape (N, ", a.c0 ? "proj_size or hidden_size" : "hidden_size",
              "), but got ", h0.sizes());
  d.I = x.size(-1);
  d.H = a.c0 ? a.c0->size(1) : h0.size(1);
  d.P = h0.size(1);
  d.reverse = a.reverse;
  d.projected = a.w_hr.has_value();
  TORCH_CHECK(d.T > 0, op, ": expected a sequence of at least one step, but got T = 0");
  TORCH_CHECK(d.H > 0, op, ": expected hidden_size > 0");
  TORCH_CHECK(d.projected || d.P == d.H, op, ": without w_hr, h0 must have hidden_size = ", d.H,
              " columns, but got ", d.P);
  check_same(op, x, h0, "h0");
  check_same(op, x, a.w_ih, "w_ih");
  check_same(op, x, a.w_hh, "w_hh");
  check_shape(op, h0, {d.N, d.P}, "h0");
  check_shape(op, a.w_ih, {gates * d.H, d.I}, "w_ih");
  check_shape(op, a.w_hh, {gates * d.H, d.P}, "w_hh");
  auto check_optional = [&](const OptTensor& t, const char* name, at::IntArrayRef shape) {
    if (!t) return;
    check_same(op, x, *t, name);
    check_shape(op, *t, shape, name);
  };
  check_optional(a.c0, "c0", {d.N, d.H});
  check_optional(a.b_ih, "b_ih", {gates * d.H});
  check_optional(a.b_hh, "b_hh", {gates * d.H});
  check_optional(a.w_hr, "w_hr", {d.P, d.H});
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

// seq's rows holding each batch entry's state after its last step, (N, cols): a view of
// seq unless the sequence is packed.
inline Tensor last_rows(const LayerDims& d, const Schedule& sc, const Tensor& seq) {
  if (!d.packed) return seq.select(0, d.reverse ? 0 : d.T - 1);
  return seq.index_select(0, final_rows(d, sc, seq.device()));
}

// The same rows as a tensor of their own (an op's outputs may not alias).
inline Tensor final_state(const LayerDims& d, const Schedule& sc, const Tensor& seq) {
  const Tensor rows = last_rows(d, sc, seq);
  return d.packed ? rows : rows.clone();
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

}  // namespace lstm_ext
