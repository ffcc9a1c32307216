// CPU backend: the float32/float64 GEMMs of multi-step calls (input projection, per-step
// GEMMs, dx) run on weights packed once per call, by packed_gemm's microkernel or MKL's
// packed GEMM, whichever gemm_select.h picked for the shape; the other GEMMs call the
// BLAS that torch itself links (MKL or OpenBLAS export the Fortran sgemm_/dgemm_), so a
// step costs no dispatcher round trip and no allocation. The pointwise cell kernels are
// vectorized and run parallel over blocks of the batch x hidden elements.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../cell_math.h"
#include "../lstm_layer.h"
#include "gemm_select.h"
#include "packed_gemm.h"
#include "vec_math.h"

#include <optional>

// Weak: a torch built without a Fortran BLAS leaves these null and we use ATen instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace lstm_ext {

// Vector lanes run the shared gate math through vec_math.h; the scalar tail and
// half/bfloat16 use the plain path.
template <typename T>
struct Math<at::vec::Vectorized<T>> {
  static at::vec::Vectorized<T> exp(const at::vec::Vectorized<T>& x) { return vec_exp(x); }
  static at::vec::Vectorized<T> tanh(const at::vec::Vectorized<T>& x) { return vec_tanh(x); }
};

namespace {

// Column-major BLAS call; false when this scalar type has no Fortran BLAS here.
template <typename scalar_t, typename Fn>
bool fortran_gemm(Fn* fn, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const scalar_t* a,
                  int64_t lda, const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
  if (fn == nullptr) return false;
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = m, ni = n, ki = k, ldai = lda, ldbi = ldb, ldci = ldc;
  const scalar_t one = 1;
  fn(&ta, &tb, &mi, &ni, &ki, &one, a, &ldai, b, &ldbi, &beta, c, &ldci);
  return true;
}

inline bool column_major_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                              const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  return fortran_gemm(sgemm_, ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
}
inline bool column_major_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda,
                              const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  return fortran_gemm(dgemm_, ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
}
template <typename scalar_t>
bool column_major_gemm(bool, bool, int64_t, int64_t, int64_t, const scalar_t*, int64_t, const scalar_t*,
                       int64_t, float, scalar_t*, int64_t) {
  return false;
}

// Row-major C (m x n) = A (m x k) op(W) + beta * C through ATen, on raw CPU pointers, for
// the dtypes no BLAS here serves. Each call wraps the pointers in tensor views.
template <typename scalar_t>
void aten_gemm(int64_t m, const scalar_t* a, int64_t lda, const WeightOperand<scalar_t>& w, float beta, scalar_t* c,
               int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {ld, 1}, opts);
  };
  const at::Tensor weight = view(w.data, w.rows, w.cols, w.cols);
  at::Tensor out = view(c, m, w.n(), ldc);
  at::addmm_out(out, out, view(a, m, w.k(), lda), w.transposed ? weight.t() : weight, beta, 1);
}

template <typename scalar_t>
constexpr bool kVectorized = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

// Calls fn(row, j_begin, j_end) over blocks of the rows x H elements, in parallel once
// there is enough work to pay for waking the other threads (about 2048 elements each:
// at H=128, B=50 a serial pointwise step left the second thread idle half the time).
template <typename Fn>
void for_each_block(int64_t rows, int64_t H, const Fn& fn) {
  constexpr int64_t kBlock = 256;
  const int64_t blocks_per_row = (H + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::min(H, kBlock));
  at::parallel_for(0, rows * blocks_per_row, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / blocks_per_row, j0 = (i % blocks_per_row) * kBlock;
      fn(b, j0, std::min(H, j0 + kBlock));
    }
  });
}

template <typename T, typename scalar_t>
void cell_forward_at(scalar_t* g, const scalar_t* bias, const scalar_t* c_prev, scalar_t* c_out, scalar_t* h_out,
                     int64_t H, int64_t j) {
  auto load = [&](const scalar_t* p) { return T::loadu(p + j); };
  auto pre = [&](int64_t k) { return load(g + k) + load(bias + k); };
  const auto r = cell_forward<T>(pre(0), pre(H), pre(2 * H), pre(3 * H), load(c_prev));
  r.i.store(g + j);
  r.f.store(g + H + j);
  r.g.store(g + 2 * H + j);
  r.o.store(g + 3 * H + j);
  r.c.store(c_out + j);
  r.h.store(h_out + j);
}

// A weight operand, with its packed copy for the implementation that will serve it: MKL
// (float32 only, for mkl->rows() rows) or the microkernel.
template <typename scalar_t>
struct CpuWeight {
  WeightOperand<scalar_t> operand;
  std::optional<PackedWeight<scalar_t>> packed;
  std::optional<MklPackedWeight> mkl;
};

// Packing reads and writes the whole weight once: worth it only when the packed copy
// serves enough steps (not for one-step calls such as generation).
constexpr int64_t kMinStepsToPack = 8;

struct CpuBackend {
  // Float32 and float64 weights are packed; half and bfloat16 keep the ATen path.
  template <typename scalar_t>
  static CpuWeight<scalar_t> prepare(const WeightOperand<scalar_t>& w, const GemmUse& use) {
    CpuWeight<scalar_t> prepared{w, std::nullopt, std::nullopt};
    if constexpr (kVectorized<scalar_t>) {
      if (use.steps < kMinStepsToPack || w.rows == 0) return prepared;
      if (select_gemm(w, use) == GemmImpl::kMicrokernel) {
        prepared.packed.emplace(w);
      } else if constexpr (std::is_same_v<scalar_t, float>) {
        prepared.mkl.emplace(w, use.rows);
      }
    }
    return prepared;
  }

  template <typename scalar_t>
  static void gemm(int64_t m, const scalar_t* a, int64_t lda, const CpuWeight<scalar_t>& w, float beta,
                   scalar_t* c, int64_t ldc) {
    if constexpr (kVectorized<scalar_t>) {
      if (w.packed) return packed_gemm(m, a, lda, *w.packed, beta, c, ldc);
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (w.mkl && m == w.mkl->rows()) return w.mkl->compute(a, lda, beta, c, ldc);
    }
    gemm(m, a, lda, w.operand, beta, c, ldc);
  }

  template <typename scalar_t>
  static void gemm(int64_t m, const scalar_t* a, int64_t lda, const WeightOperand<scalar_t>& op, float beta,
                   scalar_t* c, int64_t ldc) {
    if (m == 0 || op.n() == 0) return;
    // Row-major C = A op(W) is column-major C^T = op(W)^T A^T, and the row-major W read
    // column-major is W^T.
    if (op.k() > 0 &&
        column_major_gemm(op.transposed, false, op.n(), m, op.k(), op.data, op.cols, a, lda, beta, c, ldc)) {
      return;
    }
    // Half, bfloat16, or no Fortran BLAS in this torch: let ATen do it.
    aten_gemm(m, a, lda, op, beta, c, ldc);
  }

  // dg^T a. Float64 runs as (a^T dg)^T: MKL's dgemm is 1.1-1.6x faster in that
  // orientation here (float32: no difference).
  static at::Tensor weight_grad(const at::Tensor& dg, const at::Tensor& a) {
    if (dg.scalar_type() == at::kDouble) return at::mm(a.t(), dg).t().contiguous();
    return at::mm(dg.t(), a);
  }

  template <typename scalar_t>
  static void cell_forward(const ForwardStep<scalar_t>& s) {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const int64_t H = s.hidden;
    for_each_block(s.rows, H, [&](int64_t b, int64_t j0, int64_t j1) {
      scalar_t* g = s.gates + b * 4 * H;
      const scalar_t* c_prev = (b < s.n_carry ? s.c_carry : s.c0) + b * H;
      scalar_t* c_out = s.c_out + b * H;
      scalar_t* h_out = s.h_out + b * H;
      int64_t j = j0;
      if constexpr (kVectorized<scalar_t>) {
        for (; j + Vec::size() <= j1; j += Vec::size()) cell_forward_at<Vec>(g, s.bias, c_prev, c_out, h_out, H, j);
      }
      for (; j < j1; ++j) {
        auto pre = [&](int64_t k) { return acc_t(g[k + j]) + acc_t(s.bias[k + j]); };
        const auto r = lstm_ext::cell_forward<acc_t>(pre(0), pre(H), pre(2 * H), pre(3 * H), c_prev[j]);
        g[j] = r.i;
        g[H + j] = r.f;
        g[2 * H + j] = r.g;
        g[3 * H + j] = r.o;
        c_out[j] = r.c;
        h_out[j] = r.h;
      }
    });
  }

  template <typename scalar_t>
  static void cell_backward(const BackwardStep<scalar_t>& s) {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const int64_t H = s.hidden;
    for_each_block(s.rows, H, [&](int64_t b, int64_t j0, int64_t j1) {
      const scalar_t* g = s.gates + b * 4 * H;
      const scalar_t* c_prev = (b < s.n_carry ? s.c_carry : s.c0) + b * H;
      const scalar_t* c = s.c + b * H;
      const scalar_t* dh = s.dh + b * H;
      scalar_t* dc = s.dc + b * H;
      scalar_t* dg = s.d_gates + b * 4 * H;
      int64_t j = j0;
      if constexpr (kVectorized<scalar_t>) {
        for (; j + Vec::size() <= j1; j += Vec::size()) {
          auto load = [&](const scalar_t* p) { return Vec::loadu(p + j); };
          const auto r = lstm_ext::cell_backward<Vec>(load(g), load(g + H), load(g + 2 * H), load(g + 3 * H),
                                                      load(c), load(c_prev), load(dh), load(dc));
          r.d_i.store(dg + j);
          r.d_f.store(dg + H + j);
          r.d_g.store(dg + 2 * H + j);
          r.d_o.store(dg + 3 * H + j);
          r.dc_prev.store(dc + j);
        }
      }
      for (; j < j1; ++j) {
        const auto r = lstm_ext::cell_backward<acc_t>(g[j], g[H + j], g[2 * H + j], g[3 * H + j], c[j],
                                                      c_prev[j], dh[j], dc[j]);
        dg[j] = r.d_i;
        dg[H + j] = r.d_f;
        dg[2 * H + j] = r.d_g;
        dg[3 * H + j] = r.d_o;
        dc[j] = r.dc_prev;
      }
    });
  }
};

}  // namespace

// This file's CPU kernels, for cpu/dispatch.cpp: kernels_*.cpp compile it once per
// instruction set, each inside its own namespace, and dispatch.cpp registers one.
void register_cpu_kernels(torch::Library& m) {
  m.impl("lstm_forward", &lstm_forward<CpuBackend>);
  m.impl("lstm_inference", &lstm_inference<CpuBackend>);
  m.impl("lstm_backward", &lstm_backward<CpuBackend>);
}

}  // namespace lstm_ext
