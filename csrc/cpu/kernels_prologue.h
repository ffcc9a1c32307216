// Included first by kernels_default.cpp, kernels_avx2.cpp and kernels_avx512.cpp, each of
// which then compiles the CPU backend (lstm_cpu.cpp and the headers it includes) for one
// instruction set. What follows says AVX2; kernels_avx512.cpp does the same for AVX-512
// (lstm_ext_avx512::, at::vec::AVX512, CPU_CAPABILITY_AVX512).
//
// How the AVX2 copy gets AVX2 code, and why the two copies cannot mix (ODR)
// --------------------------------------------------------------------------
// No compiler flag is added for the extension: the whole build stays at the x86-64
// baseline, so it loads and runs on any x86-64 CPU. kernels_avx2.cpp instead opens
// `#pragma GCC target("avx2,fma,f16c")` around its copy; every function *defined* after
// the pragma is compiled for AVX2, those defined before it are not, and a template
// instantiation takes the target of its template's definition, not of the place that
// instantiates it (checked with GCC 12: std::sort or a template defined before the
// pragma, instantiated inside it, has no VEX instruction).
//
// Inline functions and template instantiations are emitted in every object that uses them
// and the linker keeps one copy per mangled name, any one. So nothing compiled under the
// pragma may share a mangled name with code of another object, or the baseline path could
// end up calling the AVX2 copy (an illegal instruction on a CPU without AVX2). Hence:
//  * This file includes every external header the backend uses *before* the pragma: their
//    inline functions and templates (ATen, c10, torch/library.h, the standard library)
//    are compiled for the baseline in both wrappers, identically. Only ATen's vector
//    headers are included after it: they put all their code in the inline namespace
//    at::vec::CPU_CAPABILITY, which each wrapper names (DEFAULT, AVX2) before including
//    them, as ATen's own per-capability kernels do.
//  * Each wrapper includes lstm_cpu.cpp inside its own namespace (lstm_ext_default,
//    lstm_ext_avx2). Our headers are included for the first time there, so everything of
//    ours, the time loop and cells (layer_ops.h, cells.h, ...), vec_math.h, packed_gemm.h and
//    gemm_select.h included, becomes lstm_ext_avx2::lstm_ext::..., a name that no other
//    object defines (the CUDA file's copy of them is plain lstm_ext::...).
//    gemm_select.h's process-wide table is thus one per capability; dispatch.cpp reports
//    the selected one's.
//  * An external header first included inside that namespace would be nested into it and
//    fail to compile: a new external #include of lstm_cpu.cpp or of its headers belongs
//    here too (the build says so loudly, it cannot pass silently).
// tests/test_build.py checks the built library: every function with a VEX-encoded (AVX)
// instruction is in an AVX2 or AVX-512 namespace, and their microkernels use ymm and zmm.
//
// Note: under the pragma GCC (C++) does not define __AVX2__; the code tests
// CPU_CAPABILITY_AVX2, as ATen's vector headers do.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>  // before kernels_avx2.cpp sets __AVX__ for sleef.h
#include <x86intrin.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__unix__)
#include <unistd.h>  // sysconf
#endif

#include "capability.h"

// oneDNN's matmul as ATen runs it (torch's own libtorch_cpu exports it; no installed header
// declares it): result = alpha * mat1 mat2 + beta * result, any strides. Weak, so that a
// torch without it (or with another signature) leaves it null and gemm_select.h uses
// the BLAS instead. Declared here, outside the per-capability namespaces, so that it
// names ATen's function.
namespace at::native {
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                             float alpha) __attribute__((weak));
}  // namespace at::native

#if defined(CPU_CAPABILITY) || defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#error "CPU_CAPABILITY is set by each wrapper (kernels_*.cpp), not by the build"
#endif
