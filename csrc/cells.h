// The cells: what one recurrent step computes per hidden unit, written once for every
// device. A Cell declares its shape for the time loop (time_loop.h):
//   kGates                how many H-wide blocks of pre-activations W_ih x (and W_hh h) has;
//   kSaved                how many H-wide blocks per row the forward keeps for the backward;
//   kCarriesCell          whether a cell state c runs beside h (the LSTM's);
//   kSeparateRecurrent    whether W_hh h must stay apart from W_ih x (the GRU's r * (W_hn h + b_hn));
//   kProjects             whether a projection of h (proj_size) is defined;
// and its element math, forward(e) and backward(e), against an element accessor: the
// ForwardElement / BackwardElement below, whose Lane loads and stores either one value
// (CUDA threads, CPU tails, half and bfloat16) or one at::vec::Vectorized (CPU).
#pragma once

#include <c10/macros/Macros.h>

#include "backend_api.h"
#include "cell_math.h"

namespace lstm_ext {

// Loads and stores one scalar_t element as the opmath type T.
template <typename T, typename scalar_t>
struct ScalarLane {
  C10_HOST_DEVICE static T load(const scalar_t* p) { return T(*p); }
  C10_HOST_DEVICE static void store(scalar_t* p, T v) { *p = scalar_t(v); }
};

// Element (b, j) of a forward step: row b, hidden unit j (the first of a vector's).
template <class Cell, typename T, class Lane, typename scalar_t>
struct ForwardElement {
  using Value = T;
  const ForwardStep<scalar_t>& s;
  int64_t b, j;

  C10_HOST_DEVICE T at(const scalar_t* row, int block) const { return Lane::load(row + block * s.hidden + j); }
  C10_HOST_DEVICE scalar_t* saved_row() const { return s.saved + b * Cell::kSaved * s.hidden; }
  // Gate `k`'s pre-activation with its bias: everything, or the input part for separate cells.
  C10_HOST_DEVICE T pre(int k) const { return at(saved_row(), k) + at(s.bias, k); }
  // Gate `k`'s recurrent pre-activation with b_hh (separate cells).
  C10_HOST_DEVICE T recurrent(int k) const {
    return at(s.recurrent + b * Cell::kGates * s.hidden, k) + at(s.bias_hh, k);
  }
  C10_HOST_DEVICE T h_prev() const { return at((b < s.n_carry ? s.h_carry : s.h0) + b * s.hidden, 0); }
  C10_HOST_DEVICE T c_prev() const { return at((b < s.n_carry ? s.c_carry : s.c0) + b * s.hidden, 0); }
  C10_HOST_DEVICE void save(int k, T v) const { Lane::store(saved_row() + k * s.hidden + j, v); }
  C10_HOST_DEVICE void set_c(T v) const { Lane::store(s.c_out + b * s.hidden + j, v); }
  C10_HOST_DEVICE void set_h(T v) const { Lane::store(s.h_out + b * s.hidden + j, v); }
};

// A ForwardElement whose recurrent pre-activations W_hh h come apart, in the opmath type,
// from a GEMM's sums grouped by unit (a backend's recurrent_step): gate k of unit j of row b
// at sums[b * ld + k * units + j - j0], for the group of units [j0, j0 + units). The Cell
// must be handed it as it is (Cell::forward(e)): run_cell takes a ForwardElement.
template <class Cell, typename T, class Lane, class SumLane, typename scalar_t, typename acc_t>
struct ForwardElementWithSums : ForwardElement<Cell, T, Lane, scalar_t> {
  using Base = ForwardElement<Cell, T, Lane, scalar_t>;
  const acc_t* sums;
  int64_t ld, units, j0;

  C10_HOST_DEVICE T sum(int k) const { return SumLane::load(sums + this->b * ld + k * units + this->j - j0); }
  C10_HOST_DEVICE T pre(int k) const {
    if constexpr (Cell::kSeparateRecurrent) {
      return Base::pre(k);
    } else {
      return Base::pre(k) + sum(k);
    }
  }
  C10_HOST_DEVICE T recurrent(int k) const { return sum(k) + this->at(this->s.bias_hh, k); }
};

template <class Cell, typename T, class Lane, typename scalar_t>
struct BackwardElement {
  using Value = T;
  const BackwardStep<scalar_t>& s;
  int64_t b, j;

  C10_HOST_DEVICE int64_t row(int64_t width) const { return b * width * s.hidden; }
  C10_HOST_DEVICE T saved(int k) const { return Lane::load(s.saved + row(Cell::kSaved) + k * s.hidden + j); }
  C10_HOST_DEVICE T c() const { return Lane::load(s.c + row(1) + j); }
  C10_HOST_DEVICE T c_prev() const { return Lane::load((b < s.n_carry ? s.c_carry : s.c0) + row(1) + j); }
  C10_HOST_DEVICE T h_prev() const { return Lane::load((b < s.n_carry ? s.h_carry : s.h0) + row(1) + j); }
  C10_HOST_DEVICE T dh() const { return Lane::load(s.dh + row(1) + j); }
  C10_HOST_DEVICE T dc() const { return Lane::load(s.dc + row(1) + j); }
  C10_HOST_DEVICE void set_dc_prev(T v) const { Lane::store(s.dc + row(1) + j, v); }
  C10_HOST_DEVICE void set_d_input(int k, T v) const { Lane::store(s.d_input + row(Cell::kGates) + k * s.hidden + j, v); }
  C10_HOST_DEVICE void set_d_recurrent(int k, T v) const {
    Lane::store(s.d_recurrent + row(Cell::kGates) + k * s.hidden + j, v);
  }
  // Adds v to the gradient of h_prev (to which the GEMM through W_hh adds later).
  C10_HOST_DEVICE void add_dh_prev(T v) const {
    scalar_t* p = (b < s.n_carry ? s.dh_carry : s.dh0) + row(1) + j;
    Lane::store(p, Lane::load(p) + v);
  }
};

// The accessor of one element of a step: ForwardElement for a ForwardStep, BackwardElement
// for a BackwardStep. With run_cell, one pointwise launch per backend serves both.
template <class Cell, typename T, class Lane, class StepT>
struct ElementOfStep;
template <class Cell, typename T, class Lane, typename scalar_t>
struct ElementOfStep<Cell, T, Lane, ForwardStep<scalar_t>> {
  using type = ForwardElement<Cell, T, Lane, scalar_t>;
};
template <class Cell, typename T, class Lane, typename scalar_t>
struct ElementOfStep<Cell, T, Lane, BackwardStep<scalar_t>> {
  using type = BackwardElement<Cell, T, Lane, scalar_t>;
};
template <class Cell, typename T, class Lane, class StepT>
using Element = typename ElementOfStep<Cell, T, Lane, StepT>::type;

// Runs a Cell's forward or backward math on one element, by the accessor's kind.
template <class Cell, typename T, class Lane, typename scalar_t>
C10_HOST_DEVICE inline void run_cell(const ForwardElement<Cell, T, Lane, scalar_t>& e) {
  Cell::forward(e);
}
template <class Cell, typename T, class Lane, typename scalar_t>
C10_HOST_DEVICE inline void run_cell(const BackwardElement<Cell, T, Lane, scalar_t>& e) {
  Cell::backward(e);
}

// nn.LSTM: gates i, f, g, o; c' = f c + i g, h' = o tanh(c'). Saves the activated gates.
struct LstmCell {
  static constexpr int kGates = 4, kSaved = 4;
  static constexpr bool kCarriesCell = true, kSeparateRecurrent = false, kProjects = true;

  template <class E>
  C10_HOST_DEVICE static void forward(const E& e) {
    using T = typename E::Value;
    const T i = sigmoid(e.pre(0)), f = sigmoid(e.pre(1)), g = Math<T>::tanh(e.pre(2)), o = sigmoid(e.pre(3));
    const T c = f * e.c_prev() + i * g;
    e.save(0, i);
    e.save(1, f);
    e.save(2, g);
    e.save(3, o);
    e.set_c(c);
    e.set_h(o * Math<T>::tanh(c));
  }

  template <class E>
  C10_HOST_DEVICE static void backward(const E& e) {
    using T = typename E::Value;
    const T i = e.saved(0), f = e.saved(1), g = e.saved(2), o = e.saved(3);
    const T tanh_c = Math<T>::tanh(e.c()), dh = e.dh();
    const T dc = e.dc() + dh * o * tanh_grad(tanh_c);
    e.set_d_input(0, dc * g * sigmoid_grad(i));
    e.set_d_input(1, dc * e.c_prev() * sigmoid_grad(f));
    e.set_d_input(2, dc * i * tanh_grad(g));
    e.set_d_input(3, dh * tanh_c * sigmoid_grad(o));
    e.set_dc_prev(dc * f);
  }
};

// nn.GRU (and cuDNN's): gates r, z, n; n = tanh(W_in x + b_in + r (W_hn h + b_hn)),
// h' = (1 - z) n + z h. Saves r, z, n and W_hn h + b_hn.
struct GruCell {
  static constexpr int kGates = 3, kSaved = 4;
  static constexpr bool kCarriesCell = false, kSeparateRecurrent = true, kProjects = false;

  template <class E>
  C10_HOST_DEVICE static void forward(const E& e) {
    using T = typename E::Value;
    const T r = sigmoid(e.pre(0) + e.recurrent(0));
    const T z = sigmoid(e.pre(1) + e.recurrent(1));
    const T hn = e.recurrent(2);
    const T n = Math<T>::tanh(e.pre(2) + r * hn);
    const T h_prev = e.h_prev();
    e.save(0, r);
    e.save(1, z);
    e.save(2, n);
    e.save(3, hn);
    e.set_h(n + z * (h_prev - n));
  }

  template <class E>
  C10_HOST_DEVICE static void backward(const E& e) {
    using T = typename E::Value;
    const T r = e.saved(0), z = e.saved(1), n = e.saved(2), hn = e.saved(3);
    const T dh = e.dh();
    const T dn = dh * (T(1) - z) * tanh_grad(n);
    const T dz = dh * (e.h_prev() - n) * sigmoid_grad(z);
    const T dr = dn * hn * sigmoid_grad(r);
    e.set_d_input(0, dr);
    e.set_d_input(1, dz);
    e.set_d_input(2, dn);
    e.set_d_recurrent(0, dr);
    e.set_d_recurrent(1, dz);
    e.set_d_recurrent(2, dn * r);
    e.add_dh_prev(dh * z);
  }
};

// nn.RNN: h' = tanh(W_ih x + b_ih + W_hh h + b_hh), or relu. Saves h'.
template <bool kRelu>
struct RnnCell {
  static constexpr int kGates = 1, kSaved = 1;
  static constexpr bool kCarriesCell = false, kSeparateRecurrent = false, kProjects = false;

  template <class E>
  C10_HOST_DEVICE static void forward(const E& e) {
    using T = typename E::Value;
    const T h = kRelu ? Math<T>::relu(e.pre(0)) : Math<T>::tanh(e.pre(0));
    e.save(0, h);
    e.set_h(h);
  }

  template <class E>
  C10_HOST_DEVICE static void backward(const E& e) {
    using T = typename E::Value;
    const T h = e.saved(0), dh = e.dh();
    e.set_d_input(0, kRelu ? Math<T>::where_positive(h, dh) : dh * tanh_grad(h));
  }
};

using RnnTanhCell = RnnCell<false>;
using RnnReluCell = RnnCell<true>;

}  // namespace lstm_ext
