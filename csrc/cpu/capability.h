// The CPU backend (lstm_cpu.cpp) is compiled once per instruction set ("capability"), by
// the wrapper files kernels_default.cpp, kernels_avx2.cpp and kernels_avx512.cpp; dispatch.cpp registers the
// kernels of the one this CPU runs. See kernels_prologue.h for how the wrappers keep the
// two compilations apart.
#pragma once

#include <torch/library.h>

#include <string>

namespace lstm_ext_cpu {

// What a wrapper exports of its compilation of lstm_cpu.cpp.
struct Capability {
  const char* name;                            // as LSTM_EXT_CPU_CAPABILITY spells it
  void (*register_kernels)(torch::Library&);   // lstm_cpu.cpp's register_cpu_kernels; null if not built
  std::string (*gemm_choices)();                // gemm_select.h's report, of this compilation's table
};

extern const Capability kDefault;  // kernels_default.cpp: the x86-64 (or other) baseline
extern const Capability kAvx2;     // kernels_avx2.cpp: AVX2 + FMA + F16C, x86 only
extern const Capability kAvx512;   // kernels_avx512.cpp: AVX-512 F/BW/VL/DQ + FMA + F16C, x86 only

// The capability this process runs, chosen when first asked (dispatch.cpp).
const Capability& selected();

}  // namespace lstm_ext_cpu
