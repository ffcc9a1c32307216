// Registers the CPU kernels of one capability (capability.h), chosen when the extension
// loads:
//   LSTM_EXT_CPU_CAPABILITY=default|avx2|avx512 picks one (avx2 only where the CPU has AVX2,
//     FMA and F16C, avx512 only where it also has AVX-512 F/BW/VL/DQ: elsewhere it warns
//     and runs the best the CPU has);
//   otherwise lstm_ext follows ATen (at::get_cpu_capability: the CPU's features, or
//     ATEN_CPU_CAPABILITY): avx512 where ATen runs AVX-512 kernels, avx2 where it runs
//     AVX2 ones, else default.
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

bool cpu_has_avx512() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  return kAvx512.register_kernels != nullptr && cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// The best capability this CPU and build run, at most `ceiling`.
const Capability& best_up_to(const Capability& ceiling) {
  if (&ceiling == &kAvx512 && cpu_has_avx512()) return kAvx512;
  if (&ceiling != &kDefault && cpu_has_avx2()) return kAvx2;
  return kDefault;
}

const Capability& choose() {
  if (const char* env = std::getenv("LSTM_EXT_CPU_CAPABILITY"); env != nullptr && *env != '\0') {
    const std::string wanted = env;
    for (const Capability* c : {&kDefault, &kAvx2, &kAvx512}) {
      if (wanted != c->name) continue;
      const Capability& runs = best_up_to(*c);
      if (&runs != c) {
        TORCH_WARN("lstm_ext: LSTM_EXT_CPU_CAPABILITY=", wanted, ", but this CPU or build has no ", wanted,
                   " kernels; using ", runs.name);
      }
      return runs;
    }
    TORCH_WARN("lstm_ext: ignoring invalid value for LSTM_EXT_CPU_CAPABILITY: '", wanted,
               "' (expected default, avx2 or avx512)");
  }
  const std::string aten = at::get_cpu_capability();
  return best_up_to(aten == "AVX512" ? kAvx512 : aten == "AVX2" ? kAvx2 : kDefault);
}

}  // namespace

const Capability& selected() {
  static const Capability& capability = choose();
  return capability;
}

}  // namespace lstm_ext_cpu

TORCH_LIBRARY_FRAGMENT(lstm_ext, m) {
  // The CPU kernels' instruction set: "default", "avx2" or "avx512".
  m.def("cpu_capability() -> str", [] { return std::string(lstm_ext_cpu::selected().name); });
  // The GEMM implementations chosen so far in this process (gemm_select.h), for benchmarks.
  m.def("gemm_choices() -> str", [] { return lstm_ext_cpu::selected().gemm_choices(); });
}

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) { lstm_ext_cpu::selected().register_kernels(m); }
