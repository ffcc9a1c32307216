// GEMM of a few rows against an unpacked weight: C (m x n) = A (m x k) W^T + beta * C for
// a row-major W (n x k) and m <= kMaxDotRows, as in generation (one sequence, one step
// per call). Such a GEMM reads each weight element once for m multiply-adds: its speed is
// how fast W streams in. Each output is a dot product of two contiguous rows, so W
// streams row by row, split between threads by rows. The Fortran BLAS ran these shapes
// at a fraction of that speed (an AMD EPYC Zen 4: four 2048 x 512 weights against one row
// in 1.8 ms, where summing the same 16 MB took 0.22 ms). Half and bfloat16 load as float
// and sum in float, as their GEMMs in ATen do, and round once per output: ATen's GEMM
// cost them 24 us or more per call whatever its size (an Intel Xeon with AMX).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "../backend_api.h"
#include "vec_math.h"

namespace lstm_ext {

constexpr int64_t kMaxDotRows = 4;

// The dtypes dot_gemm serves.
template <typename scalar_t>
constexpr bool kHasDotGemm = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double> ||
                             std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>;

namespace dot_gemm_detail {

// The sum of a vector's lanes: by halves in registers where the vectors are x86's (at
// K=64 summing 16 lanes one by one took longer than the dot products themselves).
template <typename scalar_t>
scalar_t lane_sum(const at::vec::Vectorized<scalar_t>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) return _mm512_reduce_add_ps(v);
  if constexpr (std::is_same_v<scalar_t, double>) return _mm512_reduce_add_pd(v);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  if constexpr (std::is_same_v<scalar_t, double>) {
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
#endif
  scalar_t lanes[at::vec::Vectorized<scalar_t>::size()];
  v.store(lanes);
  scalar_t sum = 0;
  for (scalar_t x : lanes) sum += x;
  return sum;
}

// C[0:MR, j0:j0+NR] = A[0:MR, :] W[j0:j0+NR, :]^T + (accumulate ? C : 0), summed in the
// opmath type.
template <typename scalar_t, int MR, int NR>
void dot_block(int64_t k, const scalar_t* a, int64_t lda, const scalar_t* w, int64_t ldw, bool accumulate,
               scalar_t* c, int64_t ldc) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  using Lane = VecLane<acc_t, scalar_t>;
  Vec acc[MR][NR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int q = 0; q < NR; ++q) acc[r][q] = Vec(acc_t(0));
  }
  int64_t p = 0;
  for (; p + Vec::size() <= k; p += Vec::size()) {
    Vec wq[NR];
#pragma GCC unroll 4
    for (int q = 0; q < NR; ++q) wq[q] = Lane::load(w + q * ldw + p);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const Vec ar = Lane::load(a + r * lda + p);
#pragma GCC unroll 4
      for (int q = 0; q < NR; ++q) acc[r][q] = at::vec::fmadd(ar, wq[q], acc[r][q]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int q = 0; q < NR; ++q) {
      acc_t sum = lane_sum(acc[r][q]);
      for (int64_t pp = p; pp < k; ++pp) sum += acc_t(a[r * lda + pp]) * acc_t(w[q * ldw + pp]);
      scalar_t& out = c[r * ldc + q];
      out = static_cast<scalar_t>(accumulate ? acc_t(out) + sum : sum);
    }
  }
}

// Columns [j0, j1) of C for MR rows: NR weight rows at a time, then one by one. With
// MR <= 2, four weight rows keep 8 accumulators busy (enough to hide the FMA latency);
// with more rows, two do (and stay within AVX2's 16 registers).
template <typename scalar_t, int MR>
void dot_columns(int64_t k, const scalar_t* a, int64_t lda, const scalar_t* w, int64_t ldw, bool accumulate,
                 scalar_t* c, int64_t ldc, int64_t j0, int64_t j1) {
  constexpr int NR = MR <= 2 ? 4 : 2;
  int64_t j = j0;
  for (; j + NR <= j1; j += NR) dot_block<scalar_t, MR, NR>(k, a, lda, w + j * ldw, ldw, accumulate, c + j, ldc);
  for (; j < j1; ++j) dot_block<scalar_t, MR, 1>(k, a, lda, w + j * ldw, ldw, accumulate, c + j, ldc);
}

}  // namespace dot_gemm_detail

// C (m x n) = A (m x k) W^T + beta * C, beta 0 or 1, W row-major (n x k), 1 <= m <= kMaxDotRows.
template <typename scalar_t>
void dot_gemm(int64_t m, const scalar_t* a, int64_t lda, const WeightOperand<scalar_t>& w, float beta, scalar_t* c,
              int64_t ldc) {
  using namespace dot_gemm_detail;
  TORCH_INTERNAL_ASSERT(w.transposed && m >= 1 && m <= kMaxDotRows);
  const int64_t n = w.n(), k = w.k();
  // Each thread streams at least ~64 KiB of W: less is faster done than another thread woken.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, k * int64_t(sizeof(scalar_t))));
  at::parallel_for(0, n, grain, [&](int64_t j0, int64_t j1) {
    switch (m) {
      case 1: return dot_columns<scalar_t, 1>(k, a, lda, w.data, w.cols, beta != 0, c, ldc, j0, j1);
      case 2: return dot_columns<scalar_t, 2>(k, a, lda, w.data, w.cols, beta != 0, c, ldc, j0, j1);
      case 3: return dot_columns<scalar_t, 3>(k, a, lda, w.data, w.cols, beta != 0, c, ldc, j0, j1);
      default: return dot_columns<scalar_t, 4>(k, a, lda, w.data, w.cols, beta != 0, c, ldc, j0, j1);
    }
  });
}

}  // namespace lstm_ext
