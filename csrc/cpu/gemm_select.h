// Run-time choice of the library behind each GEMM of a layer.
//  * The float32 GEMMs against a prepared weight (input projection, per-step, dx):
//    packed_gemm's microkernel or MKL's packed GEMM (cblas_sgemm_pack/compute, exported by
//    torch's libtorch_cpu when torch is built with MKL). Neither wins everywhere. On an
//    Intel Xeon with AVX-512 and AMX (2 threads) MKL ran the per-step GEMMs of m n k >= 2^22
//    multiply-adds 1.00-1.34x as fast as the microkernel (16 of 18 shapes; 0.75x and 0.99x
//    in two), and the microkernel ran most smaller ones faster (up to 2.4x at m=4 n=256
//    k=64); on an AMD EPYC Zen 4 with AVX-512 the microkernel ran the per-step shapes
//    1.4-2x faster than MKL (large input projections and dx within +-10%). MKL picks its
//    kernels by CPU vendor.
//  * The float64 ones: the microkernel or the BLAS on the weight as it is (dgemm_; MKL
//    has no float64 packed GEMM in torch's exports). On the Intel Xeon (2 threads), in one
//    process alternating, an LSTM's forward+backward ran 5-16% faster with its input
//    projection and dx (m n k >= 2^22) on the BLAS (B=32 T=100 H=128 L=1, B=50 T=50
//    H=256 L=2, B=64 T=100 H=256 L=2), and 1% slower to 7% faster with the per-step
//    GEMMs there too.
//  * The bfloat16 ones: packed_gemm's microkernel (vdpbf16ps on an AMD CPU with AVX-512
//    BF16, else the float32 kernel, converted: bf16_kernel), or ATen's GEMM (oneDNN).
//    On an AMD EPYC Zen 4 the vdpbf16ps microkernel ran the per-step GEMM of
//    B=64 H=256 (m=64 n=1024 k=256) at 417 GFLOP/s on 2 threads, ATen's at 163 in the
//    time loop. On the Intel Xeon oneDNN runs them on AMX: there an LSTM's forward+backward
//    at B=64 T=100 H=256 L=2 took 91 ms on ATen's GEMM, 245 ms on the vdpbf16ps microkernel;
//    timed alone (LSTM_EXT_GEMM=auto, 2 threads), the converted float32 one, which runs
//    there now, took 0.57-0.67 as long as that one at H=64-256 (1.05-1.12x at m=16-32
//    n=2048 k=512, whose float32 panels overflow L2), and ATen's GEMM still won from
//    about 3 x 2^20, the batch-reduce GEMM from 2^19-2^20.
//    With AMX the per-step GEMMs (even k) run on oneDNN's batch-reduce GEMM instead of
//    ATen's, on weights packed once per call (BrgemmPackedWeight, below). Without AVX-512
//    BF16 (and in the AVX2 and portable kernels) the converted kernel spares every
//    per-step GEMM ATen's per-call cost; without AVX-512 ATen's bfloat16 GEMM has no
//    oneDNN kernels at all (aten_reduced_gemm_on_onednn). Not measured on such CPUs.
//  * The half ones: packed_gemm's microkernel (half on the float32 kernel), or ATen's
//    GEMM, which runs oneDNN's float16 kernels where the CPU has AVX512-FP16 (ATen's
//    mkldnn_fp16_device_check; elsewhere loops of its own). On the Intel Xeon (AVX512-FP16,
//    no AMX-FP16) ATen ran a 1024^3 half product at 224 GFLOP/s (float32 237), but a
//    per-step GEMM cost 24 us or more whatever its size: with every GEMM on ATen an LSTM's
//    no_grad forward at B=32 T=100 H=128 L=1 took 8.3 ms, nn.LSTM's 6.4. With the per-step
//    GEMMs on the microkernel, lstm_ext / nn.LSTM there (one process each): forward+backward
//    3.7x with the input projection and dx on ATen, 2.9x on the microkernel (B=32 H=128
//    L=1); 1.36x against 1.20x (B=32 H=512 L=2); forward within 10% either way.
//  * The weight gradients (dg^T a over all steps, a long k): oneDNN's matmul as ATen runs
//    it, on the strided operands as they are, or torch's BLAS (at::mm: MKL on x86 wheels).
//    On an AMD EPYC Zen 4 oneDNN ran them up to 20% faster from k ~2500 (k=3200-6400:
//    150-180 GFLOP/s, MKL 136-150), and within noise of MKL at k=400; on the Intel Xeon
//    MKL was as fast or faster in 7 of 8 shapes (by up to 26%), oneDNN 2% faster in one.
//   LSTM_EXT_GEMM unset (the default) chooses by the CPU, as measured above: on an Intel
//     CPU the libraries (MKL's packed GEMM for the float32 GEMMs of m n k >= 2^22, the
//     microkernel for smaller ones, MKL's BLAS for the weight gradients; float64 input
//     projections and dx of m n k >= 2^22 on the BLAS, the per-step GEMMs on the
//     microkernel), elsewhere the microkernel and oneDNN's weight gradients; bfloat16
//     where the CPU has AMX on oneDNN's batch-reduce GEMM (the forward's recurrent GEMM
//     from m n k = 2^18, the other per-step GEMMs from 2^21) or ATen's GEMM (the others of
//     m n k >= 2^22), smaller ones on the microkernel; on the microkernel elsewhere; half
//     on the microkernel, but for the input projections and dx of m n k >= 2^22 on ATen's
//     GEMM where the CPU has AVX512-FP16.
//     bfloat16 and half weight gradients run on ATen's GEMM, or where it has no oneDNN
//     kernels for them on float32 copies, as float32's.
//   LSTM_EXT_GEMM=microkernel (the microkernel, weight gradients on oneDNN) or mkl (the
//     libraries: MKL for all float32 GEMMs, the BLAS for float64's; for bfloat16 the
//     batch-reduce GEMM for the per-step ones where it runs, ATen's for the others; for
//     half ATen's) picks
//     one family for every GEMM;
//   LSTM_EXT_GEMM=auto times both candidates once for the first GEMM of a (role, m, n, k,
//     dtype, threads) and keeps the faster for the process, like cuDNN's algorithm
//     search. Not the default: a timed choice can differ between runs (two candidates
//     within noise), and with it the float32 rounding, so a resumed run would no longer
//     repeat an uninterrupted one exactly. The default's rule gives the same choice on
//     every run on one machine.
//   LSTM_EXT_GEMM_DISABLE_MKL=1, LSTM_EXT_GEMM_DISABLE_ONEDNN=1 and
//     LSTM_EXT_GEMM_DISABLE_BRGEMM=1 act as a torch without MKL's packed GEMM, oneDNN
//     or the batch-reduce GEMM would, for tests (and packed_gemm.h's LSTM_EXT_GEMM_BF16_DOT
//     picks bfloat16's microkernel).
// The variables are read once. oneDNN has no float64 matmul: float64's weight gradients
// always run on the BLAS.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>

#include "../backend_api.h"
#include "cpu_features.h"
#include "packed_gemm.h"

// ATen's batch-reduce GEMM for bfloat16 (torches before this macro lack it).
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define LSTM_EXT_BRGEMM 1
#endif

// Weak, like sgemm_ in lstm_cpu.cpp: null in a torch without MKL, so the import still works.
// The CBLAS enums are passed as int, their C ABI type.
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace lstm_ext {

// The microkernel and MKL's packed GEMM serve prepared float32 weights, the microkernel and
// the BLAS float64 ones, the microkernel, ATen's GEMM and oneDNN's batch-reduce GEMM
// bfloat16 ones, the microkernel and ATen's GEMM half ones; oneDNN's matmul and the BLAS,
// float32 weight gradients.
enum class GemmImpl { kMicrokernel, kMkl, kOneDnn, kBlas, kAten, kBrgemm };

namespace gemm_select_detail {

inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string(v) == value;
}

// How LSTM_EXT_GEMM chooses: by the CPU (unset), one family for all, or timed.
enum class Mode { kByCpu, kMicrokernel, kLibrary, kAuto };

inline Mode mode() {
  static const Mode m = [] {
    const char* v = std::getenv("LSTM_EXT_GEMM");
    const std::string name = v == nullptr ? "" : v;
    if (name.empty()) return Mode::kByCpu;
    if (name == "mkl") return Mode::kLibrary;
    if (name == "microkernel") return Mode::kMicrokernel;
    TORCH_CHECK(name == "auto", "lstm_ext: LSTM_EXT_GEMM must be auto, mkl or microkernel, but got '", name, "'");
    return Mode::kAuto;
  }();
  return m;
}

// The default's threshold for the libraries on an Intel CPU, in multiply-adds m n k: below
// it the microkernel ran most per-step GEMMs faster than MKL's packed GEMM (float32), and
// faster than oneDNN's AMX GEMM through ATen, a call of which took 28 us or more whatever
// its size. bfloat16 on the Intel Xeon, 2 threads: from 2^22 ATen's GEMM was the faster in
// 47 of 50 shapes (up to 10.5x; the other three had m = 4 or 8 and n or k = 2048); below
// 2^21 the microkernel in all but one (dx m=384 n=32 k=128); between, they traded places
// (the microkernel 1.4-2x faster at 2^21, ATen 1.0-2.4x at 3 x 2^20).
constexpr int64_t kLibraryMinMacs = int64_t{1} << 22;  // select_gemm's reasons name it: "2^22"
// The same for bfloat16's per-step GEMMs on oneDNN's batch-reduce GEMM (BrgemmPackedWeight),
// which has no per-call setup. An LSTM's forward+backward on the Intel Xeon (2 threads,
// two runs each, lstm_ext / nn.LSTM) on it and on the microkernel: recurrent m n k =
// 2^21 (B=8 H=256, B=32 H=128) 1.51-1.53x / 1.10-1.19x against 1.29-1.32x / 0.98-1.00x;
// 2^20 (B=16 H=128) 1.33x both against 1.29-1.36x; 2^19 and 2^18 (B=32, B=16 H=64)
// 0.97-1.29x against 1.09-1.63x.
constexpr int64_t kBrgemmMinMacs = int64_t{1} << 21;  // select_gemm's reasons name it: "2^21"
// The forward's recurrent GEMM on it runs with the cell on each panel
// (CpuBackend::recurrent_step), which pays from smaller shapes on (same machine, two
// processes alternating, bfloat16 L=2, lstm_ext / nn.LSTM no_grad forward with it / the
// microkernel): B=16 H=128 (2^20) 1.02 / 0.62x, B=8 H=128 L=1 (2^19) 1.00 / 0.74x,
// B=32 H=64 (2^19) 0.76 / 0.72x, B=16 H=64 (2^18) 1.07 / 0.94x; forward+backward within
// noise of the microkernel there. At B=8 H=64 (2^17) the forward gained too (1.39 / 1.21x),
// but forward+backward lost (1.56 / 1.70x): the microkernel's training forward runs each
// thread's rows without a fork-join per step (for_each_row_block).
constexpr int64_t kBrgemmRecurrentMinMacs = int64_t{1} << 18;  // "2^18"

inline const char* role_name(GemmRole role) {
  switch (role) {
    case GemmRole::kInputProjection: return "input projection";
    case GemmRole::kRecurrent: return "recurrent";
    case GemmRole::kProjection: return "projection";
    case GemmRole::kRecurrentGrad: return "recurrent backward (dh)";
    case GemmRole::kProjectionGrad: return "projection backward";
    case GemmRole::kInputGrad: return "dx";
    case GemmRole::kWeightGrad: return "weight gradient";
  }
  return "?";
}

inline const char* dtype_name(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return c10::toString(dtype);
  }
}

inline const char* impl_name(GemmImpl impl) {
  switch (impl) {
    case GemmImpl::kMicrokernel: return "microkernel";
    case GemmImpl::kMkl: return "mkl";
    case GemmImpl::kOneDnn: return "onednn";
    case GemmImpl::kBlas: return "blas";
    case GemmImpl::kAten: return "aten";
    case GemmImpl::kBrgemm: return "brgemm";
  }
  return "?";
}

// One choice of the process-wide table, and why it was made.
struct Choice {
  GemmImpl impl;
  std::string reason;
};
using Key = std::tuple<GemmRole, int64_t, int64_t, int64_t, c10::ScalarType, int>;  // role, m, n, k, dtype, threads

struct Table {
  std::mutex mutex;
  std::map<Key, Choice> choices;
};
inline Table& table() {
  static Table t;
  return t;
}

// Best seconds per call of each candidate, timed in alternating rounds so that a burst of
// load elsewhere hits both alike. A round repeats the call for at least 200 us, so that a
// choice costs milliseconds whatever the shape (a call ranges from 0.1 us to 100 ms).
template <class Micro, class Mkl>
std::pair<double, double> seconds_per_call(const Micro& micro, const Mkl& mkl) {
  using Clock = std::chrono::steady_clock;
  auto best_of_round = [](const auto& fn, double& best) {
    const auto t0 = Clock::now();
    double elapsed = 0;
    int64_t calls = 0;
    for (; elapsed < 200e-6; elapsed = std::chrono::duration<double>(Clock::now() - t0).count()) {
      fn();
      ++calls;
    }
    best = std::min(best, elapsed / calls);
  };
  double micro_s = 1e30, mkl_s = 1e30;
  micro();  // warm-up: caches, and the thread pools
  mkl();
  for (int round = 0; round < 3; ++round) {
    best_of_round(micro, micro_s);
    best_of_round(mkl, mkl_s);
  }
  return {micro_s, mkl_s};
}

}  // namespace gemm_select_detail

inline bool mkl_packed_gemm_available() {
  static const bool available = cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
                                cblas_sgemm_compute != nullptr &&
                                !gemm_select_detail::env_is("LSTM_EXT_GEMM_DISABLE_MKL", "1");
  return available;
}

// op(W) packed by MKL for C (rows x n) = A (rows x k) op(W) + beta * C. MKL's reference
// does not say that a weight packed for one m serves another (torch's mkl_linear also
// computes with its packed weight only at the m it packed for), so compute() is for
// `rows` rows only, and other m go to the unpacked BLAS.
class MklPackedWeight {
 public:
  MklPackedWeight(const WeightOperand<float>& w, int64_t rows)
      : rows_(rows), n_(w.n()), k_(w.k()),
        // The buffer never moves: MKL's packed data holds metadata that depends on its address.
        buffer_(at::empty({static_cast<int64_t>(cblas_sgemm_pack_get_size(kBMatrix, rows, n_, k_) / sizeof(float)) + 1},
                          at::kFloat)) {
    cblas_sgemm_pack(kRowMajor, kBMatrix, w.transposed ? kTrans : kNoTrans, rows_, n_, k_, 1.0f, w.data, w.cols,
                     buffer_.data_ptr<float>());
  }

  // Whether MKL's 32-bit dimensions hold this GEMM (the layer's leading dimensions are n or k).
  static bool fits(int64_t rows, const WeightOperand<float>& w) {
    return rows > 0 && rows <= INT_MAX && w.rows <= INT_MAX && w.cols <= INT_MAX;
  }

  int64_t rows() const { return rows_; }

  void compute(const float* a, int64_t lda, float beta, float* c, int64_t ldc) const {
    cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, rows_, n_, k_, a, lda, buffer_.data_ptr<float>(), k_, beta, c,
                        ldc);
  }

 private:
  // CBLAS_LAYOUT, CBLAS_TRANSPOSE, CBLAS_IDENTIFIER and CBLAS_STORAGE values of mkl_cblas.h.
  static constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
  int rows_, n_, k_;
  at::Tensor buffer_;
};

// Whether ATen's GEMM runs bfloat16 or half (`dtype`) on oneDNN's kernels: oneDNN linked,
// not disabled for a test (LSTM_EXT_GEMM_DISABLE_ONEDNN acts as a torch without it), not
// turned off by the user, and a CPU that oneDNN serves in that dtype (ideep's checks, which
// ATen's call: bfloat16 from AVX-512 on, half with AVX512-FP16). Elsewhere ATen runs them
// on loops of its own, which on the Intel Xeon (with oneDNN turned off) ran 64 x 256 times
// 256 x 1024 at 2 GFLOP/s in bfloat16 and 1 in half, where oneDNN ran it at 381 in bfloat16.
inline bool aten_reduced_gemm_on_onednn(c10::ScalarType dtype) {
  using namespace gemm_select_detail;
  static const bool linked = !env_is("LSTM_EXT_GEMM_DISABLE_ONEDNN", "1");
  const bool cpu = dtype == at::kBFloat16 ? cpu_has_avx512_core() : dtype == at::kHalf && cpu_has_avx512_fp16();
  return linked && cpu && at::globalContext().userEnabledMkldnn();
}

// Row-major C (m x n) = A (m x k) op(W) + beta * C through ATen, on raw CPU pointers, for
// the dtypes no BLAS here serves (half and bfloat16 run on oneDNN or MKL there; where
// oneDNN does not serve them, ATen's float32 GEMM does, on converted copies: the products
// of two bfloat16 or halves are exact in float32, so the sums are those of a GEMM with
// float32 accumulation, rounded once). Each call wraps the pointers in tensor views.
template <typename scalar_t>
void aten_gemm(int64_t m, const scalar_t* a, int64_t lda, const WeightOperand<scalar_t>& w, float beta, scalar_t* c,
               int64_t ldc) {
  constexpr c10::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
  const auto opts = at::TensorOptions().dtype(dtype);
  auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {ld, 1}, opts);
  };
  const at::Tensor weight = view(w.data, w.rows, w.cols, w.cols);
  const at::Tensor op_w = w.transposed ? weight.t() : weight;
  at::Tensor out = view(c, m, w.n(), ldc);
  if ((dtype == at::kBFloat16 || dtype == at::kHalf) && !aten_reduced_gemm_on_onednn(dtype)) {
    out.copy_(at::addmm(out.to(at::kFloat), view(a, m, w.k(), lda).to(at::kFloat), op_w.to(at::kFloat), beta, 1));
    return;
  }
  at::addmm_out(out, out, view(a, m, w.k(), lda), op_w, beta, 1);
}

// The GEMMs run once per step, with the batch's rows: few rows, and many calls.
inline bool per_step(GemmRole role) {
  return role == GemmRole::kRecurrent || role == GemmRole::kProjection || role == GemmRole::kRecurrentGrad ||
         role == GemmRole::kProjectionGrad;
}

#ifdef LSTM_EXT_BRGEMM
// Whether oneDNN's batch-reduce GEMM (ATen's cpublas::brgemm) can run bfloat16 on packed
// weights here: with AMX-BF16 (cpublas::could_pack).
inline bool brgemm_available() {
  static const bool available = at::native::cpublas::could_pack(at::kBFloat16) &&
                                !gemm_select_detail::env_is("LSTM_EXT_GEMM_DISABLE_BRGEMM", "1");
  return available;
}

// op(W) packed once per call for oneDNN's batch-reduce GEMM, in panels of at most kPanel
// columns, for C (m x n, m <= rows) = A (m x k) op(W) + beta * C with bfloat16 A and C.
// brgemm sums in float32 into a scratch C, rounded once into C. ATen's addmm, which reaches
// the same AMX kernels, also repacks the weight and sets up a primitive on every call: on
// the Intel Xeon (2 threads) 64 x 1024 x 256 ran in 42-91 us this way against 60-76 us
// there, 32 x 512 x 128 in 12 against 31 us.
// With gates > 1 (a recurrent weight whose n columns are a cell's gate blocks of n / gates
// units each), each panel holds every gate of its units instead: panel p, gate g, unit u
// at column g * units + u - p * units, so that whoever computes the panel can run the cell
// on those units (for_each_panel, CpuBackend::recurrent_step); compute() needs gates == 1.
class BrgemmPackedWeight {
 public:
  using scalar_t = at::BFloat16;
  static constexpr int64_t kPanel = 64;  // the widest panel cpublas::pack writes

  BrgemmPackedWeight(const WeightOperand<scalar_t>& w, int64_t rows, int64_t gates = 1)
      : rows_(rows), n_(w.n()), k_(w.k()), gates_(gates), hidden_(n_ / gates),
        // Units per panel: all of it for gates == 1, else a vector of float32 (16) per gate.
        units_(gates == 1 ? kPanel : 16), width_(gates * units_), panels_((hidden_ + units_ - 1) / units_),
        // Pairs of k rows interleave (VNNI): an odd k is padded with a zero row.
        panel_size_((k_ + 1) / 2 * 2 * width_) {
    TORCH_INTERNAL_ASSERT(gates >= 1 && width_ <= kPanel && hidden_ * gates == n_);
    constexpr auto dtype = c10::CppTypeToScalarType<scalar_t>::value;
    const auto options = at::TensorOptions().dtype(dtype);
    // op(W) row-major as k x gates x (panels units), zero past unit hidden, then each
    // panel's gates side by side: k x panels x gates x units.
    at::Tensor grouped = at::zeros({k_, gates_, panels_ * units_}, options);
    const at::Tensor weight = at::from_blob(const_cast<scalar_t*>(w.data), {w.rows, w.cols}, options);
    grouped.narrow(2, 0, hidden_).copy_((w.transposed ? weight.t() : weight).reshape({k_, gates_, hidden_}));
    const at::Tensor b =
        grouped.view({k_, gates_, panels_, units_}).permute({0, 2, 1, 3}).contiguous().view({k_, panels_ * width_});
    packed_ = at::empty({panels_ * panel_size_}, options);
    for (int64_t p = 0; p < panels_; ++p) {
      at::native::cpublas::pack(k_, width_, panels_ * width_, width_, dtype, dtype, b.data_ptr<scalar_t>() + p * width_,
                                packed_.data_ptr<scalar_t>() + p * panel_size_);
    }
    sums_ = at::empty({rows_, panels_ * width_}, at::kFloat);
  }

  int64_t rows() const { return rows_; }
  int64_t gates() const { return gates_; }
  // The units (of hidden) each panel holds, all its gates' columns for each.
  int64_t units() const { return units_; }

  // C = A op(W) + beta C, in parallel over the panels.
  void compute(int64_t m, const scalar_t* a, int64_t lda, float beta, scalar_t* c, int64_t ldc) const {
    TORCH_INTERNAL_ASSERT(gates_ == 1, "a weight grouped by unit serves recurrent_step only");
    for_each_panel(m, m, a, a, lda, [&](int64_t j0, const float* sums, int64_t ld_sums) {
      for (int64_t i = 0; i < m; ++i) round_into(sums + i * ld_sums, beta, c + i * ldc + j0, std::min(kPanel, n_ - j0));
    });
  }

  // For each panel, in parallel: its float32 sums of rows [0, m) of A op(W), rows [0, m_first)
  // of A from a_first and the others from a_rest, then fn(first unit (gates > 1) or column,
  // the panel's sums, their row stride) on the same thread. Each thread releases AMX's tile
  // state when done.
  template <class Fn>
  void for_each_panel(int64_t m, int64_t m_first, const scalar_t* a_first, const scalar_t* a_rest, int64_t lda,
                      const Fn& fn) const {
    const int64_t ld_sums = panels_ * width_;
    const scalar_t* packed = packed_.data_ptr<scalar_t>();
    float* sums = sums_.data_ptr<float>();
    at::parallel_for(0, panels_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        float* panel_sums = sums + p * width_;
        const scalar_t* b = packed + p * panel_size_;
        if (m_first > 0) at::native::cpublas::brgemm(m_first, width_, k_, lda, width_, ld_sums, false, a_first, b, panel_sums);
        if (m > m_first) {
          at::native::cpublas::brgemm(m - m_first, width_, k_, lda, width_, ld_sums, false, a_rest, b,
                                      panel_sums + m_first * ld_sums);
        }
        fn(p * units_, static_cast<const float*>(panel_sums), ld_sums);
      }
      at::native::cpublas::brgemm_release();
    });
  }

 private:
  // c = beta c + sums, in float32, rounded once; c is not read where beta is 0.
  static void round_into(const float* sums, float beta, scalar_t* c, int64_t cols) {
    using Vec = at::vec::Vectorized<float>;
    using Lane = VecLane<float, scalar_t>;
    int64_t j = 0;
    for (; j + Vec::size() <= cols; j += Vec::size()) {
      const Vec s = Vec::loadu(sums + j);
      Lane::store(c + j, beta == 0 ? s : at::vec::fmadd(Vec(beta), Lane::load(c + j), s));
    }
    for (; j < cols; ++j) c[j] = static_cast<scalar_t>(beta == 0 ? sums[j] : beta * static_cast<float>(c[j]) + sums[j]);
  }

  int64_t rows_, n_, k_, gates_, hidden_, units_, width_, panels_, panel_size_;
  at::Tensor packed_, sums_;
};
#endif

namespace gemm_select_detail {

// The two candidates of a GEMM: `first` runs under LSTM_EXT_GEMM=microkernel, `second`
// under LSTM_EXT_GEMM=mkl, `by_cpu` (`first` or `second`) by default, for the reason
// `why_by_cpu`. `only` is set when just one of them can run here, `why_only` says why.
struct Candidates {
  GemmImpl first, second;
  GemmImpl by_cpu;
  const char* why_by_cpu;
  std::optional<GemmImpl> only = std::nullopt;
  const char* why_only = "";
};

// The process-wide choice for `key`, made when first asked: the only candidate, the one
// the CPU's rule or LSTM_EXT_GEMM names, or with "auto" the faster of the two calls timed
// (time_first and time_second, on scratch data of the real shape).
template <class TimeFirst, class TimeSecond>
GemmImpl choose(const Key& key, const Candidates& c, const TimeFirst& time_first, const TimeSecond& time_second) {
  Table& t = table();
  {
    std::lock_guard<std::mutex> lock(t.mutex);
    if (auto it = t.choices.find(key); it != t.choices.end()) return it->second.impl;
  }
  Choice choice{c.by_cpu, std::string("default: ") + c.why_by_cpu};
  if (c.only) {
    choice = {*c.only, c.why_only};
  } else if (mode() == Mode::kMicrokernel || mode() == Mode::kLibrary) {
    choice = {mode() == Mode::kLibrary ? c.second : c.first, "LSTM_EXT_GEMM"};
  } else if (mode() == Mode::kAuto) {
    const auto [first_s, second_s] = seconds_per_call(time_first, time_second);
    std::ostringstream why;
    why.precision(3);
    why << "timed: " << impl_name(c.first) << ' ' << first_s * 1e6 << " us, " << impl_name(c.second) << ' '
        << second_s * 1e6 << " us";
    choice = {second_s < first_s ? c.second : c.first, why.str()};
  }
  std::lock_guard<std::mutex> lock(t.mutex);
  return t.choices.emplace(key, choice).first->second.impl;  // a concurrent first choice wins
}

}  // namespace gemm_select_detail

// The implementation for the GEMMs of `use` against w: the microkernel, or the library
// candidate of the dtype (float32: MKL's packed GEMM; float64: the BLAS; bfloat16: the
// batch-reduce GEMM for per-step GEMMs where it runs, else ATen's GEMM; half: ATen's GEMM).
template <typename scalar_t>
GemmImpl select_gemm(const WeightOperand<scalar_t>& w, const GemmUse& use) {
  using namespace gemm_select_detail;
  const Key key{use.role, use.rows, w.n(), w.k(), c10::CppTypeToScalarType<scalar_t>::value, at::get_num_threads()};
  const bool large = use.rows * w.n() * w.k() >= kLibraryMinMacs;
  constexpr bool kFloat = std::is_same_v<scalar_t, float>, kDouble = std::is_same_v<scalar_t, double>;
  Candidates candidates{GemmImpl::kMicrokernel,
                        kFloat ? GemmImpl::kMkl : kDouble ? GemmImpl::kBlas : GemmImpl::kAten,
                        GemmImpl::kMicrokernel, ""};
  if constexpr (kDouble) {
    // The BLAS runs on the weight as it is (CpuBackend::gemm).
    if (cpu_is_intel() && large && !per_step(use.role)) candidates.by_cpu = GemmImpl::kBlas;
    candidates.why_by_cpu = !cpu_is_intel()       ? "not an Intel CPU"
                            : per_step(use.role) ? "Intel CPU, per-step GEMM"
                            : large              ? "Intel CPU, m n k >= 2^22"
                                                 : "Intel CPU, m n k < 2^22";
  } else if constexpr (kFloat) {
    if (cpu_is_intel() && large) candidates.by_cpu = GemmImpl::kMkl;
    candidates.why_by_cpu = !cpu_is_intel() ? "not an Intel CPU" : large ? "Intel CPU, m n k >= 2^22" : "Intel CPU, m n k < 2^22";
    if (!mkl_packed_gemm_available() || !MklPackedWeight::fits(use.rows, w)) {
      candidates.only = GemmImpl::kMicrokernel;
      candidates.why_only = "MKL packed GEMM unavailable";
    }
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    if (cpu_has_avx512_fp16() && large && !per_step(use.role)) candidates.by_cpu = GemmImpl::kAten;
    candidates.why_by_cpu = per_step(use.role)      ? "per-step GEMM"
                            : !cpu_has_avx512_fp16() ? "no AVX512-FP16"
                            : large                  ? "AVX512-FP16, m n k >= 2^22"
                                                     : "AVX512-FP16, m n k < 2^22";
  } else {
#ifdef LSTM_EXT_BRGEMM
    // An odd k stopped the process with an illegal instruction in oneDNN (torch 2.14.1).
    if (std::is_same_v<scalar_t, at::BFloat16> && per_step(use.role) && w.k() % 2 == 0 && brgemm_available()) {
      candidates.second = GemmImpl::kBrgemm;
    }
#endif
    if (candidates.second == GemmImpl::kBrgemm) {
      const bool recurrent = use.role == GemmRole::kRecurrent;
      const bool brgemm_large = use.rows * w.n() * w.k() >= (recurrent ? kBrgemmRecurrentMinMacs : kBrgemmMinMacs);
      if (brgemm_large) candidates.by_cpu = GemmImpl::kBrgemm;
      candidates.why_by_cpu = recurrent ? (brgemm_large ? "AMX, recurrent m n k >= 2^18" : "AMX, recurrent m n k < 2^18")
                              : brgemm_large ? "AMX, per-step m n k >= 2^21"
                                             : "AMX, per-step m n k < 2^21";
    } else {
      if (cpu_has_amx_bf16() && large) candidates.by_cpu = GemmImpl::kAten;
      candidates.why_by_cpu = !cpu_has_amx_bf16() ? "no AMX" : large ? "AMX, m n k >= 2^22" : "AMX, m n k < 2^22";
    }
  }
  // Timed (with "auto" only) on the real weight and zero inputs, into a scratch C; the
  // BLAS (float64) through ATen's addmm, which calls it.
  std::optional<PackedWeight<scalar_t>> micro;
  std::optional<MklPackedWeight> mkl;
#ifdef LSTM_EXT_BRGEMM
  std::optional<BrgemmPackedWeight> brgemm;
#endif
  at::Tensor a, c;
  auto setup = [&] {
    if (a.defined()) return;
    micro.emplace(w);
    if constexpr (kFloat) mkl.emplace(w, use.rows);
#ifdef LSTM_EXT_BRGEMM
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (candidates.second == GemmImpl::kBrgemm) brgemm.emplace(w, use.rows);
    }
#endif
    const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
    a = at::zeros({use.rows, w.k()}, options);
    c = at::zeros({use.rows, w.n()}, options);
  };
  return choose(
      key, candidates,
      [&] {
        setup();
        packed_gemm(use.rows, a.data_ptr<scalar_t>(), w.k(), *micro, 1, c.data_ptr<scalar_t>(), w.n());
      },
      [&] {
        setup();
        if constexpr (kFloat) {
          mkl->compute(a.data_ptr<float>(), w.k(), 1, c.data_ptr<float>(), w.n());
        } else {
#ifdef LSTM_EXT_BRGEMM
          if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
            if (brgemm) return brgemm->compute(use.rows, a.data_ptr<scalar_t>(), w.k(), 1, c.data_ptr<scalar_t>(), w.n());
          }
#endif
          aten_gemm(use.rows, a.data_ptr<scalar_t>(), w.k(), w, 1, c.data_ptr<scalar_t>(), w.n());
        }
      });
}

namespace gemm_select_detail {
// Set once oneDNN's matmul has thrown (a torch whose mkldnn_matmul takes no float32):
// the BLAS from then on.
inline std::atomic<bool>& onednn_failed() {
  static std::atomic<bool> failed{false};
  return failed;
}
}  // namespace gemm_select_detail

// Whether oneDNN's matmul can run now: linked, not disabled for a test, not failed, and
// not turned off by the user (torch.backends.mkldnn.enabled = False).
inline bool onednn_matmul_available() {
  using namespace gemm_select_detail;
  static const bool linked =
      ::at::native::mkldnn_matmul != nullptr && !env_is("LSTM_EXT_GEMM_DISABLE_ONEDNN", "1");
  return linked && !onednn_failed() && at::globalContext().userEnabledMkldnn();
}

// dg^T a, a float32 weight gradient over all steps (dg: k x m, a: k x n, both as strided
// as they come), on oneDNN's matmul or the BLAS, as chosen for the shape.
inline at::Tensor float_weight_grad(const at::Tensor& dg, const at::Tensor& a) {
  using namespace gemm_select_detail;
  const int64_t m = dg.size(1), n = a.size(1), k = dg.size(0);
  if (m == 0 || n == 0 || k == 0) return at::mm(dg.t(), a);
  auto onednn = [](const at::Tensor& dg_, const at::Tensor& a_, const at::Tensor& out) {
    ::at::native::mkldnn_matmul(dg_.t(), a_, out, 0, 1);
  };
  try {
    Candidates candidates{GemmImpl::kOneDnn, GemmImpl::kBlas, cpu_is_intel() ? GemmImpl::kBlas : GemmImpl::kOneDnn,
                          cpu_is_intel() ? "Intel CPU" : "not an Intel CPU"};
    if (!onednn_matmul_available()) {
      candidates.only = GemmImpl::kBlas;
      candidates.why_only = "oneDNN matmul unavailable";
    }
    at::Tensor scratch_dg, scratch_a, scratch_out;  // "auto" times zeros of the real shape
    auto setup = [&] {
      if (scratch_dg.defined()) return;
      scratch_dg = at::zeros_like(dg);
      scratch_a = at::zeros_like(a);
      scratch_out = at::empty({m, n}, dg.options());
    };
    const Key key{GemmRole::kWeightGrad, m, n, k, at::kFloat, at::get_num_threads()};
    const GemmImpl impl = choose(
        key, candidates,
        [&] {
          setup();
          onednn(scratch_dg, scratch_a, scratch_out);
        },
        [&] {
          setup();
          at::mm_out(scratch_out, scratch_dg.t(), scratch_a);
        });
    if (impl == GemmImpl::kOneDnn && onednn_matmul_available()) {
      at::Tensor out = at::empty({m, n}, dg.options());
      onednn(dg, a, out);
      return out;
    }
  } catch (const c10::Error&) {
    onednn_failed() = true;
  }
  return at::mm(dg.t(), a);
}

// The table, one line per choice: "role dtype m=.. n=.. k=.. threads=..: impl (reason)",
// then, where bfloat16 chose the microkernel, "bfloat16 microkernel: kernel (reason)".
inline std::string gemm_choices() {
  using namespace gemm_select_detail;
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mutex);
  std::ostringstream out;
  bool bf16_microkernel = false;
  for (const auto& [key, choice] : t.choices) {
    const auto& [role, m, n, k, dtype, threads] = key;
    out << role_name(role) << ' ' << dtype_name(dtype) << " m=" << m << " n=" << n << " k=" << k
        << " threads=" << threads << ": " << impl_name(choice.impl) << " (" << choice.reason << ")\n";
    bf16_microkernel |= dtype == at::kBFloat16 && choice.impl == GemmImpl::kMicrokernel;
  }
  if (bf16_microkernel) {
    const Bf16Kernel& kernel = bf16_kernel();
    out << "bfloat16 microkernel: " << (kernel.dot ? "vdpbf16ps" : "float32, converted") << " (" << kernel.why << ")\n";
  }
  return out.str();
}

}  // namespace lstm_ext
