// CPU backend: the GEMMs of multi-step calls (input projection, per-step GEMMs, dx) run
// on weights packed once per call, by packed_gemm's microkernel, MKL's packed GEMM
// (float32) or oneDNN's batch-reduce GEMM (bfloat16), or on the weight as it is by
// the BLAS (float64) or ATen's GEMM (bfloat16, half), whichever gemm_select.h picked for
// the shape. The other GEMMs run as row dot products where they have one to four rows
// (dot_gemm.h: generation, every dtype), else call the BLAS that torch itself links (MKL
// or OpenBLAS export the Fortran sgemm_/dgemm_), so a step costs no dispatcher round trip
// and no allocation; half and bfloat16 call ATen's GEMM there. Weight gradients:
// gemm_select.h.
// The pointwise kernels run any Cell (cells.h), vectorized, in parallel over blocks of
// the batch x hidden elements.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../cells.h"
#include "../layer_ops.h"
#include "dot_gemm.h"
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

// Vector lanes run the shared cell math through vec_math.h; the scalar tail uses the
// plain path.
template <typename T>
struct Math<at::vec::Vectorized<T>> {
  using Vec = at::vec::Vectorized<T>;
  static Vec one_plus_exp(const Vec& x) { return vec_one_plus_exp(x); }
  static Vec tanh(const Vec& x) { return vec_tanh(x); }
  static Vec reciprocal(const Vec& x) { return vec_reciprocal(x); }
  static Vec relu(const Vec& x) { return at::vec::clamp_min(x, Vec(0)); }  // max keeps NaN
  static Vec where_positive(const Vec& y, const Vec& v) { return Vec::blendv(Vec(0), v, y > Vec(0)); }
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
// beta is float as in the template below: with a double beta, a float argument would make
// the template the better match, and float64 would never reach dgemm_.
inline bool column_major_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda,
                              const double* b, int64_t ldb, float beta, double* c, int64_t ldc) {
  return fortran_gemm(dgemm_, ta, tb, m, n, k, a, lda, b, ldb, static_cast<double>(beta), c, ldc);
}
template <typename scalar_t>
bool column_major_gemm(bool, bool, int64_t, int64_t, int64_t, const scalar_t*, int64_t, const scalar_t*,
                       int64_t, float, scalar_t*, int64_t) {
  return false;
}

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

// A weight operand, with its packed copy for the implementation that will serve it: MKL
// (float32 only, for mkl->rows() rows) or the microkernel; or marked for ATen's GEMM.
template <typename scalar_t>
struct CpuWeight {
  WeightOperand<scalar_t> operand;
  std::optional<PackedWeight<scalar_t>> packed;
  std::optional<MklPackedWeight> mkl;
#ifdef LSTM_EXT_BRGEMM
  std::optional<BrgemmPackedWeight> brgemm;  // bfloat16 only
#endif
  bool aten = false;
};

// Packing reads and writes the whole weight once: worth it only when the packed copy
// serves enough steps (not for one-step calls such as generation).
constexpr int64_t kMinStepsToPack = 8;

struct CpuBackend {
  struct DeviceGuard {
    explicit DeviceGuard(c10::Device) {}
  };

  // Packed for the microkernel, MKL or the batch-reduce GEMM, as gemm_select.h chooses
  // (the BLAS and ATen's GEMM keep the weight as it is).
  template <typename scalar_t>
  static CpuWeight<scalar_t> prepare(const WeightOperand<scalar_t>& w, const GemmUse& use) {
    CpuWeight<scalar_t> prepared{w};
    if (use.steps < kMinStepsToPack || w.rows == 0) return prepared;
    const GemmImpl impl = select_gemm(w, use);
    if (impl == GemmImpl::kMicrokernel) prepared.packed.emplace(w);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (impl == GemmImpl::kMkl) prepared.mkl.emplace(w, use.rows);
    }
#ifdef LSTM_EXT_BRGEMM
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (impl == GemmImpl::kBrgemm) prepared.brgemm.emplace(w, use.rows, use.gates);
    }
#endif
    prepared.aten = impl == GemmImpl::kAten;
    return prepared;
  }

  template <typename scalar_t>
  static void gemm(int64_t m, const scalar_t* a, int64_t lda, const CpuWeight<scalar_t>& w, float beta,
                   scalar_t* c, int64_t ldc) {
    if (w.packed) return packed_gemm(m, a, lda, *w.packed, beta, c, ldc);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (w.mkl && m == w.mkl->rows()) return w.mkl->compute(a, lda, beta, c, ldc);
    }
#ifdef LSTM_EXT_BRGEMM
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (w.brgemm && m <= w.brgemm->rows()) return w.brgemm->compute(m, a, lda, beta, c, ldc);
    }
#endif
    // A weight prepared for ATen's GEMM keeps it for few rows too: the choices report names it.
    if (w.aten && m > 0 && w.operand.n() > 0) return aten_gemm(m, a, lda, w.operand, beta, c, ldc);
    gemm(m, a, lda, w.operand, beta, c, ldc);
  }

  template <typename scalar_t>
  static void gemm(int64_t m, const scalar_t* a, int64_t lda, const WeightOperand<scalar_t>& op, float beta,
                   scalar_t* c, int64_t ldc) {
    if (m == 0 || op.n() == 0) return;
    if constexpr (kHasDotGemm<scalar_t>) {
      if (op.transposed && m <= kMaxDotRows) return dot_gemm(m, a, lda, op, beta, c, ldc);
    }
    // Row-major C = A op(W) is column-major C^T = op(W)^T A^T, and the row-major W read
    // column-major is W^T.
    if (op.k() > 0 &&
        column_major_gemm(op.transposed, false, op.n(), m, op.k(), op.data, op.cols, a, lda, beta, c, ldc)) {
      return;
    }
    // Half, bfloat16, or no Fortran BLAS in this torch: let ATen do it.
    aten_gemm(m, a, lda, op, beta, c, ldc);
  }

  // The most bytes of saved values a no_grad forward projects its input for at once
  // (layer_ops.h's plan_forward), in blocks of steps: about half an L2 here, so that the
  // cells read them from cache; bfloat16 with AMX 32 MiB, where those projections run on
  // ATen's GEMM at a rate that rises with the rows: on the Intel Xeon (2 threads), with
  // k = 256 and n = 1024, 256 rows took 85 us (1.6 TFLOP/s) and 6400 rows 1.3 ms (2.5
  // TFLOP/s); a one-layer no_grad forward at T=100, processes alternating, went from 0.76x
  // to 0.85x nn.LSTM at B=64 H=256 and from 0.88-0.90x to 1.00-1.01x at B=32 H=128
  // (float32 and half within noise either way).
  static int64_t inference_block_bytes(at::ScalarType dtype) {
    return dtype == at::kBFloat16 && cpu_has_amx_bf16() ? int64_t{32} << 20 : int64_t{512} << 10;
  }

  // Whether the layers of a stack run at once, one per thread (layer_ops.h's run_stack,
  // for stack_inference and stack_forward), given a step's recurrent GEMM: its flops and
  // the bytes of its weight.
  // Where a step is too small to split well between threads: at B=8 H=64 on 2 cores of an
  // AMD EPYC a 2-layer LSTM took 0.75 ms against 0.95 ms a layer at a time. Or where each
  // thread keeps its layer's weight in its core's L2 (at most half of it): on the Intel
  // Xeon (2 MiB L2), in one process alternating, 2-layer forwards at T=100 ran 2-18%
  // faster so in float32 (B=16-64 at H=128-256, 4-34 Mflop per step; B=50 T=50 H=256
  // within 0.2%) and 17-37% in bfloat16 (B=32-64, H=128-256), but B=32 H=512 float32
  // (4 MiB) 2% slower; on the AMD EPYC at B=4 H=512 (4 MiB, 1 MiB L2) it took 36 ms
  // against 30 ms.
  static bool overlap_layers(int64_t layers, int64_t step_flops, int64_t weight_bytes) {
    constexpr int64_t kMaxStepFlops = 2 << 20;
    const bool small = step_flops <= kMaxStepFlops || 2 * weight_bytes <= l2_cache_bytes();
    return small && can_overlap_layers(layers);
  }

  // The same for a stack's backward (layer_ops.h's stack_backward), which overlaps only
  // where a step is tiny. Its layer-at-a-time alternative splits each layer's rows
  // between the threads for the whole loop (for_each_row_block) and runs its dx as one
  // GEMM on all threads. On the Intel Xeon (2 threads), one process alternating, the
  // backward of a 2-layer LSTM overlapped against layer at a time: B=8 T=50 H=64
  // (0.26 Mflop per step) 10-13% faster, B=16 H=64 9%, B=8 H=128 and B=16 H=128 (1-2
  // Mflop) within 2%, B=32 T=100 H=128 (4 Mflop) 3-4% and B=64 H=256 5-10% slower.
  static bool overlap_layer_backwards(int64_t layers, int64_t step_flops) {
    constexpr int64_t kMaxStepFlops = 1 << 20;
    return step_flops <= kMaxStepFlops && can_overlap_layers(layers);
  }

  // Only where each thread gets as many layers, and with OpenMP, whose threads of a
  // parallel region all run at once (a task pool could queue a layer behind one waiting
  // on it).
  static bool can_overlap_layers(int64_t layers) {
#if AT_PARALLEL_OPENMP
    const int64_t threads = at::get_num_threads();
    return threads > 1 && layers % threads == 0 && !at::in_parallel_region();
#else
    return false;
#endif
  }

  // A core's L2 cache as the C library reports it (glibc reads CPUID), else 1 MiB.
  static int64_t l2_cache_bytes() {
    static const int64_t bytes = [] {
      int64_t reported = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
      reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
      return reported > 0 ? reported : int64_t{1} << 20;
    }();
    return bytes;
  }

  // Runs fn(layer) for every layer, lowest first, or with overlap on all threads at once,
  // layer l on thread l % threads: each thread takes its layers in order, and a layer
  // only waits on the one below, so the lowest unfinished layer can always run.
  template <class Fn>
  static void for_each_layer(int64_t layers, bool overlap, const Fn& fn) {
    if (!overlap) {
      for (int64_t l = 0; l < layers; ++l) fn(l);
      return;
    }
    const int64_t threads = at::get_num_threads();
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t l = 0; l < layers; ++l) {
        if (l % threads >= begin && l % threads < end) fn(l);
      }
    });
  }

  // Runs fn(r0, r1) over blocks of rows that together cover [0, rows), one per thread,
  // where every step multiplies by the recurrent weight w on the microkernel and that
  // GEMM is too small to split well between threads (<= 8 Mflop): each block then runs
  // the whole time loop (inference: a block of steps) without a fork-join per step. Else
  // fn(0, rows). Each thread then reads all of w at every step, where it read its share
  // of w's panels before.
  template <typename scalar_t, class Fn>
  static void for_each_row_block(const CpuWeight<scalar_t>& w, int64_t rows, const Fn& fn) {
    constexpr int64_t kMinRows = 4, kMaxStepFlops = 8 << 20;
    const int64_t threads = at::get_num_threads();
    if (!w.packed || threads < 2 || at::in_parallel_region() || rows < 2 * kMinRows ||
        2 * rows * w.packed->k() * w.packed->n() > kMaxStepFlops) {
      return fn(0, rows);
    }
    const int64_t blocks = std::min(threads, rows / kMinRows);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) fn(rows * b / blocks, rows * (b + 1) / blocks);
    });
  }

  // dg^T a. Float32 on oneDNN or the BLAS (gemm_select.h). Float64 runs as (a^T dg)^T:
  // MKL's dgemm is 1.1-1.6x faster in that orientation here. bfloat16 and half on ATen's
  // GEMM where it runs them on oneDNN, else as float32 copies (aten_gemm says why).
  static at::Tensor weight_grad(const at::Tensor& dg, const at::Tensor& a) {
    if (dg.scalar_type() == at::kFloat) return float_weight_grad(dg, a);
    if (dg.scalar_type() == at::kDouble) return at::mm(a.t(), dg).t().contiguous();
    if (!aten_reduced_gemm_on_onednn(dg.scalar_type())) {
      return float_weight_grad(dg.to(at::kFloat), a.to(at::kFloat)).to(dg.scalar_type());
    }
    return at::mm(dg.t(), a);
  }

  // Runs Cell on every element of a step (ForwardStep or BackwardStep): vectors of the
  // opmath type, then the scalar tail one by one.
  template <class Cell, class StepT>
  static void pointwise(const StepT& s) {
    using scalar_t = typename StepT::scalar_type;
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    for_each_block(s.rows, s.hidden, [&](int64_t b, int64_t j0, int64_t j1) {
      int64_t j = j0;
      for (; j + Vec::size() <= j1; j += Vec::size()) {
        run_cell(Element<Cell, Vec, VecLane<acc_t, scalar_t>, StepT>{s, b, j});
      }
      for (; j < j1; ++j) run_cell(Element<Cell, acc_t, ScalarLane<acc_t, scalar_t>, StepT>{s, b, j});
    });
  }

  // With a recurrent weight on the batch-reduce GEMM (bfloat16 on AMX), grouped by unit:
  // each thread runs the cell on the units of each panel it has just multiplied, from the
  // panel's float32 sums. One fork-join per step instead of two, the sums neither rounded
  // to bfloat16 nor written out, and each unit's gates and cell state stay on one core.
  // Other weights: false, gemm and pointwise.
  template <class Cell, typename scalar_t>
  static bool recurrent_step(const CpuWeight<scalar_t>& w, const scalar_t* a_carry, const scalar_t* a_start,
                             int64_t lda, const ForwardStep<scalar_t>& s) {
#ifdef LSTM_EXT_BRGEMM
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (!w.brgemm || w.brgemm->gates() != Cell::kGates) return false;
      TORCH_INTERNAL_ASSERT(s.rows <= w.brgemm->rows());
      using Vec = at::vec::Vectorized<float>;
      using VecElement = ForwardElementWithSums<Cell, Vec, VecLane<float, scalar_t>, VecLane<float, float>, scalar_t, float>;
      using ScalarElement =
          ForwardElementWithSums<Cell, float, ScalarLane<float, scalar_t>, ScalarLane<float, float>, scalar_t, float>;
      const int64_t units = w.brgemm->units();
      w.brgemm->for_each_panel(s.rows, s.n_carry, a_carry, a_start, lda, [&](int64_t j0, const float* sums, int64_t ld) {
        const int64_t j1 = std::min(s.hidden, j0 + units);
        for (int64_t b = 0; b < s.rows; ++b) {
          int64_t j = j0;
          for (; j + Vec::size() <= j1; j += Vec::size()) Cell::forward(VecElement{{s, b, j}, sums, ld, units, j0});
          for (; j < j1; ++j) Cell::forward(ScalarElement{{s, b, j}, sums, ld, units, j0});
        }
      });
      return true;
    }
#endif
    return false;
  }
};

}  // namespace

// This file's CPU kernels, for cpu/dispatch.cpp: kernels_*.cpp compile it once per
// instruction set, each inside its own namespace, and dispatch.cpp registers one.
void register_cpu_kernels(torch::Library& m) {
  m.impl("lstm_forward", &lstm_forward<CpuBackend>);
  m.impl("lstm_inference", &lstm_inference<CpuBackend>);
  m.impl("lstm_backward", &lstm_backward<CpuBackend>);
  m.impl("rnn_forward", &rnn_forward<CpuBackend>);
  m.impl("rnn_inference", &rnn_inference<CpuBackend>);
  m.impl("rnn_backward", &rnn_backward<CpuBackend>);
  m.impl("stack_inference", &stack_inference<CpuBackend>);
  m.impl("stack_forward", &stack_forward<CpuBackend>);
  m.impl("stack_backward", &stack_backward<CpuBackend>);
}

}  // namespace lstm_ext
