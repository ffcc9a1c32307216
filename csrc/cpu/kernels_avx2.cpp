// The CPU backend for x86 CPUs with AVX2, FMA and F16C; dispatch.cpp runs it only on
// those. kernels_prologue.h explains the wrapper and why it is ODR-safe.
#include "kernels_prologue.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// The pragma does not define __AVX__ and __AVX2__ (GCC's C++ front end reads all the
// macros before the pragmas), and sleef.h declares its 256-bit functions, which ATen's
// AVX2 vectors call, only under __AVX__: include it with that macro set for it alone.
#define SLEEF_STATIC_LIBS
#define __AVX__ 1
#include <sleef.h>
#undef __AVX__
#include <ATen/cpu/vec/vec.h>

namespace lstm_ext_avx2 {
#include "lstm_cpu.cpp"
}  // namespace lstm_ext_avx2

#pragma GCC pop_options

const lstm_ext_cpu::Capability lstm_ext_cpu::kAvx2{"avx2", &lstm_ext_avx2::lstm_ext::register_cpu_kernels,
                                                   &lstm_ext_avx2::lstm_ext::gemm_choices};

#else  // not x86, or clang (no GCC target pragma): never selected

const lstm_ext_cpu::Capability lstm_ext_cpu::kAvx2{"avx2", nullptr, nullptr};

#endif
