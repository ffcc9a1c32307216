// GEMM against a weight packed once per op call, for the GEMMs of the time loop and the
// input projection. BLAS re-packs the same weight at every step (its copies cost ~10% at
// small shapes) and its kernels are tuned for large m; here the weight is packed before
// the loop into column panels that the microkernel streams contiguously, and each step
// only runs the microkernel. Float32, float64 and half (on the float32 kernel, below)
// everywhere; bfloat16 on AVX-512 BF16's vdpbf16ps (the products of pairs of bfloat16,
// summed in float32) where the AVX-512 kernels run on an AMD CPU that has it, on the float32
// kernel elsewhere (bf16_kernel says why; without AVX-512 ATen's bfloat16 GEMM has no
// oneDNN kernels, and ran at 2 GFLOP/s here without them). On an AMD EPYC Zen 4 the
// vdpbf16ps microkernel ran m=64 n=1024 k=256 at 417 GFLOP/s on 2 threads (a zmm
// vdpbf16ps per cycle and core is 64 flops), where torch's bfloat16 addmm (oneDNN) ran the
// same per-step GEMMs at 163 in an LSTM's time loop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <utility>

#include "../backend_api.h"
#include "cpu_features.h"
#include "vec_math.h"

namespace lstm_ext {

// Every dtype the backend runs (float32, float64, half, bfloat16) has a microkernel on every
// CPU. Whether this compilation has a kernel for scalar_t's own panels: float32, float64,
// and bfloat16 (vdpbf16ps) in the AVX-512 one; the others run converted_kernels.
template <typename scalar_t>
constexpr bool kHasNativeKernel = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>
#if defined(CPU_CAPABILITY_AVX512)
                                  || std::is_same_v<scalar_t, at::BFloat16>
#endif
    ;

// Which kernel bfloat16's microkernel GEMMs run: vdpbf16ps (microkernel_bf16) or the
// float32 one, converted; and why, for gemm_choices' report. vdpbf16ps only in the AVX-512
// kernels, on a CPU with AVX-512 BF16, and by default not on Intel's: on the Intel Xeon
// (family 6 model 207) a zmm vdpbf16ps issued once per 1.5-1.9 TSC ticks where an FMA
// issued every 0.38 (16 independent chains of each), 40-50% of the multiply-adds per cycle
// of the float32 kernel's FMAs. With every GEMM on the microkernel a bfloat16 LSTM (B=64
// T=50 H=256 L=2) ran its no_grad forward in 45 ms with it, 26-28 ms on the float32
// kernel; fwd+bwd 101 against 68-76 ms. On the AMD EPYC Zen 4, whose FMAs are 256 bits
// wide, the vdpbf16ps kernel ran m=64 n=1024 k=256 at 417 GFLOP/s on 2 threads, beyond
// the float32 FMA peak. LSTM_EXT_GEMM_BF16_DOT=1 runs it wherever it can run, =0 nowhere.
struct Bf16Kernel {
  bool dot;
  const char* why;
};
inline const Bf16Kernel& bf16_kernel() {
  static const Bf16Kernel kernel = []() -> Bf16Kernel {
    const char* v = std::getenv("LSTM_EXT_GEMM_BF16_DOT");
    const std::string_view forced = v == nullptr ? "" : v;
    TORCH_CHECK(forced.empty() || forced == "0" || forced == "1",
                "lstm_ext: LSTM_EXT_GEMM_BF16_DOT must be 0 or 1, but got '", forced, "'");
#if defined(CPU_CAPABILITY_AVX512)
    if (!cpu_has_avx512_bf16()) return {false, "no AVX-512 BF16"};
    if (!forced.empty()) return {forced == "1", "LSTM_EXT_GEMM_BF16_DOT"};
    return cpu_is_intel() ? Bf16Kernel{false, "default: Intel CPU"} : Bf16Kernel{true, "default: not an Intel CPU"};
#else
    return {false, "not the AVX-512 kernels"};
#endif
  }();
  return kernel;
}

// Whether scalar_t's GEMMs run on the float32 microkernel, converted (microkernel_converted):
// half always, bfloat16 where it does not run vdpbf16ps (bf16_kernel).
template <typename scalar_t>
bool converts_to_float() {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return !bf16_kernel().dot;
  } else {
    return !kHasNativeKernel<scalar_t>;
  }
}

// op(W) as panels of kPanel columns, the last one zero-padded so that the microkernel
// never needs a column tail. A panel is k-major in groups of depth rows: element (p, j) of
// op(W)'s panel lies at (p / depth) kPanel depth + j depth + p % depth, so that one vector
// load gets depth consecutive p of each of its columns (depth 2: bfloat16's pairs for
// vdpbf16ps; k is zero-padded to a multiple of depth). Where the dtype converts to float32
// (converts_to_float) the panels are float32, converted once here rather than at every step.
template <typename scalar_t>
class PackedWeight {
 public:
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int64_t kPanel = 2 * at::vec::Vectorized<acc_t>::size();  // two vectors of accumulators

  explicit PackedWeight(const WeightOperand<scalar_t>& w)
      : converted_(converts_to_float<scalar_t>()), k_(w.k()), n_(w.n()), num_panels_((n_ + kPanel - 1) / kPanel) {
    if (converted_) {
      pack<float, 1>(w);
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      pack<scalar_t, 2>(w);
    } else {
      pack<scalar_t, 1>(w);
    }
  }

  bool converted() const { return converted_; }
  int64_t k() const { return k_; }
  int64_t n() const { return n_; }
  int64_t num_panels() const { return num_panels_; }
  // Panel i, of float (converted()) or scalar_t.
  template <typename T>
  const T* panel(int64_t i) const {
    return panels_.data_ptr<T>() + i * panel_size_;
  }

 private:
  // Depth as a constant: the index arithmetic below runs once per element.
  template <typename T, int64_t Depth>
  void pack(const WeightOperand<scalar_t>& w) {
    panel_size_ = kPanel * ((k_ + Depth - 1) / Depth * Depth);
    panels_ = at::empty({num_panels_ * panel_size_}, c10::CppTypeToScalarType<T>::value);
    T* out = panels_.data_ptr<T>();
    // A small weight packs faster than another thread wakes up: ~64K elements each.
    const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, panel_size_));
    at::parallel_for(0, num_panels_, grain, [&](int64_t begin, int64_t end) {
      for (int64_t panel = begin; panel < end; ++panel) {
        T* dst = out + panel * panel_size_;
        const int64_t j0 = panel * kPanel, cols = std::min(kPanel, n_ - j0);
        auto element = [dst](int64_t p, int64_t jj) -> T& {
          return dst[(p / Depth) * kPanel * Depth + jj * Depth + p % Depth];
        };
        std::fill(dst, dst + panel_size_, T(0));  // the padding: columns past n, k past k()
        // Each loop reads W's rows contiguously. (A loop over op(W)'s elements with a branch
        // for the padding took 8% of the samples of a B=8 T=50 H=64 L=2 inference.)
        if (w.transposed) {  // op(W)[p, j] = W[j, p]
          for (int64_t jj = 0; jj < cols; ++jj) {
            const scalar_t* row = w.data + (j0 + jj) * w.cols;
            for (int64_t p = 0; p < k_; ++p) element(p, jj) = static_cast<T>(row[p]);
          }
        } else {  // op(W)[p, j] = W[p, j]
          for (int64_t p = 0; p < k_; ++p) {
            const scalar_t* row = w.data + p * w.cols + j0;
            for (int64_t jj = 0; jj < cols; ++jj) element(p, jj) = static_cast<T>(row[jj]);
          }
        }
      }
    });
  }

  bool converted_;
  int64_t k_, n_, num_panels_, panel_size_ = 0;
  at::Tensor panels_;
};

namespace packed_gemm_detail {

// Rows per microkernel call: 2 accumulators per row + 2 panel vectors + 1 broadcast of
// 16 ymm registers, or of AVX-512's 32 zmm ones. On the Intel Xeon (one thread, hot
// operands, medians of 60 alternating samples) 12-row tiles ran m=8-64 n=512 k=128,
// m=16 n=128 k=512 and m=32 n=1024 k=256 1-10% faster than 6-row ones.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMaxRows = 12;
#else
constexpr int kMaxRows = 6;
#endif

// C[0:MR, j0:j0+cols] = out + (accumulate ? C : 0), from the MR x kPanel accumulators in out.
template <typename scalar_t, int MR>
void store_tile(const at::opmath_type<scalar_t>* out, bool accumulate, scalar_t* c, int64_t ldc, int64_t cols) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  using Lane = VecLane<acc_t, scalar_t>;
  constexpr int64_t kPanel = PackedWeight<scalar_t>::kPanel;
  for (int r = 0; r < MR; ++r) {
    scalar_t* cr = c + r * ldc;
    const acc_t* o = out + r * kPanel;
    if (cols == kPanel) {
      Vec lo = Vec::loadu(o), hi = Vec::loadu(o + Vec::size());
      if (accumulate) {
        lo = lo + Lane::load(cr);
        hi = hi + Lane::load(cr + Vec::size());
      }
      Lane::store(cr, lo);
      Lane::store(cr + Vec::size(), hi);
    } else {  // last, partial panel
      for (int64_t j = 0; j < cols; ++j) cr[j] = scalar_t(o[j] + (accumulate ? acc_t(cr[j]) : acc_t(0)));
    }
  }
}

#define LSTM_EXT_INLINE __attribute__((always_inline)) inline

// C rows are usually cold (the input projection wrote them long before): start fetching
// them at the start of a tile rather than stalling on them after the k loop.
template <typename scalar_t, int MR>
LSTM_EXT_INLINE void prefetch_tile(const scalar_t* c, int64_t ldc) {
  constexpr int64_t kPanel = PackedWeight<scalar_t>::kPanel;
#pragma GCC unroll kMaxRows
  for (int r = 0; r < MR; ++r) {
    __builtin_prefetch(c + r * ldc);
    __builtin_prefetch(c + r * ldc + kPanel - 1);  // the row's last line when the tile spans two
  }
}

// acc[r] += A[r, 0:k] panel for MR rows of float32 or float64 A. Every loop over r is
// unrolled so that acc lives in registers, not on the stack.
template <typename T, int MR>
LSTM_EXT_INLINE void accumulate_tile(int64_t k, const T* a, int64_t lda, const T* b,
                                     at::vec::Vectorized<T> (&acc)[MR][2]) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kPanel = 2 * Vec::size();
  for (int64_t p = 0; p < k; ++p) {
    const Vec b0 = Vec::loadu(b + p * kPanel), b1 = Vec::loadu(b + p * kPanel + Vec::size());
#pragma GCC unroll kMaxRows
    for (int r = 0; r < MR; ++r) {
      const Vec ar(a[r * lda + p]);
      acc[r][0] = at::vec::fmadd(ar, b0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(ar, b1, acc[r][1]);
    }
  }
}

// C[0:MR, j0:j0+cols] = acc + (accumulate ? C : 0). The accumulators leave registers once,
// here: an epilogue working on them directly (loads of C, a partial-panel branch) made GCC
// spill five of them at every step of the k loop.
template <typename scalar_t, int MR>
LSTM_EXT_INLINE void finish_tile(const at::vec::Vectorized<at::opmath_type<scalar_t>> (&acc)[MR][2],
                                 bool accumulate, scalar_t* c, int64_t ldc, int64_t cols) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kPanel = PackedWeight<scalar_t>::kPanel, kVec = kPanel / 2;
  acc_t out[MR * kPanel];
#pragma GCC unroll kMaxRows
  for (int r = 0; r < MR; ++r) {
    acc[r][0].store(out + r * kPanel);
    acc[r][1].store(out + r * kPanel + kVec);
  }
  store_tile<scalar_t, MR>(out, accumulate, c, ldc, cols);
}

// C[0:MR, j0:j0+cols] = A[0:MR, :] panel + beta * C, for cols <= kPanel; float32 and float64.
template <typename scalar_t, int MR>
void microkernel(int64_t k, const scalar_t* a, int64_t lda, const scalar_t* b, bool accumulate, scalar_t* c,
                 int64_t ldc, int64_t cols) {
  static_assert(std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>);
  using Vec = at::vec::Vectorized<scalar_t>;
  prefetch_tile<scalar_t, MR>(c, ldc);
  Vec acc[MR][2];
#pragma GCC unroll kMaxRows
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = Vec(scalar_t(0));
  accumulate_tile<scalar_t, MR>(k, a, lda, b, acc);
  finish_tile<scalar_t, MR>(acc, accumulate, c, ldc, cols);
}

// The same for half and bfloat16 (converts_to_float), on the float32 kernel: the panel is
// float32 (PackedWeight), and A goes to float32 kChunk columns at a time, into a buffer on
// the stack (12 x 64 floats) that the k loop reads as it reads float32 A. The products of
// two halves or two bfloat16 are exact in float32, so this sums what their GEMMs with
// float32 accumulation sum; C is rounded once. (ATen's half GEMM cost 24 us or more per
// call, whatever its size, on the Intel Xeon: at B=32 T=100 H=128 an LSTM's no_grad
// forward took 8.3 ms there, nn.LSTM's 6.4. Without oneDNN's kernels for a dtype, ATen's
// own GEMM loops ran 64 x 256 times 256 x 1024 at 1-2 GFLOP/s there.)
template <typename scalar_t, int MR>
void microkernel_converted(int64_t k, const scalar_t* a, int64_t lda, const float* b, bool accumulate, scalar_t* c,
                           int64_t ldc, int64_t cols) {
  static_assert(std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>);
  using Vec = at::vec::Vectorized<float>;
  using Lane = VecLane<float, scalar_t>;
  constexpr int64_t kPanel = PackedWeight<scalar_t>::kPanel, kChunk = 64;
  prefetch_tile<scalar_t, MR>(c, ldc);
  Vec acc[MR][2];
#pragma GCC unroll kMaxRows
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = Vec(0.f);
  float a_chunk[MR * kChunk];
  for (int64_t p0 = 0; p0 < k; p0 += kChunk) {
    const int64_t kc = std::min(kChunk, k - p0);
    for (int r = 0; r < MR; ++r) {
      const scalar_t* row = a + r * lda + p0;
      float* dst = a_chunk + r * kChunk;
      int64_t p = 0;
      for (; p + Vec::size() <= kc; p += Vec::size()) Lane::load(row + p).store(dst + p);
      for (; p < kc; ++p) dst[p] = float(row[p]);
    }
    accumulate_tile<float, MR>(kc, a_chunk, kChunk, b + p0 * kPanel, acc);
  }
  finish_tile<scalar_t, MR>(acc, accumulate, c, ldc, cols);
}

#if defined(CPU_CAPABILITY_AVX512)
// The AVX-512 copy's target and AVX-512 BF16, for the code that runs vdpbf16ps; only
// called where the weight is not converts_to_float (the CPU has it: bf16_kernel).
#define LSTM_EXT_TARGET_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16"), always_inline)) inline

// acc[r] += A[r, p:p+2] times the panel's pair group at b, for MR rows of A from a = &A[0, p].
// kLast: k is odd and p = k - 1, so A[r, p + 1] is not there and counts as zero.
template <int MR, bool kLast>
LSTM_EXT_TARGET_BF16 void dot_pair(at::vec::Vectorized<float> (&acc)[MR][2], const at::BFloat16* a, int64_t lda,
                                   const at::BFloat16* b) {
  constexpr int64_t kPanel = PackedWeight<at::BFloat16>::kPanel;
  const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + kPanel);
#pragma GCC unroll kMaxRows
  for (int r = 0; r < MR; ++r) {
    uint32_t pair = 0;  // A[r, p] in the low half (the lower address), A[r, p + 1] in the high one
    std::memcpy(&pair, a + r * lda, kLast ? 2 : 4);
    const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
  }
}

// microkernel for bfloat16: pairs of k at a time, summed in float32, C rounded to bfloat16 once.
template <int MR>
LSTM_EXT_TARGET_BF16 void microkernel_bf16(int64_t k, const at::BFloat16* a, int64_t lda, const at::BFloat16* b,
                                           bool accumulate, at::BFloat16* c, int64_t ldc, int64_t cols) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t kGroup = 2 * PackedWeight<at::BFloat16>::kPanel;
  prefetch_tile<at::BFloat16, MR>(c, ldc);
  Vec acc[MR][2];
#pragma GCC unroll kMaxRows
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = Vec(0.f);
  for (int64_t p = 0; p < k / 2; ++p) dot_pair<MR, false>(acc, a + 2 * p, lda, b + p * kGroup);
  if (k % 2 != 0) dot_pair<MR, true>(acc, a + k - 1, lda, b + k / 2 * kGroup);
  finish_tile<at::BFloat16, MR>(acc, accumulate, c, ldc, cols);
}
#undef LSTM_EXT_TARGET_BF16
#endif

// kernels<scalar_t>[r - 1] handles r rows on scalar_t's own panels (kHasNativeKernel),
// converted_kernels<scalar_t>[r - 1] on float32 panels (half and bfloat16).
template <typename scalar_t, int... MR>
constexpr auto make_kernels(std::integer_sequence<int, MR...>) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return std::array{&microkernel_bf16<MR + 1>...};
  } else
#endif
  {
    return std::array{&microkernel<scalar_t, MR + 1>...};
  }
}
template <typename scalar_t>
constexpr auto kernels = make_kernels<scalar_t>(std::make_integer_sequence<int, kMaxRows>{});

template <typename scalar_t, int... MR>
constexpr auto make_converted_kernels(std::integer_sequence<int, MR...>) {
  return std::array{&microkernel_converted<scalar_t, MR + 1>...};
}
template <typename scalar_t>
constexpr auto converted_kernels = make_converted_kernels<scalar_t>(std::make_integer_sequence<int, kMaxRows>{});

#undef LSTM_EXT_INLINE

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
          const scalar_t* a_rows = a_chunk + i * lda;
          scalar_t* c_rows = c_chunk + i * ldc + j0;
          if (w.converted()) {
            if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
              converted_kernels<scalar_t>[rows - 1](w.k(), a_rows, lda, w.template panel<float>(panel), beta != 0,
                                                    c_rows, ldc, cols);
            }
          } else if constexpr (kHasNativeKernel<scalar_t>) {
            kernels<scalar_t>[rows - 1](w.k(), a_rows, lda, w.template panel<scalar_t>(panel), beta != 0, c_rows,
                                        ldc, cols);
          }
          i += rows;
        }
      }
    });
  }
}

}  // namespace lstm_ext
