// The CPU backend for x86 CPUs with AVX-512 (F, BW, VL, DQ), FMA and F16C; dispatch.cpp
// runs it only on those. kernels_prologue.h explains the wrapper and why it is ODR-safe.
// packed_gemm.h's bfloat16 microkernel also needs AVX-512 BF16: it adds that by a function
// attribute, and runs only on weights packed for it, where the CPU has it (bf16_kernel).
#include "kernels_prologue.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)

#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// As in kernels_avx2.cpp: sleef.h declares its 512-bit functions only under __AVX512F__,
// which the pragma does not define.
#define SLEEF_STATIC_LIBS
#define __AVX__ 1
#define __AVX512F__ 1
#include <sleef.h>
#undef __AVX512F__
#undef __AVX__
#include <ATen/cpu/vec/vec.h>

namespace lstm_ext_avx512 {
#include "lstm_cpu.cpp"
}  // namespace lstm_ext_avx512

#pragma GCC pop_options

const lstm_ext_cpu::Capability lstm_ext_cpu::kAvx512{"avx512", &lstm_ext_avx512::lstm_ext::register_cpu_kernels,
                                                     &lstm_ext_avx512::lstm_ext::gemm_choices};

#else  // not x86, or clang (no GCC target pragma): never selected

const lstm_ext_cpu::Capability lstm_ext_cpu::kAvx512{"avx512", nullptr, nullptr};

#endif
