// Launch API of the bias-GELU CUDA kernels: plain C++ params structs that cross
// between the torch-facing launcher (csrc/cuda/bias_gelu.cpp, compiled by the host
// compiler) and the kernels (bias_gelu_kernel.cu, compiled by nvcc with CUDA
// headers only). Tensors arrive as raw pointers to contiguous [rows, cols] data.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/common/dtype.h"

namespace tfkernels {
namespace bias_gelu {

// out[r, c] = gelu(x[r, c] + bias[c]).
struct BiasGeluParams {
  const void* x;
  const void* bias;
  void* out;
  int64_t rows;
  int64_t cols;
  cuda::DType dtype;
  bool tanh;  // approximate="tanh" (else the erf form)
};

// grad_x[r, c] = grad_out[r, c] * gelu'(x[r, c] + bias[c]);
// grad_bias[c] = sum_r grad_x[r, c], accumulated in float, in a fixed order.
struct BiasGeluBwdParams {
  const void* grad_out;
  const void* x;
  const void* bias;
  void* grad_x;
  void* grad_bias;
  // float [bias_gelu_bwd_workspace_elems(params)] of per-row-chunk partial sums;
  // may be null when that size is 0.
  float* workspace;
  int64_t rows;
  int64_t cols;
  cuda::DType dtype;
  bool tanh;
};

// Floats of workspace the backward needs for these params (pointers included:
// alignment picks the vector width, which picks the tiling). 0 means none.
int64_t bias_gelu_bwd_workspace_elems(const BiasGeluBwdParams& params);

// Enqueue on `stream`; return the launch status (cudaGetLastError), never sync.
// rows * cols must be > 0.
cudaError_t launch_bias_gelu(const BiasGeluParams& params, cudaStream_t stream);
cudaError_t launch_bias_gelu_bwd(const BiasGeluBwdParams& params, cudaStream_t stream);

}  // namespace bias_gelu
}  // namespace tfkernels
