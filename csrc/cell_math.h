// Gate math of one LSTM cell element, shared by the CPU and CUDA kernels.
//
// Everything is templated on the arithmetic type so that the CPU kernel can run the
// very same formulas on at::vec::Vectorized lanes, and the CUDA kernel on float
// (the opmath type of half and bfloat16) or double. The transcendental functions come
// from Math<T>, which the CPU kernel specializes for vector types.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>

namespace lstm_ext {

template <typename T>
struct Math;

template <>
struct Math<float> {
  C10_HOST_DEVICE static float exp(float x) { return expf(x); }
  C10_HOST_DEVICE static float tanh(float x) { return tanhf(x); }
};

template <>
struct Math<double> {
  C10_HOST_DEVICE static double exp(double x) { return ::exp(x); }
  C10_HOST_DEVICE static double tanh(double x) { return ::tanh(x); }
};

// 1 / (1 + e^-x) saturates cleanly: e^-x = inf gives exactly 0, never NaN.
template <typename T>
C10_HOST_DEVICE inline T sigmoid(T x) {
  return T(1) / (T(1) + Math<T>::exp(T(0) - x));
}

// Activations and new state of one element, from the four gate pre-activations.
template <typename T>
struct CellForward {
  T i, f, g, o;  // activated gates
  T c;           // new cell state
  T h;           // o * tanh(c): the hidden state before any projection
};

template <typename T>
C10_HOST_DEVICE inline CellForward<T> cell_forward(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev) {
  CellForward<T> r;
  r.i = sigmoid(pre_i);
  r.f = sigmoid(pre_f);
  r.g = Math<T>::tanh(pre_g);
  r.o = sigmoid(pre_o);
  r.c = r.f * c_prev + r.i * r.g;
  r.h = r.o * Math<T>::tanh(r.c);
  return r;
}

// Gradients w.r.t. the gate pre-activations and the previous cell state.
template <typename T>
struct CellBackward {
  T d_i, d_f, d_g, d_o;
  T dc_prev;
};

// dh: gradient reaching o * tanh(c) at this step; dc_next: gradient reaching c from
// the following step. The gate values are the saved activations.
template <typename T>
C10_HOST_DEVICE inline CellBackward<T> cell_backward(
    T i, T f, T g, T o, T c, T c_prev, T dh, T dc_next) {
  const T tanh_c = Math<T>::tanh(c);
  const T dc = dc_next + dh * o * (T(1) - tanh_c * tanh_c);
  CellBackward<T> r;
  r.d_o = dh * tanh_c * o * (T(1) - o);
  r.d_i = dc * g * i * (T(1) - i);
  r.d_f = dc * c_prev * f * (T(1) - f);
  r.d_g = dc * i * (T(1) - g * g);
  r.dc_prev = dc * f;
  return r;
}

}  // namespace lstm_ext
