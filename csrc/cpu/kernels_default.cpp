// The CPU backend for any CPU: the build's baseline instruction set (x86-64: SSE2).
// kernels_prologue.h explains the wrapper.
#include "kernels_prologue.h"

#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include <ATen/cpu/vec/vec.h>

namespace lstm_ext_default {
#include "lstm_cpu.cpp"
}  // namespace lstm_ext_default

const lstm_ext_cpu::Capability lstm_ext_cpu::kDefault{"default", &lstm_ext_default::lstm_ext::register_cpu_kernels,
                                                      &lstm_ext_default::lstm_ext::gemm_choices};
