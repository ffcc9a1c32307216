// CUDA backend: per-step GEMMs call cuBLAS directly on the current stream and handle,
// and the pointwise cell kernels run one thread per (row, unit), the shared gate math in
// float (the opmath type of half and bfloat16) or double.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

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

// cuBLAS data and compute types of a scalar type (alpha and beta are its opmath type).
// Half and bfloat16 accumulate in float (CUBLAS_COMPUTE_32F); float32 uses TF32 tensor
// cores only where torch.backends.cuda.matmul.allow_tf32 allows them.
template <typename scalar_t>
struct CublasTypes;
template <>
struct CublasTypes<double> {
  static constexpr cudaDataType_t data = CUDA_R_64F;
  static cublasComputeType_t compute(bool /*tf32*/) { return CUBLAS_COMPUTE_64F; }
};
template <>
struct CublasTypes<float> {
  static constexpr cudaDataType_t data = CUDA_R_32F;
  static cublasComputeType_t compute(bool tf32) { return tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F; }
};
template <>
struct CublasTypes<at::Half> {
  static constexpr cudaDataType_t data = CUDA_R_16F;
  static cublasComputeType_t compute(bool /*tf32*/) { return CUBLAS_COMPUTE_32F; }
};
template <>
struct CublasTypes<at::BFloat16> {
  static constexpr cudaDataType_t data = CUDA_R_16BF;
  static cublasComputeType_t compute(bool /*tf32*/) { return CUBLAS_COMPUTE_32F; }
};

// A weight operand with what its GEMMs need from torch, looked up once per weight and op
// call (prepare) so that a step costs one cuBLAS call and no torch call.
template <typename scalar_t>
struct CudaWeight {
  WeightOperand<scalar_t> operand;
  cublasHandle_t handle;  // the current thread's handle, bound to the current stream
  cublasComputeType_t compute;
};

inline int as_int(int64_t v) {
  TORCH_CHECK(v <= INT_MAX, "lstm_ext: GEMM dimension ", v, " exceeds cuBLAS's int range");
  return static_cast<int>(v);
}

struct CudaBackend {
  template <typename scalar_t>
  static CudaWeight<scalar_t> prepare(const WeightOperand<scalar_t>& w, const GemmUse& /*use*/) {
    // getCurrentCUDABlasHandle binds the handle to the current stream (and sets its math
    // mode from the same allowTF32CuBLAS flag); the op runs on that stream throughout.
    return {w, at::cuda::getCurrentCUDABlasHandle(),
            CublasTypes<scalar_t>::compute(at::globalContext().allowTF32CuBLAS())};
  }

  // Row-major C (m x n) = A (m x k) op(W) + beta * C. cuBLAS is column-major, and a
  // row-major (r x c) matrix with leading dimension ld is, read column-major, its
  // transpose (c x r) with the same ld. So compute C^T (n x m) = op(W)^T (n x k) A^T (k x m):
  //   op(W)^T: W's memory read column-major is W^T (cols x rows, ld cols); op(W) = W^T
  //     (transposed) needs W = (W^T)^T, i.e. CUBLAS_OP_T; op(W) = W needs W^T as stored,
  //     CUBLAS_OP_N. Either way lda = W.cols.
  //   A^T: A's memory as stored, CUBLAS_OP_N, ldb = lda.   C^T: as stored, ldc = ldc.
  // This is the CPU backend's column_major_gemm call, on cuBLAS.
  template <typename scalar_t>
  static void gemm(int64_t m, const scalar_t* a, int64_t lda, const CudaWeight<scalar_t>& w, float beta,
                   scalar_t* c, int64_t ldc) {
    const WeightOperand<scalar_t>& op = w.operand;
    if (m == 0 || op.n() == 0) return;
    if (op.k() == 0) {
      // An empty product: C = beta * C (beta is 0 or 1 here). cuBLAS would reject the
      // zero leading dimensions of empty operands.
      if (beta == 0) {
        C10_CUDA_CHECK(cudaMemset2DAsync(c, ldc * sizeof(scalar_t), 0, op.n() * sizeof(scalar_t), m,
                                          c10::cuda::getCurrentCUDAStream()));
      }
      return;
    }
    using acc_t = at::opmath_type<scalar_t>;  // alpha and beta: double for float64, else float
    const acc_t alpha_v = 1, beta_v = beta;
    constexpr cudaDataType_t type = CublasTypes<scalar_t>::data;
    TORCH_CUDABLAS_CHECK(cublasGemmEx(w.handle, op.transposed ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N,
                                      as_int(op.n()), as_int(m), as_int(op.k()), &alpha_v, op.data, type,
                                      as_int(op.cols), a, type, as_int(lda), &beta_v, c, type, as_int(ldc),
                                      w.compute, CUBLAS_GEMM_DEFAULT));
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
