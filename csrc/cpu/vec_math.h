// Vector lanes for the CPU kernels: 1 + e^x and tanh for the cell math (below), and VecLane,
// which loads and stores a vector of float from half or bfloat16 memory.
//
// 1 + e^x (float32, AVX2 and AVX-512), what the sigmoid and tanh need: ATen's
// Vectorized<float>::exp is an out-of-line SLEEF call, and the cell kernel makes five per
// vector (three sigmoids, two tanh), each forcing the live vectors to the stack. Inline
// here: e^x = 2^n e^r with n = round(x / ln 2), r = x - n ln 2 (two-part ln 2, exact
// product), e^r by a degree-6 polynomial fitted here (relative error 3e-9 in exact
// arithmetic), 2^n built in the exponent bits, and 1 + e^x rounded once. x is clamped to
// [-87.3, 88.3], where 2^n stays a normal float: beyond, the gate math only needs
// 1 / (1 + e^x) and 2 / (e^x + 1), which already round to 0 or 1 (or a value under
// 1.2e-38). NaN stays NaN. float64 the same way (below); other builds use ATen's exp.
// The polynomials run by Estrin's scheme (below): the cell's steps are chains of
// dependent operations, and against Horner's rule this took a few percent off LSTM
// forwards on the Intel Xeon (bfloat16 B=64 T=100 H=256 L=2, float64 B=32 T=100 H=128
// L=1, float32 B=8 T=50 H=64 L=2; processes alternating).
//
// tanh: ATen's Vectorized tanh (SLEEF, 1 ulp) takes ~2.5 ns per float32 element on the
// development machine, six times its exp, and the LSTM evaluates two tanh per hidden
// element and step. Here it costs one exp.
//
// float32 tanh:
//   |x| <  0.55: x + x^3 P(x^2), P fitted here (weighted least squares toward minimax,
//                relative error 1e-9 in exact arithmetic, under 1 ulp in float32);
//   |x| >= 0.55: sign(x) (1 - 2 / (e^{2|x|} + 1)), no cancellation since tanh >= 0.5
//                there; a huge e^{2|x|} gives exactly 1.
// Within 3 ulp of tanh over all floats; NaN stays NaN, -0 stays -0.
//
// float64 tanh, the same two pieces on vec_one_plus_exp and vec_reciprocal (an earlier version,
// expm1(2x) / (expm1(2x) + 2) on SLEEF's expm1, took 7% of an LSTM's float64
// forward+backward at B=32 H=128 on the Intel Xeon, ten times as much as ATen's exp):
//   |x| <  0.55: x + x^3 P(x^2), P of degree 10 fitted here (Chebyshev fit in 50-digit
//                arithmetic, error 8e-18 in P, so relative error under 3e-18 in tanh);
//   |x| >= 0.55: sign(x) (1 - 2 / (e^{2|x|} + 1)), 2|x| clamped to 40 (where tanh already
//                rounds to +-1) to keep e^{2|x|} finite.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <type_traits>

namespace lstm_ext {

inline at::vec::Vectorized<float> vec_one_plus_exp(const at::vec::Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  using Vec = at::vec::Vectorized<float>;
  using IntVec = at::vec::Vectorized<int32_t>;
  // clamp is min(hi, max(lo, x)): max and min return their second operand when either is
  // NaN, so NaN passes.
  const Vec v = at::vec::clamp(x, Vec(-87.3f), Vec(88.3f));
  // n = round(v / ln 2) by adding 1.5 * 2^23: t = 1.5 * 2^23 + n exactly, n in its low bits.
  const Vec shifter(12582912.f);
  const Vec t = at::vec::fmadd(v, Vec(1.44269504088896341f), shifter);
  const Vec n = t - shifter;
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), v);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  // e^r - 1 = r + r^2 u(r), u of degree 4 by Estrin's scheme; then 1 + e^v = (2^n + 1) +
  // 2^n (e^r - 1) in one multiply-add: four operations deep after r, where Horner's rule
  // took seven.
  const Vec r2 = r * r;
  const Vec u23 = at::vec::fmadd(Vec(1.666652113199234e-01f), r, Vec(4.999999403953552e-01f));
  const Vec u45 = at::vec::fmadd(Vec(8.368710987269878e-03f), r, Vec(4.166838899254799e-02f));
  const Vec u = at::vec::fmadd(at::vec::fmadd(Vec(1.3814601115882397e-03f), r2, u45), r2, u23);
  // 2^n: n + 127 in the exponent bits (the shift drops t's higher bits).
  const Vec two_n = at::vec::cast<float>((at::vec::cast<int32_t>(t) + IntVec(127)) << IntVec(23));
  return at::vec::fmadd(at::vec::fmadd(u, r2, r), two_n, two_n + Vec(1.f));
#else
  return x.exp() + at::vec::Vectorized<float>(1.f);
#endif
}

// float64 (AVX2 and AVX-512), the same scheme: n = round(x / ln 2) by adding 1.5 * 2^52
// (which leaves n in the low mantissa bits), ln 2 in two parts (fdlibm's, whose high part
// times n is exact), e^r by its Taylor series to r^13 (remainder under 5e-18 relative for
// |r| <= ln 2 / 2), 2^n built in the exponent bits. x is clamped to [-708, 709], where 2^n
// stays a normal double; beyond, as for float32, the gate math already rounds to 0 or 1.
// With the reciprocal below, against SLEEF's out-of-line exp (2.7% of the samples) and
// divisions: an LSTM's float64 forward+backward 1.5-5% faster on the Intel Xeon (one
// process alternating; B=32 T=100 H=128 L=1, B=50 T=50 H=256 L=2).
inline at::vec::Vectorized<double> vec_one_plus_exp(const at::vec::Vectorized<double>& x) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  using Vec = at::vec::Vectorized<double>;
  using IntVec = at::vec::Vectorized<int64_t>;
  const Vec v = at::vec::clamp(x, Vec(-708.0), Vec(709.0));  // NaN passes, as for float32
  const Vec shifter(6755399441055744.0);                       // 1.5 * 2^52
  const Vec t = at::vec::fmadd(v, Vec(1.4426950408889634), shifter);
  const Vec n = t - shifter;
  Vec r = at::vec::fmadd(n, Vec(-6.93147180369123816490e-01), v);
  r = at::vec::fmadd(n, Vec(-1.90821492927058770002e-10), r);
  // e^r - 1 = r + r^2 u(r), u(r) = sum of r^i / (i + 2)! for i < 12 by Estrin's scheme (pairs,
  // then pairs of pairs with r^2, r^4, r^8); then 1 + e^v = (2^n + 1) + 2^n (e^r - 1) in
  // one multiply-add: six operations deep after r, where Horner's rule took fourteen.
  constexpr std::array<double, 14> inv_factorial = [] {
    std::array<double, 14> f{};
    double factorial = 1.0;
    for (int i = 0; i < 14; ++i) f[i] = 1.0 / (factorial *= std::max(i, 1));
    return f;
  }();
  const Vec r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
  auto pair = [&](int i) { return at::vec::fmadd(Vec(inv_factorial[i + 1]), r, Vec(inv_factorial[i])); };
  const Vec u0 = at::vec::fmadd(pair(4), r2, pair(2));
  const Vec u1 = at::vec::fmadd(pair(8), r2, pair(6));
  const Vec u2 = at::vec::fmadd(pair(12), r2, pair(10));
  const Vec u = at::vec::fmadd(u2, r8, at::vec::fmadd(u1, r4, u0));
  const IntVec n_int = at::vec::cast<int64_t>(t) - at::vec::cast<int64_t>(shifter);
  const Vec two_n = at::vec::cast<double>((n_int + IntVec(1023)) << IntVec(52));
  return at::vec::fmadd(at::vec::fmadd(u, r2, r), two_n, two_n + Vec(1.0));
#else
  return x.exp() + at::vec::Vectorized<double>(1.0);
#endif
}

// 1 / x, for the sigmoid's and tanh's divisions (five per LSTM unit and step). With
// AVX-512: the 14-bit reciprocal estimate and one Newton step, r + r (1 - x r), relative
// error about 2^-28 before rounding (sigmoid and tanh stay within the tests' 3 ulp), where
// the divisions' latency stalled the cell. On the Intel Xeon, two processes alternating,
// lstm_ext / nn.LSTM: bfloat16 fwd+bwd B=64 T=100 H=256 L=2 1.43 and 1.38x against 1.30
// and 1.32x, float32 forward 1.22 and 1.13x against 1.13 and 1.14x. AVX2 (not measured
// this way) keeps the division. An x of 2^126 or more gives 0.
inline at::vec::Vectorized<float> vec_reciprocal(const at::vec::Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 r = _mm512_rcp14_ps(x);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.f)), r);
#else
  return at::vec::Vectorized<float>(1.f) / x;
#endif
}

// float64 with AVX-512: the same estimate and two Newton steps (relative error about
// 2^-56 before rounding, plus the steps' own rounding).
inline at::vec::Vectorized<double> vec_reciprocal(const at::vec::Vectorized<double>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512d one = _mm512_set1_pd(1.0);
  __m512d r = _mm512_rcp14_pd(x);
  r = _mm512_fmadd_pd(r, _mm512_fnmadd_pd(x, r, one), r);
  return _mm512_fmadd_pd(r, _mm512_fnmadd_pd(x, r, one), r);
#else
  return at::vec::Vectorized<double>(1.0) / x;
#endif
}

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
  const Vec large_abs = one - Vec(2.f) * vec_reciprocal(vec_one_plus_exp(ax + ax));
  const Vec large = large_abs | (x & Vec(-0.f));  // copy the sign bit of x

  // NaN compares false and takes the polynomial, which keeps it NaN.
  return Vec::blendv(small, large, ax >= Vec(0.55f));
}

inline at::vec::Vectorized<double> vec_tanh(const at::vec::Vectorized<double>& x) {
  using Vec = at::vec::Vectorized<double>;
  const Vec ax = x.abs();

  const Vec x2 = x * x;
  Vec p(-2.060276537636634e-05);
  for (const double c : {8.511313685577672e-05, -0.0002346347410887237, 0.0005889360520074057,
                         -0.001455661830100716, 0.003592110378689024, -0.008863234397814355,
                         0.021869488493666944, -0.053968253967434016, 0.13333333333332714,
                         -0.3333333333333333}) {
    p = at::vec::fmadd(p, x2, Vec(c));
  }
  const Vec small = x + x * x2 * p;

  const Vec one(1.0);
  const Vec large_abs = one - Vec(2.0) * vec_reciprocal(vec_one_plus_exp(at::vec::minimum(ax + ax, Vec(40.0))));
  const Vec large = large_abs | (x & Vec(-0.0));  // copy the sign bit of x

  // NaN compares false and takes the polynomial, which keeps it NaN.
  return Vec::blendv(small, large, ax >= Vec(0.55));
}

// Loads and stores one vector of the opmath type T from scalar_t memory: directly for
// float32 and float64; half and bfloat16 (whose opmath type is float) through ATen's
// vector conversions, rounding to nearest even as their scalar conversions do. Their
// cell math thus runs on vectors too (the scalar path cost bfloat16 ~2x against nn.LSTM
// at B=64 H=256, and converting element by element through a buffer ~15% of a forward).
template <typename T, typename scalar_t>
struct VecLane {
  using Vec = at::vec::Vectorized<T>;
  static Vec load(const scalar_t* p) {
    if constexpr (std::is_same_v<T, scalar_t>) {
      return Vec::loadu(p);
    } else {
      Vec v;
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        at::vec::load_fp32_from_bf16(p, v);
      } else {
        static_assert(std::is_same_v<scalar_t, at::Half>);
        at::vec::load_fp32_from_fp16(p, v);
      }
      return v;
    }
  }
  static void store(scalar_t* p, const Vec& v) {
    if constexpr (std::is_same_v<T, scalar_t>) {
      v.store(p);
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      at::vec::convert_float_bfloat16(v, v).store(p, Vec::size());  // the low half holds v
    } else {
      at::vec::convert_float_half(v, v).store(p, Vec::size());
    }
  }
};

}  // namespace lstm_ext
