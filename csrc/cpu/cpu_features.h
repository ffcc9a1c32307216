// What the CPU can run, read once from CPUID (false off x86): the facts behind the run-time
// choices of gemm_select.h and packed_gemm.h.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace lstm_ext {

// The vendor: the libraries' kernels, and the rate of some instructions, differ by it.
inline bool cpu_is_intel() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
#else
  return false;
#endif
}

// Whether CPUID leaf 7 has all of `ebx_bits` and `edx_bits` and the OS saves the register
// state of XCR0's `xcr0_bits`: what oneDNN needs before it runs a kernel with those
// instructions.
inline bool cpu_has_leaf7(unsigned ebx_bits, unsigned edx_bits, unsigned xcr0_bits) {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || (b & ebx_bits) != ebx_bits || (d & edx_bits) != edx_bits) {
    return false;
  }
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE: xgetbv runs
  unsigned xcr0_low = 0, xcr0_high = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
  return (xcr0_low & xcr0_bits) == xcr0_bits;
#else
  return false;
#endif
}

// XCR0's AVX-512 state: SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM.
constexpr unsigned kXcr0Avx512 = 0xe6u;

// AMX-BF16 (EDX bit 22) with the tile state (XCR0 bits 17 and 18), as oneDNN needs to run
// its bfloat16 GEMMs on AMX.
inline bool cpu_has_amx_bf16() {
  static const bool amx = cpu_has_leaf7(0, 1u << 22, 3u << 17);
  return amx;
}

// AVX512-FP16 (EDX bit 23). (__builtin_cpu_supports("avx512fp16") of GCC 12 said no on a
// CPU that has it.)
inline bool cpu_has_avx512_fp16() {
  static const bool fp16 = cpu_has_leaf7(0, 1u << 23, kXcr0Avx512);
  return fp16;
}

// AVX-512 F, DQ, BW and VL (EBX bits 16, 17, 30, 31): oneDNN's avx512_core.
inline bool cpu_has_avx512_core() {
  static const bool core = cpu_has_leaf7((1u << 16) | (1u << 17) | (1u << 30) | (1u << 31), 0, kXcr0Avx512);
  return core;
}

// AVX-512 BF16 (vdpbf16ps).
inline bool cpu_has_avx512_bf16() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool bf16 = __builtin_cpu_supports("avx512bf16") != 0;
  return bf16;
#else
  return false;
#endif
}

}  // namespace lstm_ext
