// CUDA backend: per-step GEMMs through ATen (cuBLAS on the current stream) and the
// pointwise cell kernels, one thread per (row, unit), running the shared gate math in
// float (the opmath type of half and bfloat16) or double.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cell_math.h"
#include "../lstm_layer.h"

namespace lstm_ext {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

template <typename scalar_t>
__global__ void cell_forward_kernel(ForwardStep<scalar_t> s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = s.hidden;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < s.rows * H;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / H, j = e % H;
    scalar_t* g = s.gates + b * 4 * H;
    const scalar_t* c_prev = (b < s.n_carry ? s.c_carry : s.c0) + b * H;
    const scalar_t* bias = s.bias;
    auto pre = [&](int64_t k) { return acc_t(g[k]) + acc_t(bias[k]); };
    const auto r = cell_forward<acc_t>(pre(j), pre(H + j), pre(2 * H + j), pre(3 * H + j), c_prev[j]);
    g[j] = r.i;
    g[H + j] = r.f;
    g[2 * H + j] = r.g;
    g[3 * H + j] = r.o;
    s.c_out[e] = r.c;
    s.h_out[e] = r.h;
  }
}

template <typename scalar_t>
__global__ void cell_backward_kernel(BackwardStep<scalar_t> s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = s.hidden;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < s.rows * H;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / H, j = e % H;
    const scalar_t* g = s.gates + b * 4 * H;
    const scalar_t* c_prev = (b < s.n_carry ? s.c_carry : s.c0) + b * H;
    scalar_t* dg = s.d_gates + b * 4 * H;
    const auto r = cell_backward<acc_t>(g[j], g[H + j], g[2 * H + j], g[3 * H + j], s.c[e], c_prev[j],
                                        s.dh[e], s.dc[e]);
    dg[j] = r.d_i;
    dg[H + j] = r.d_f;
    dg[2 * H + j] = r.d_g;
    dg[3 * H + j] = r.d_o;
    s.dc[e] = r.dc_prev;
  }
}

struct CudaBackend {
  template <typename scalar_t>
  static WeightOperand<scalar_t> prepare(const WeightOperand<scalar_t>& w, int64_t /*steps*/) {
    return w;
  }

  template <typename scalar_t>
  static void gemm(int64_t m, const scalar_t* a, int64_t lda, const WeightOperand<scalar_t>& w, float beta,
                   scalar_t* c, int64_t ldc) {
    if (m == 0 || w.n() == 0) return;
    // cuBLAS itself is not exported to extensions by every torch build; ATen's is.
    const c10::Device device(c10::kCUDA, c10::cuda::current_device());
    aten_gemm(device, m, a, lda, w, beta, c, ldc);
  }

  static Tensor weight_grad(const Tensor& dg, const Tensor& a) { return at::mm(dg.t(), a); }

  template <typename scalar_t>
  static void cell_forward(const ForwardStep<scalar_t>& s) {
    cell_forward_kernel<scalar_t><<<blocks_for(s.rows * s.hidden), kThreads, 0,
                                    c10::cuda::getCurrentCUDAStream()>>>(s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  static void cell_backward(const BackwardStep<scalar_t>& s) {
    cell_backward_kernel<scalar_t><<<blocks_for(s.rows * s.hidden), kThreads, 0,
                                     c10::cuda::getCurrentCUDAStream()>>>(s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_cuda(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
    bool reverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lstm_forward<CudaBackend>(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
}

std::tuple<Tensor, Tensor, Tensor> lstm_inference_cuda(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
    bool reverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lstm_inference<CudaBackend>(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_cuda(
    const OptTensor& grad_y, const OptTensor& grad_hn, const OptTensor& grad_cn, const Tensor& x,
    const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& w_hr,
    const OptTensor& batch_sizes, bool reverse, const Tensor& y, const Tensor& gates,
    const Tensor& cells, const Tensor& hidden, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lstm_backward<CudaBackend>(grad_y, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes,
                                    reverse, y, gates, cells, hidden, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_ext, CUDA, m) {
  m.impl("lstm_forward", &lstm_forward_cuda);
  m.impl("lstm_inference", &lstm_inference_cuda);
  m.impl("lstm_backward", &lstm_backward_cuda);
}

}  // namespace lstm_ext
