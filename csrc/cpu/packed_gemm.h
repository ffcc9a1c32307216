// Float32/float64 GEMM against a weight packed once per op call, for the GEMMs of the
// time loop and the input projection. BLAS re-packs the same weight at every step (its
// copies cost ~10% at small shapes) and its kernels are tuned for large m; here the
// weight is packed before the loop into column panels that the microkernel streams
// contiguously, and each step only runs the microkernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <utility>

#include "../backend_api.h"

namespace lstm_ext {

// op(W) as panels of kPanel columns, each k-major (row p of a panel holds op(W)[p, j0:j0+kPanel]),
// the last one zero-padded so that the microkernel never needs a column tail.
template <typename scalar_t>
class PackedWeight {
 public:
  static constexpr int64_t kPanel = 2 * at::vec::Vectorized<scalar_t>::size();  // two vectors

  explicit PackedWeight(const WeightOperand<scalar_t>& w)
      : k_(w.k()), n_(w.n()), num_panels_((n_ + kPanel - 1) / kPanel),
        panels_(at::empty({num_panels_ * kPanel * k_}, c10::CppTypeToScalarType<scalar_t>::value)) {
    // op(W)[p, j] = w.data[p * sk + j * sn]
    const int64_t sk = w.transposed ? 1 : w.cols, sn = w.transposed ? w.cols : 1;
    scalar_t* out = panels_.data_ptr<scalar_t>();
    // A small weight packs faster than another thread wakes up: ~64K elements each.
    const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, kPanel * k_));
    at::parallel_for(0, num_panels_, grain, [&](int64_t begin, int64_t end) {
      for (int64_t panel = begin; panel < end; ++panel) {
        scalar_t* dst = out + panel * kPanel * k_;
        const int64_t j0 = panel * kPanel, cols = std::min(kPanel, n_ - j0);
        for (int64_t p = 0; p < k_; ++p, dst += kPanel) {
          for (int64_t jj = 0; jj < cols; ++jj) dst[jj] = w.data[p * sk + (j0 + jj) * sn];
          std::fill(dst + cols, dst + kPanel, scalar_t(0));
        }
      }
    });
  }

  int64_t k() const { return k_; }
  int64_t n() const { return n_; }
  int64_t num_panels() const { return num_panels_; }
  const scalar_t* panel(int64_t i) const { return panels_.data_ptr<scalar_t>() + i * kPanel * k_; }

 private:
  int64_t k_, n_, num_panels_;
  at::Tensor panels_;
};

namespace packed_gemm_detail {

constexpr int kMaxRows = 6;  // 6 x 2 accumulators + 2 panel vectors + 1 broadcast of 16 ymm registers

// C[0:MR, j0:j0+cols] = A[0:MR, :] panel + beta * C, for cols <= kPanel.
template <typename scalar_t, int MR>
void microkernel(int64_t k, const scalar_t* a, int64_t lda, const scalar_t* b, bool accumulate, scalar_t* c,
                 int64_t ldc, int64_t cols) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kPanel = PackedWeight<scalar_t>::kPanel;
  // C rows are usually cold (the input projection wrote them long before): start
  // fetching them now rather than stalling on them after the k loop.
#pragma GCC unroll kMaxRows
  for (int r = 0; r < MR; ++r) __builtin_prefetch(c + r * ldc);
  // Every loop over r is unrolled so that acc lives in registers, not on the stack.
  Vec acc[MR][2];
#pragma GCC unroll kMaxRows
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = Vec(scalar_t(0));
  for (int64_t p = 0; p < k; ++p) {
    const Vec b0 = Vec::loadu(b + p * kPanel), b1 = Vec::loadu(b + p * kPanel + Vec::size());
#pragma GCC unroll kMaxRows
    for (int r = 0; r < MR; ++r) {
      const Vec ar(a[r * lda + p]);
      acc[r][0] = at::vec::fmadd(ar, b0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(ar, b1, acc[r][1]);
    }
  }
  // The accumulators leave registers once, here: an epilogue working on them directly
  // (loads of C, a partial-panel branch) made GCC spill five of them at every step of
  // the k loop.
  scalar_t out[MR * kPanel];
#pragma GCC unroll kMaxRows
  for (int r = 0; r < MR; ++r) {
    acc[r][0].store(out + r * kPanel);
    acc[r][1].store(out + r * kPanel + Vec::size());
  }
  for (int r = 0; r < MR; ++r) {
    scalar_t* cr = c + r * ldc;
    const scalar_t* o = out + r * kPanel;
    if (cols == kPanel) {
      Vec lo = Vec::loadu(o), hi = Vec::loadu(o + Vec::size());
      if (accumulate) {
        lo = lo + Vec::loadu(cr);
        hi = hi + Vec::loadu(cr + Vec::size());
      }
      lo.store(cr);
      hi.store(cr + Vec::size());
    } else {  // last, partial panel
      for (int64_t j = 0; j < cols; ++j) cr[j] = o[j] + (accumulate ? cr[j] : scalar_t(0));
    }
  }
}

template <typename scalar_t, int... MR>
constexpr auto make_kernels(std::integer_sequence<int, MR...>) {
  return std::array{&microkernel<scalar_t, MR + 1>...};
}
// kernels<scalar_t>[r - 1] handles r rows.
template <typename scalar_t>
constexpr auto kernels = make_kernels<scalar_t>(std::make_integer_sequence<int, kMaxRows>{});

}  // namespace packed_gemm_detail

// Row-major C (m x n) = A (m x k) op(W) + beta * C, beta 0 or 1.
template <typename scalar_t>
void packed_gemm(int64_t m, const scalar_t* a, int64_t lda, const PackedWeight<scalar_t>& w, float beta,
                 scalar_t* c, int64_t ldc) {
  using namespace packed_gemm_detail;
  constexpr int64_t kPanel = PackedWeight<scalar_t>::kPanel;
  // Rows go in chunks of about 256 KiB of A, which stay in L2 while every panel passes
  // over them; the GEMMs of one step are a single chunk.
  constexpr int64_t kChunkElements = 256 * 1024 / sizeof(scalar_t);
  const int64_t chunk_rows =
      std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, w.k()) / kMaxRows) * kMaxRows;
  for (int64_t i0 = 0; i0 < m; i0 += chunk_rows) {
    const int64_t mc = std::min(chunk_rows, m - i0);
    const scalar_t* a_chunk = a + i0 * lda;
    scalar_t* c_chunk = c + i0 * ldc;
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
          kernels<scalar_t>[rows - 1](w.k(), a_chunk + i * lda, lda, w.panel(panel), beta != 0,
                                      c_chunk + i * ldc + j0, ldc, cols);
          i += rows;
        }
      }
    });
  }
}

}  // namespace lstm_ext
