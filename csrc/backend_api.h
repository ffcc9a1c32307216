// What the time loop (time_loop.h) hands a device Backend: GEMM operands and the
// pointers of one step's pointwise work. A Backend (cpu/lstm_cpu.cpp, cuda/lstm_cuda.cu)
// works on raw pointers, so that the time loop itself allocates nothing. It has
//   prepare(W, use): called once per op call for each weight of the per-step and other
//     multi-row GEMMs (a GemmUse: which GEMM, over how many steps, the rows of most
//     calls), so that the backend can lay W out for them once and pick an implementation;
//   gemm(m, A, lda, W, beta, C, ldc): row-major C (m x n) = A (m x k) op(W) + beta * C,
//     with W what prepare returned (every per-step GEMM multiplies by a weight on the right);
//   pointwise<Cell>(step): run the Cell's element math (cells.h) over the rows x hidden
//     elements of a ForwardStep or a BackwardStep;
//   recurrent_step<Cell>(W, a_carry, a_start, lda, step): where the backend can, run a
//     forward step's recurrent GEMM (rows [0, n_carry) of A from a_carry, the others from
//     a_start) and its Cell as one, the Cell reading the GEMM's sums where they are made,
//     and return true; else return false, and the time loop calls gemm and pointwise;
//   weight_grad(dg, a): dg^T a, a weight gradient over all steps, from 2-D tensors.
#pragma once

#include <cstdint>

namespace lstm_ext {

// The right operand of a GEMM: a row-major weight (rows x cols), or its transpose.
template <typename scalar_t>
struct WeightOperand {
  const scalar_t* data;
  int64_t rows, cols;
  bool transposed;
  int64_t k() const { return transposed ? cols : rows; }
  int64_t n() const { return transposed ? rows : cols; }
};

// The GEMMs of a layer that multiply by a prepared weight.
enum class GemmRole {
  kInputProjection, kRecurrent, kProjection, kRecurrentGrad, kProjectionGrad, kInputGrad,
  kWeightGrad,  // dg^T a over all steps (weight_grad): not a prepared weight
};

// What a prepared weight serves: the GEMMs of `role` over `steps` steps of the sequence,
// all or most of them (packed sequences: the steps of the longest) with `rows` rows.
// For the recurrent GEMM, `gates`: the Cell's kGates, the blocks of hidden columns that
// op(W)'s n columns form (a backend running recurrent_step may group them by unit).
struct GemmUse {
  GemmRole role;
  int64_t steps, rows;
  int64_t gates = 1;
};

// Pointers of one forward step; rows [0, n_carry) continue from the previous step's
// rows (h_carry, c_carry), rows [n_carry, rows) start from h0, c0. Matrices are
// row-major with the widths (in units of hidden) a Cell declares: saved kSaved, the
// recurrent pre-activations kGates. Pointers a Cell does not use may be null.
template <typename scalar_t>
struct ForwardStep {
  using scalar_type = scalar_t;
  scalar_t* saved;              // (rows, kSaved H): input pre-activations (plus, for cells that
                                // sum them, the recurrent ones) less the bias in; what the backward needs out
  const scalar_t* recurrent;    // (rows, kGates H): h_prev W_hh^T, for cells that keep it apart
  const scalar_t* bias;         // (kGates H): b_ih + b_hh, or b_ih alone for cells that keep them apart; zeros without biases
  const scalar_t* bias_hh;      // (kGates H): b_hh, for cells that keep it apart
  const scalar_t* h_carry;      // previous step's hidden state rows (width hidden)
  const scalar_t* h0;           // (N, hidden)
  const scalar_t* c_carry;      // previous step's cell state rows
  const scalar_t* c0;           // (N, hidden)
  scalar_t* c_out;              // (rows, hidden)
  scalar_t* h_out;              // (rows, hidden): the new hidden state before any projection
  int64_t rows, n_carry, hidden;
};

template <typename scalar_t>
struct BackwardStep {
  using scalar_type = scalar_t;
  const scalar_t* saved;        // (rows, kSaved H) what the forward saved
  const scalar_t* c;            // (rows, hidden) this step's cell state
  const scalar_t* c_carry;      // as in ForwardStep
  const scalar_t* c0;
  const scalar_t* h_carry;
  const scalar_t* h0;
  const scalar_t* dh;           // (rows, hidden) gradient reaching this step's h (before any projection)
  scalar_t* dc;                 // (rows, hidden) in: gradient of c from the next step; out: of c_prev
  scalar_t* d_input;            // (rows, kGates H) gradient of the input pre-activations
  scalar_t* d_recurrent;        // (rows, kGates H) of the recurrent ones, for cells that keep them apart
  scalar_t* dh_carry;           // gradient of the previous step's h rows, added to (width hidden)
  scalar_t* dh0;                // (N, hidden) gradient of h0, added to
  int64_t rows, n_carry, hidden;
};

}  // namespace lstm_ext
