// tanh on vector lanes from one exp (float32) or expm1 (float64). ATen's Vectorized
// tanh (SLEEF, 1 ulp) takes ~2.5 ns per float32 element on the development machine, six
// times its exp, and the LSTM evaluates two tanh per hidden element and step.
//
// float32:
//   |x| <  0.55: x + x^3 P(x^2), P fitted here (weighted least squares toward minimax,
//                relative error 1e-9 in exact arithmetic, under 1 ulp in float32);
//   |x| >= 0.55: sign(x) (1 - 2 / (e^{2|x|} + 1)), no cancellation since tanh >= 0.5
//                there; e^{2|x|} = inf gives exactly 1.
// Within 3 ulp of tanh over all floats; NaN stays NaN, -0 stays -0.
//
// float64: expm1(2x) / (expm1(2x) + 2), accurate near 0 as well; the clamp to |2x| <= 40
// (where tanh already rounds to +-1) keeps expm1 finite. Half the cost of SLEEF's tanh.
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace lstm_ext {

inline at::vec::Vectorized<float> vec_tanh(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  const Vec ax = x.abs();

  const Vec x2 = x * x;
  Vec p(-6.274168845266104e-03f);
  p = p * x2 + Vec(2.107162587344646e-02f);
  p = p * x2 + Vec(-5.385229364037514e-02f);
  p = p * x2 + Vec(1.333258599042892e-01f);
  p = p * x2 + Vec(-3.333331644535064e-01f);
  const Vec small = x + x * x2 * p;

  const Vec one(1.f);
  const Vec large_abs = one - Vec(2.f) / ((ax + ax).exp() + one);
  const Vec large = large_abs | (x & Vec(-0.f));  // copy the sign bit of x

  // NaN compares false and takes the polynomial, which keeps it NaN.
  return Vec::blendv(small, large, ax >= Vec(0.55f));
}

inline at::vec::Vectorized<double> vec_tanh(const at::vec::Vectorized<double>& x) {
  using Vec = at::vec::Vectorized<double>;
  const Vec e = at::vec::clamp(x + x, Vec(-40.0), Vec(40.0)).expm1();
  return e / (e + Vec(2.0));
}

}  // namespace lstm_ext
