// A recurrent layer's time loop, written once for every cell and device.
//
// A layer is: one GEMM projecting the inputs of all T steps, then per step one
// recurrent GEMM and one fused pointwise kernel running the Cell (cells.h), or both as
// one where the backend can (recurrent_step); with a projection (the LSTM's proj_size)
// one more GEMM per step. The backward mirrors it and ends with large GEMMs over all
// steps for dx and (in layer_ops.h) the weight gradients. Layers of a stack running at
// once (a wavefront) take the projection, and dx, a block of steps at a time instead. A
// Backend (backend_api.h) supplies the GEMMs and the pointwise launch; the loop works on
// raw pointers and allocates nothing.
#pragma once

#include <algorithm>
#include <atomic>
#include <thread>

#include "backend_api.h"
#include "layer_geometry.h"

namespace lstm_ext {

// The inputs and output of a forward, as pointers. Nulls: w_hr without a projection,
// c0 for cells without a cell state.
template <typename scalar_t>
struct ForwardData {
  const scalar_t *x, *w_ih, *w_hh, *w_hr, *bias, *bias_hh, *h0, *c0;
  scalar_t* y;
};

// Where a forward keeps its per-step state. For the backward (per_step): every step's
// saved values, cells and, with a projection, unprojected h. For inference: the saved
// values of a block of steps, reused from block to block, one step's h, and the running
// cells, updated in place from c0; all stay small and hot in cache, and a forward
// allocates far less.
template <typename scalar_t>
struct ForwardState {
  scalar_t* saved;      // (T or block_steps, N, kSaved H)
  scalar_t* recurrent;  // (N, kGates H) for cells that keep W_hh h apart, else null
  scalar_t* cells;      // (T, N, H), or (N, H) holding c0 on entry and c_n on exit; null without a cell state
  scalar_t* hidden;     // (T or 1, N, H), only with a projection
  bool per_step;
  int64_t block_steps;  // steps per input-projection GEMM: T when per_step
};

// How far a layer's forward has got: the steps done, in processing order. A layer
// stacked on it and running at the same time on another thread (stack_inference's
// wavefront) waits on it before reading each block of its input.
class LayerProgress {
 public:
  void publish(int64_t steps) { steps_.store(steps, std::memory_order_release); }
  void fail() { steps_.store(kFailed, std::memory_order_release); }
  // Waits until `steps` steps are done: true then, false if the layer failed instead.
  bool wait_for(int64_t steps) const {
    for (int64_t spins = 0;; ++spins) {
      const int64_t done = steps_.load(std::memory_order_acquire);
      if (done == kFailed) return false;
      if (done >= steps) return true;
      // A step takes microseconds: spin briefly, then leave the core to others.
      if (spins > 1000) std::this_thread::yield();
    }
  }

 private:
  static constexpr int64_t kFailed = -1;
  std::atomic<int64_t> steps_{0};
};

// Rows [r0, r1) of step s, those it has (maybe none), as a step of their own: row 0 is s's row r0.
inline Step rows_of(const Step& s, int64_t r0, int64_t r1) {
  const int64_t rows = std::max<int64_t>(0, std::min(s.rows, r1) - r0);
  return {rows, std::clamp<int64_t>(s.n_carry - r0, 0, rows), s.row0 + r0, s.prev_row0 + r0};
}

// `input`: the progress of the layer whose output x is, when it is still running (it
// must run in the same direction); `output`: this layer's, published after each step.
template <class Backend, class Cell, typename scalar_t>
void forward_time_loop(const LayerDims& d, const Schedule& sc, const ForwardData<scalar_t>& p,
                       const ForwardState<scalar_t>& st, const LayerProgress* input = nullptr,
                       LayerProgress* output = nullptr) {
  const int64_t G = Cell::kGates * d.H, W = Cell::kSaved * d.H;
  // The input projection runs once over all rows, or per block of steps for inference.
  const int64_t projected_rows = std::min(st.block_steps * d.N, d.R);
  const auto w_ih_t = Backend::prepare(WeightOperand<scalar_t>{p.w_ih, G, d.I, true},
                                       {GemmRole::kInputProjection, d.T, projected_rows});
  const auto w_hh_t = Backend::prepare(WeightOperand<scalar_t>{p.w_hh, G, d.P, true},
                                       {GemmRole::kRecurrent, d.T, d.N, Cell::kGates});
  // Without a projection w_hr is null: its operand is left empty, and unused.
  const auto w_hr_t = Backend::prepare(WeightOperand<scalar_t>{p.w_hr, d.projected ? d.P : 0, d.H, true},
                                       {GemmRole::kProjection, d.T, d.N});
  // W_hh h is added to the saved input pre-activations, or kept apart.
  const int64_t ld_recurrent = Cell::kSeparateRecurrent ? G : W;
  const float beta_recurrent = Cell::kSeparateRecurrent ? 0 : 1;
  // Rows [r0, r1) of step k (those it has), whose saved values start at sequence row
  // row_lo of saved_block: the recurrent GEMM (rows from the previous step's h, then
  // rows from h0) and the Cell, by the backend as one or else in turn, and with a
  // projection its GEMM. Every row depends only on
  // the same row of the step before.
  auto run_step = [&](int64_t k, scalar_t* saved_block, int64_t row_lo, int64_t r0, int64_t r1) {
    const Step s = rows_of(sc.steps[k], r0, r1);
    if (s.rows == 0) return;
    // The (rows, H) cells or hidden of the step at sequence row `row0`: inference keeps one step's.
    auto state_at = [&](scalar_t* base, int64_t row0) { return base + (st.per_step ? row0 : r0) * d.H; };
    scalar_t* saved = saved_block + (s.row0 - row_lo) * W;
    scalar_t* recurrent = Cell::kSeparateRecurrent ? st.recurrent + r0 * G : saved;
    const scalar_t* h0 = p.h0 + r0 * d.P;
    const scalar_t* h_carry = s.n_carry > 0 ? p.y + s.prev_row0 * d.P : nullptr;
    scalar_t* y_t = p.y + s.row0 * d.P;
    scalar_t* h_t = d.projected ? state_at(st.hidden, s.row0) : y_t;
    ForwardStep<scalar_t> step{saved, Cell::kSeparateRecurrent ? recurrent : nullptr, p.bias, p.bias_hh,
                               h_carry, h0, nullptr, nullptr, nullptr, h_t, s.rows, s.n_carry, d.H};
    if constexpr (Cell::kCarriesCell) {
      // In place for inference: every element reads its own previous cell before writing it.
      step.c_carry = s.n_carry > 0 ? state_at(st.cells, s.prev_row0) : nullptr;
      step.c0 = st.per_step ? p.c0 + r0 * d.H : state_at(st.cells, s.row0);
      step.c_out = state_at(st.cells, s.row0);
    }
    const scalar_t* h_start = h0 + s.n_carry * d.P;
    if (!Backend::template recurrent_step<Cell>(w_hh_t, h_carry, h_start, d.P, step)) {
      if (s.n_carry > 0) {
        Backend::gemm(s.n_carry, h_carry, d.P, w_hh_t, beta_recurrent, recurrent, ld_recurrent);
      }
      if (s.rows > s.n_carry) {
        Backend::gemm(s.rows - s.n_carry, h_start, d.P, w_hh_t, beta_recurrent, recurrent + s.n_carry * ld_recurrent,
                      ld_recurrent);
      }
      Backend::template pointwise<Cell>(step);
    }
    if (d.projected) {
      Backend::gemm(s.rows, h_t, d.H, w_hr_t, 0, y_t, d.P);
    }
  };
  for (int64_t s0 = 0; s0 < d.T; s0 += st.block_steps) {
    // One GEMM projects the inputs of the block's steps, times [t_lo, t_lo + n), which
    // are sequence rows [row_lo, row_hi).
    const int64_t n = std::min(st.block_steps, d.T - s0);
    const int64_t t_lo = d.reverse ? d.T - s0 - n : s0;
    const int64_t row_lo = sc.offset[t_lo], row_hi = sc.offset[t_lo + n];
    scalar_t* saved_block = st.saved + (st.per_step ? row_lo * W : 0);
    if (input != nullptr && !input->wait_for(s0 + n)) {
      if (output != nullptr) output->fail();  // the error is the input layer's, raised by the op
      return;
    }
    Backend::gemm(row_hi - row_lo, p.x + row_lo * d.I, d.I, w_ih_t, 0, saved_block, W);
    auto run_block = [&](int64_t r0, int64_t r1) {
      for (int64_t k = s0; k < s0 + n; ++k) {
        run_step(k, saved_block, row_lo, r0, r1);
        if (output != nullptr) output->publish(k + 1);
      }
    };
    // Alone (no wavefront), by blocks of rows where the backend splits them, as the
    // backward does: one fork-join per block of steps (for the backward's forward, one
    // block of all steps), not two per step. On the Intel Xeon, one process alternating,
    // this made a no_grad forward at T=100 H=128 13% faster at B=32, 21% at B=16 and 3%
    // at B=64 (B=8 H=64: 31%).
    if (input == nullptr && output == nullptr) {
      Backend::for_each_row_block(w_hh_t, d.N, run_block);
    } else {
      run_block(0, d.N);
    }
  }
}

// The backward's inputs and outputs, as pointers. dhy (the gradient of y, with h_n's
// added) collects every gradient reaching h_t and is overwritten; dh0 starts at zero.
template <typename scalar_t>
struct BackwardData {
  const scalar_t *saved, *cells, *y, *h0, *c0, *w_ih, *w_hh, *w_hr;
  scalar_t *dhy, *dc, *d_input, *d_recurrent, *dh0, *dr, *dx;
};

// `input`: the progress of the layer above when it runs at the same time (a stack's
// wavefront), whose dx adds into this layer's dhy; `output`: this layer's, published as
// its dx reaches the layer below, block by block of block_steps steps. dx_beta: 1 where
// dx is the dhy of the layer below (holding its h_n's gradient), 0 where dx is new.
template <class Backend, class Cell, typename scalar_t>
void backward_time_loop(const LayerDims& d, const Schedule& sc, const BackwardData<scalar_t>& p,
                        const LayerProgress* input = nullptr, LayerProgress* output = nullptr,
                        int64_t block_steps = 0, float dx_beta = 0) {
  const int64_t G = Cell::kGates * d.H, W = Cell::kSaved * d.H;
  const auto w_hh_n =
      Backend::prepare(WeightOperand<scalar_t>{p.w_hh, G, d.P, false}, {GemmRole::kRecurrentGrad, d.T, d.N});
  const auto w_hr_n = Backend::prepare(WeightOperand<scalar_t>{p.w_hr, d.projected ? d.P : 0, d.H, false},
                                       {GemmRole::kProjectionGrad, d.T, d.N});
  // Rows [r0, r1) of step s, those it has.
  auto run_step = [&](const Step& step_rows, int64_t r0, int64_t r1) {
    const Step s = rows_of(step_rows, r0, r1);
    if (s.rows == 0) return;
    scalar_t* dh0 = p.dh0 + r0 * d.P;
    const scalar_t* dh = p.dhy + s.row0 * d.P;
    if (d.projected) {
      Backend::gemm(s.rows, dh, d.P, w_hr_n, 0, p.dr + r0 * d.H, d.H);
      dh = p.dr + r0 * d.H;
    }
    scalar_t* d_input = p.d_input + s.row0 * G;
    scalar_t* d_recurrent = Cell::kSeparateRecurrent ? p.d_recurrent + s.row0 * G : d_input;
    scalar_t* dh_carry = s.n_carry > 0 ? p.dhy + s.prev_row0 * d.P : nullptr;
    BackwardStep<scalar_t> step{p.saved + s.row0 * W, nullptr, nullptr, nullptr,
                                s.n_carry > 0 ? p.y + s.prev_row0 * d.P : nullptr, p.h0 + r0 * d.P, dh,
                                p.dc + r0 * d.H, d_input, Cell::kSeparateRecurrent ? d_recurrent : nullptr,
                                dh_carry, dh0, s.rows, s.n_carry, d.H};
    if constexpr (Cell::kCarriesCell) {
      step.c = p.cells + s.row0 * d.H;
      step.c_carry = s.n_carry > 0 ? p.cells + s.prev_row0 * d.H : nullptr;
      step.c0 = p.c0 + r0 * d.H;
    }
    Backend::template pointwise<Cell>(step);
    // The gradient of h_prev adds onto what is there: the output gradient (and, for
    // some cells, what the pointwise kernel added); dh0 starts at zero.
    if (s.n_carry > 0) {
      Backend::gemm(s.n_carry, d_recurrent, G, w_hh_n, 1, dh_carry, d.P);
    }
    if (s.rows > s.n_carry) {
      Backend::gemm(s.rows - s.n_carry, d_recurrent + s.n_carry * G, G, w_hh_n, 1, dh0 + s.n_carry * d.P, d.P);
    }
  };
  // dx of sequence rows [row_lo, row_hi): d_input times W_ih.
  const int64_t dx_rows = block_steps > 0 ? std::min(block_steps * d.N, d.R) : d.R;
  const auto w_ih_n = Backend::prepare(WeightOperand<scalar_t>{p.w_ih, p.dx != nullptr ? G : 0, d.I, false},
                                       {GemmRole::kInputGrad, d.T, dx_rows});
  auto input_grad = [&](int64_t row_lo, int64_t row_hi) {
    if (p.dx != nullptr && row_hi > row_lo) {
      Backend::gemm(row_hi - row_lo, p.d_input + row_lo * G, G, w_ih_n, dx_beta, p.dx + row_lo * d.I, d.I);
    }
  };
  // Blocks of steps, last first: one block of all steps unless a wavefront asks for less.
  // Each block's dx goes down as soon as it is done.
  const int64_t T = static_cast<int64_t>(sc.steps.size());
  const int64_t block = block_steps > 0 ? block_steps : T;
  for (int64_t j0 = 0; j0 < T; j0 += block) {
    const int64_t n = std::min(block, T - j0);
    // Rows [r0, r1) of the block's steps; false if the layer above failed.
    auto run_block = [&](int64_t r0, int64_t r1) {
      for (int64_t j = j0; j < j0 + n; ++j) {
        // Step j (counted from the last) reads its dhy rows and adds into the next one's:
        // the layer above must have written both.
        if (input != nullptr && !input->wait_for(std::min(T, j + 2))) return false;
        run_step(sc.steps[T - 1 - j], r0, r1);
      }
      return true;
    };
    if (input == nullptr && output == nullptr) {
      // Every row of a step depends only on the same row of the next step: the backend may
      // run blocks of rows [r0, r1) through the steps apart (on CPU, one per thread).
      Backend::for_each_row_block(w_hh_n, d.N, [&](int64_t r0, int64_t r1) { run_block(r0, r1); });
    } else if (!run_block(0, d.N)) {
      if (output != nullptr) output->fail();  // the error is the layer above's, raised by the op
      return;
    }
    int64_t row_lo = d.R, row_hi = 0;
    for (int64_t j = j0; j < j0 + n; ++j) {
      const Step& s = sc.steps[T - 1 - j];
      if (s.rows > 0) {
        row_lo = std::min(row_lo, s.row0);
        row_hi = std::max(row_hi, s.row0 + s.rows);
      }
    }
    input_grad(row_lo, row_hi);
    if (output != nullptr) output->publish(j0 + n);
  }
}

}  // namespace lstm_ext
