// Run-time choice, per GEMM of the layer, between packed_gemm's microkernel and MKL's
// packed GEMM (cblas_sgemm_pack/compute, exported by torch's libtorch_cpu when torch is
// built with MKL). Neither wins everywhere: issue 10 reports MKL's packed GEMM at 2-2.7x
// the microkernel's rate on the per-step shapes of an Intel Xeon with AMX; on an AMD EPYC
// with AVX-512 the microkernel ran them 1.4-2x faster than MKL (large input projections
// and dx within +-10%).
//   LSTM_EXT_GEMM=microkernel (the default) or mkl picks one for every float32 GEMM;
//   LSTM_EXT_GEMM=auto times both once for the first weight prepared for a (role, m, n,
//     k, dtype, threads) and keeps the faster for the process, like cuDNN's algorithm
//     search. Not the default: a timed choice can differ between runs (two candidates
//     within noise), and with it the float32 rounding, so a resumed run would no longer
//     repeat an uninterrupted one exactly.
//   LSTM_EXT_GEMM_DISABLE_MKL=1 acts as a torch without MKL would, for tests.
// Both variables are read once. MKL has no float64 packed GEMM in torch's exports:
// float64 always runs the microkernel.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <climits>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>

#include "../backend_api.h"
#include "packed_gemm.h"

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

enum class GemmImpl { kMicrokernel, kMkl };

namespace gemm_select_detail {

inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string(v) == value;
}

// LSTM_EXT_GEMM: the implementation it names, or none for "auto" (time the candidates).
inline std::optional<GemmImpl> forced_impl() {
  static const std::optional<GemmImpl> forced = [] () -> std::optional<GemmImpl> {
    const char* v = std::getenv("LSTM_EXT_GEMM");
    const std::string mode = v == nullptr || *v == '\0' ? "microkernel" : v;
    if (mode == "mkl") return GemmImpl::kMkl;
    if (mode == "microkernel") return GemmImpl::kMicrokernel;
    TORCH_CHECK(mode == "auto", "lstm_ext: LSTM_EXT_GEMM must be auto, mkl or microkernel, but got '", mode, "'");
    return std::nullopt;
  }();
  return forced;
}

inline const char* role_name(GemmRole role) {
  switch (role) {
    case GemmRole::kInputProjection: return "input projection";
    case GemmRole::kRecurrent: return "recurrent";
    case GemmRole::kProjection: return "projection";
    case GemmRole::kRecurrentGrad: return "recurrent backward (dh)";
    case GemmRole::kProjectionGrad: return "projection backward";
    case GemmRole::kInputGrad: return "dx";
  }
  return "?";
}

inline const char* impl_name(GemmImpl impl) { return impl == GemmImpl::kMkl ? "mkl" : "microkernel"; }

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

// The implementation for the GEMMs of `use` against w: the one LSTM_EXT_GEMM names (the
// microkernel by default), or with "auto" the one timed faster for this (role, m, n, k,
// dtype, threads) when first asked.
template <typename scalar_t>
GemmImpl select_gemm(const WeightOperand<scalar_t>& w, const GemmUse& use) {
  using namespace gemm_select_detail;
  const Key key{use.role, use.rows, w.n(), w.k(), c10::CppTypeToScalarType<scalar_t>::value, at::get_num_threads()};
  Table& t = table();
  {
    std::lock_guard<std::mutex> lock(t.mutex);
    if (auto it = t.choices.find(key); it != t.choices.end()) return it->second.impl;
  }
  Choice choice{GemmImpl::kMicrokernel, ""};
  const std::optional<GemmImpl> forced = forced_impl();
  bool mkl_usable = false;
  if constexpr (std::is_same_v<scalar_t, float>) mkl_usable = mkl_packed_gemm_available() && MklPackedWeight::fits(use.rows, w);
  if (!mkl_usable) {
    choice.reason = std::is_same_v<scalar_t, float> ? "MKL packed GEMM unavailable" : "no MKL packed GEMM for this dtype";
  } else if (forced) {
    const char* mode = std::getenv("LSTM_EXT_GEMM");
    choice = {*forced, mode != nullptr && *mode != '\0' ? "LSTM_EXT_GEMM" : "default"};
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    // Timed on the real weight and zero inputs of the real shape, into a scratch C.
    const PackedWeight<float> micro(w);
    const MklPackedWeight mkl(w, use.rows);
    const at::Tensor a = at::zeros({use.rows, w.k()}), c = at::zeros({use.rows, w.n()});
    const float* ap = a.data_ptr<float>();
    float* cp = c.data_ptr<float>();
    const auto [micro_s, mkl_s] = seconds_per_call(
        [&] { packed_gemm(use.rows, ap, w.k(), micro, 1, cp, w.n()); },
        [&] { mkl.compute(ap, w.k(), 1, cp, w.n()); });
    std::ostringstream why;
    why.precision(3);
    why << "timed: microkernel " << micro_s * 1e6 << " us, mkl " << mkl_s * 1e6 << " us";
    choice = {mkl_s < micro_s ? GemmImpl::kMkl : GemmImpl::kMicrokernel, why.str()};
  }
  std::lock_guard<std::mutex> lock(t.mutex);
  return t.choices.emplace(key, choice).first->second.impl;  // a concurrent first choice wins
}

// The table, one line per choice: "role dtype m=.. n=.. k=.. threads=..: impl (reason)".
inline std::string gemm_choices() {
  using namespace gemm_select_detail;
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mutex);
  std::ostringstream out;
  for (const auto& [key, choice] : t.choices) {
    const auto& [role, m, n, k, dtype, threads] = key;
    out << role_name(role) << ' ' << (dtype == at::kFloat ? "float32" : "float64") << " m=" << m << " n=" << n << " k=" << k
        << " threads=" << threads << ": " << impl_name(choice.impl) << " (" << choice.reason << ")\n";
  }
  return out.str();
}

}  // namespace lstm_ext
