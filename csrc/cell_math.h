// Scalar math of the cells, shared by the CPU and CUDA kernels.
//
// Everything is templated on the arithmetic type so that the CPU kernels can run the
// very same formulas on at::vec::Vectorized lanes, and the CUDA kernels on float
// (the opmath type of half and bfloat16) or double. The elementary functions come
// from Math<T>, which the CPU backend specializes for vector types.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>

namespace lstm_ext {

// one_plus_exp(x) = 1 + e^x (the sigmoid's, and tanh's on CPU vectors, which round it
// once), tanh, reciprocal, relu (NaN stays NaN), and where_positive(y, v): v where y > 0,
// else 0.
template <typename T>
struct Math;

template <>
struct Math<float> {
  C10_HOST_DEVICE static float one_plus_exp(float x) { return 1.f + expf(x); }
  C10_HOST_DEVICE static float tanh(float x) { return tanhf(x); }
  C10_HOST_DEVICE static float reciprocal(float x) { return 1.f / x; }
  C10_HOST_DEVICE static float relu(float x) { return x < 0.f ? 0.f : x; }
  C10_HOST_DEVICE static float where_positive(float y, float v) { return y > 0.f ? v : 0.f; }
};

template <>
struct Math<double> {
  C10_HOST_DEVICE static double one_plus_exp(double x) { return 1. + ::exp(x); }
  C10_HOST_DEVICE static double tanh(double x) { return ::tanh(x); }
  C10_HOST_DEVICE static double reciprocal(double x) { return 1. / x; }
  C10_HOST_DEVICE static double relu(double x) { return x < 0. ? 0. : x; }
  C10_HOST_DEVICE static double where_positive(double y, double v) { return y > 0. ? v : 0.; }
};

// 1 / (1 + e^-x) saturates cleanly: e^-x = inf gives exactly 0, never NaN.
template <typename T>
C10_HOST_DEVICE inline T sigmoid(T x) {
  return Math<T>::reciprocal(Math<T>::one_plus_exp(T(0) - x));
}

// Derivatives through the saved activations y = sigmoid(x) and y = tanh(x).
template <typename T>
C10_HOST_DEVICE inline T sigmoid_grad(T y) {
  return y * (T(1) - y);
}
template <typename T>
C10_HOST_DEVICE inline T tanh_grad(T y) {
  return T(1) - y * y;
}

}  // namespace lstm_ext
