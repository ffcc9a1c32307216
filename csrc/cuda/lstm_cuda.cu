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

#include "../cells.h"
#include "../layer_ops.h"

namespace lstm_ext {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

// One thread per (row, hidden unit) element, grid-stride; the Cell's math in the opmath type.
template <class Cell, class StepT>
__global__ void pointwise_kernel(StepT s) {
  using scalar_t = typename StepT::scalar_type;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = s.hidden;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < s.rows * H;
       e += int64_t(gridDim.x) * blockDim.x) {
    run_cell(Element<Cell, acc_t, ScalarLane<acc_t, scalar_t>, StepT>{s, e / H, e % H});
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
  // Makes x's device current for the op.
  using DeviceGuard = c10::cuda::CUDAGuard;

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

  // A no_grad forward's blocks of steps (layer_ops.h's plan_forward), as on the CPU.
  static int64_t inference_block_bytes(at::ScalarType /*dtype*/) { return int64_t{512} << 10; }

  // All rows in one block: each step's kernels already cover the whole batch.
  template <typename scalar_t, class Fn>
  static void for_each_row_block(const CudaWeight<scalar_t>& /*w*/, int64_t rows, const Fn& fn) {
    fn(0, rows);
  }

  // Runs Cell on every element of a ForwardStep or BackwardStep.
  template <class Cell, class StepT>
  static void pointwise(const StepT& s) {
    pointwise_kernel<Cell><<<blocks_for(s.rows * s.hidden), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // The recurrent GEMM (cuBLAS) and the cell kernel stay two launches.
  template <class Cell, typename scalar_t>
  static bool recurrent_step(const CudaWeight<scalar_t>& /*w*/, const scalar_t* /*a_carry*/,
                             const scalar_t* /*a_start*/, int64_t /*lda*/, const ForwardStep<scalar_t>& /*step*/) {
    return false;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(lstm_ext, CUDA, m) {
  m.impl("lstm_forward", &lstm_forward<CudaBackend>);
  m.impl("lstm_inference", &lstm_inference<CudaBackend>);
  m.impl("lstm_backward", &lstm_backward<CudaBackend>);
  m.impl("rnn_forward", &rnn_forward<CudaBackend>);
  m.impl("rnn_inference", &rnn_inference<CudaBackend>);
  m.impl("rnn_backward", &rnn_backward<CudaBackend>);
}

}  // namespace lstm_ext
