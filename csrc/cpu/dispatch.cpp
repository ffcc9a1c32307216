// Registers the CPU kernels of one capability (capability.h), chosen when the extension
// loads:
//   LSTM_EXT_CPU_CAPABILITY=default|avx2 picks one (avx2 only where the CPU has AVX2, FMA
//     and F16C: elsewhere it warns and runs default);
//   otherwise lstm_ext follows ATen (at::get_cpu_capability: the CPU's features, or
//     ATEN_CPU_CAPABILITY): avx2 where ATen runs AVX2 or AVX-512 kernels, else default.
// An unknown value is ignored with a warning, as ATen does with ATEN_CPU_CAPABILITY.
// torch.ops.lstm_ext.cpu_capability() says which one runs.
#include <ATen/Version.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "capability.h"

namespace lstm_ext_cpu {
namespace {

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  return kAvx2.register_kernels != nullptr && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const Capability& choose() {
  const bool avx2_runs = cpu_has_avx2();
  if (const char* env = std::getenv("LSTM_EXT_CPU_CAPABILITY"); env != nullptr && *env != '\0') {
    const std::string wanted = env;
    if (wanted == kDefault.name) return kDefault;
    if (wanted == kAvx2.name) {
      if (avx2_runs) return kAvx2;
      TORCH_WARN("lstm_ext: LSTM_EXT_CPU_CAPABILITY=avx2, but this CPU or build has no AVX2 kernels; using default");
      return kDefault;
    }
    TORCH_WARN("lstm_ext: ignoring invalid value for LSTM_EXT_CPU_CAPABILITY: '", wanted,
               "' (expected default or avx2)");
  }
  const std::string aten = at::get_cpu_capability();
  return avx2_runs && (aten == "AVX2" || aten == "AVX512") ? kAvx2 : kDefault;
}

}  // namespace

const Capability& selected() {
  static const Capability& capability = choose();
  return capability;
}

}  // namespace lstm_ext_cpu

TORCH_LIBRARY_FRAGMENT(lstm_ext, m) {
  // The CPU kernels' instruction set: "default" or "avx2".
  m.def("cpu_capability() -> str", [] { return std::string(lstm_ext_cpu::selected().name); });
  // The GEMM implementations chosen so far in this process (gemm_select.h), for benchmarks.
  m.def("gemm_choices() -> str", [] { return lstm_ext_cpu::selected().gemm_choices(); });
}

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) { lstm_ext_cpu::selected().register_kernels(m); }
