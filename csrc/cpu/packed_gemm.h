// Float32 GEMM against a weight packed once per op call, for the small-m GEMMs of
// the time loop. There BLAS re-packs the same weight at every step (its copies cost
// ~10% at small shapes) and its kernels are tuned for large m; here the weight is
// packed before the loop into column panels that the microkernel streams
// contiguously, and each step only runs the microkernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <utility>

#include "../lstm_layer.h"

namespace lstm_ext {

// op(W) as panels of kPanel columns, each k-major (row p of a panel holds op(W)[p, j0:j0+kPanel]),
// the last one zero-padded so that the microkernel never needs a column tail.
class PackedWeight {
 public:
  static constexpr int64_t kPanel = 16;  // two AVX2 vectors of floats

  explicit PackedWeight(const WeightOperand<float>& w)
      : k_(w.k()), n_(w.n()), num_panels_((n_ + kPanel - 1) / kPanel),
        panels_(at::empty({num_panels_ * kPanel * k_}, at::kFloat)) {
    // op(W)[p, j] = w.data[p * sk + j * sn]
    const int64_t sk = w.transposed ? 1 : w.cols, sn = w.transposed ? w.cols : 1;
    float* out = panels_.data_ptr<float>();
    at::parallel_for(0, num_panels_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t panel = begin; panel < end; ++panel) {
        float* dst = out + panel * kPanel * k_;
        const int64_t j0 = panel * kPanel, cols = std::min(kPanel, n_ - j0);
        for (int64_t p = 0; p < k_; ++p, dst += kPanel) {
          for (int64_t jj = 0; jj < cols; ++jj) dst[jj] = w.data[p * sk + (j0 + jj) * sn];
          std::fill(dst + cols, dst + kPanel, 0.f);
        }
      }
    });
  }

  int64_t k() const { return k_; }
  int64_t n() const { return n_; }
  int64_t num_panels() const { return num_panels_; }
  const float* panel(int64_t i) const { return panels_.data_ptr<float>() + i * kPanel * k_; }

 private:
  int64_t k_, n_, num_panels_;
  at::Tensor panels_;
};

namespace packed_gemm_detail {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kPanel = PackedWeight::kPanel;
constexpr int kMaxRows = 6;  // 6 x 2 accumulators + 2 panel vectors + 1 broadcast of 16 ymm registers

// C[0:MR, j0:j0+cols] = A[0:MR, :] panel + beta * C, for cols <= kPanel.
template <int MR>
void microkernel(int64_t k, const float* a, int64_t lda, const float* b, bool accumulate, float* c,
                 int64_t ldc, int64_t cols) {
  // C rows are usually cold (the input projection wrote them long before): start
  // fetching them now rather than stalling on them after the k loop.
#pragma GCC unroll kMaxRows
  for (int r = 0; r < MR; ++r) __builtin_prefetch(c + r * ldc);
  // Every loop over r is unrolled so that acc lives in registers, not on the stack.
  Vec acc[MR][2];
#pragma GCC unroll kMaxRows
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = Vec(0.f);
  for (int64_t p = 0; p < k; ++p) {
    const Vec b0 = Vec::loadu(b + p * kPanel), b1 = Vec::loadu(b + p * kPanel + Vec::size());
#pragma GCC unroll kMaxRows
    for (int r = 0; r < MR; ++r) {
      const Vec ar(a[r * lda + p]);
      acc[r][0] = at::vec::fmadd(ar, b0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(ar, b1, acc[r][1]);
    }
  }
#pragma GCC unroll kMaxRows
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    if (cols == kPanel) {
      if (accumulate) {
        acc[r][0] += Vec::loadu(cr);
        acc[r][1] += Vec::loadu(cr + Vec::size());
      }
      acc[r][0].store(cr);
      acc[r][1].store(cr + Vec::size());
    } else {  // last, partial panel
      float tmp[kPanel];
      acc[r][0].store(tmp);
      acc[r][1].store(tmp + Vec::size());
      for (int64_t j = 0; j < cols; ++j) cr[j] = tmp[j] + (accumulate ? cr[j] : 0.f);
    }
  }
}

template <int... MR>
constexpr auto make_kernels(std::integer_sequence<int, MR...>) {
  return std::array{&microkernel<MR + 1>...};
}
// kernels[r - 1] handles r rows.
constexpr auto kernels = make_kernels(std::make_integer_sequence<int, kMaxRows>{});

}  // namespace packed_gemm_detail

// Row-major C (m x n) = A (m x k) op(W) + beta * C, beta 0 or 1.
inline void packed_gemm(int64_t m, const float* a, int64_t lda, const PackedWeight& w, float beta, float* c,
                        int64_t ldc) {
  using namespace packed_gemm_detail;
  // Rows go in chunks of about 256 KiB of A, which stay in L2 while every panel passes
  // over them; the GEMMs of one step are a single chunk.
  constexpr int64_t kChunkFloats = 64 * 1024;
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkFloats / std::max<int64_t>(1, w.k()) / kMaxRows) * kMaxRows;
  for (int64_t i0 = 0; i0 < m; i0 += chunk_rows) {
    const int64_t mc = std::min(chunk_rows, m - i0);
    const float* a_chunk = a + i0 * lda;
    float* c_chunk = c + i0 * ldc;
    // Waking another thread costs microseconds: each one gets at least ~1 Mflop.
    const int64_t grain = std::max<int64_t>(1, 1000000 / std::max<int64_t>(1, 2 * mc * w.k() * kPanel));
    const int64_t row_blocks = (mc + kMaxRows - 1) / kMaxRows;
    at::parallel_for(0, w.num_panels(), grain, [&](int64_t begin, int64_t end) {
      for (int64_t panel = begin; panel < end; ++panel) {
        const int64_t j0 = panel * kPanel, cols = std::min(kPanel, w.n() - j0);
        // The panel stays in cache while every block of rows runs over it. Blocks of
        // near-equal rows: with fewer than 4 rows (8 accumulators) the FMA latency,
        // not their throughput, bounds the microkernel.
        for (int64_t block = 0, i = 0; block < row_blocks; ++block) {
          const int64_t rows = (mc - i) / (row_blocks - block);
          kernels[rows - 1](w.k(), a_chunk + i * lda, lda, w.panel(panel), beta != 0, c_chunk + i * ldc + j0,
                            ldc, cols);
          i += rows;
        }
      }
    });
  }
}

}  // namespace lstm_ext
