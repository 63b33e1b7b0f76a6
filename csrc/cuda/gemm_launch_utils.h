// Torch-side helpers shared by the launchers of the GEMM core (fused_qkv.cpp,
// mlp.cpp): the TF32 switch, the tile override, the 16-byte alignment tests that
// choose between the tensor-core and the generic kernel, device properties, and the
// dtype dispatch to the per-dtype entry points. Host code with torch headers: only
// for .cpp launchers, never for .cu kernel files.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "args.h"
#include "cuda/common/device_context.h"

namespace tfkernels {
namespace gemm_launch {

// The GEMM core indexes rows, columns and the reduction dim with int.
constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();

// torch.backends.cuda.matmul.allow_tf32 (also set by
// torch.set_float32_matmul_precision("high"/"medium")): the same switch cuBLAS obeys.
inline bool tf32_allowed() { return at::globalContext().allowTF32CuBLAS(); }

// TFKERNELS_GEMM_TILE=128x256|128x128|64x128 forces the tensor-core tile shape
// (tests cover every shape with it; benchmarks compare them). Unset: the heuristic.
// The values are gemm_traits.h's TileShape.
inline int tile_override() {
  const char* v = std::getenv("TFKERNELS_GEMM_TILE");
  if (v == nullptr || *v == '\0') return -1;
  if (std::strcmp(v, "128x256") == 0) return 0;
  if (std::strcmp(v, "128x128") == 0) return 1;
  if (std::strcmp(v, "64x128") == 0) return 2;
  TORCH_CHECK(false, "tfkernels: TFKERNELS_GEMM_TILE must be 128x256, 128x128 or 64x128, got \"", v, "\"");
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A stride matters only along a dimension of size > 1; there it must keep every
// 8-element chunk 16-byte aligned for the tensor-core path.
inline bool stride_ok(int64_t size, int64_t stride) { return size <= 1 || stride % 8 == 0; }

// t with its last dim contiguous (a copy only when it is not).
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// t [..., cols] as a 2-D [rows, cols] matrix with unit column stride: a view whenever
// torch can make one (any row stride, including 0 for expanded gradients), a copy
// otherwise.
inline at::Tensor as_rows(const at::Tensor& t, int64_t rows, int64_t cols) {
  return last_dim_contiguous(t.reshape({rows, cols}));
}

// A row-major 2-D matrix (unit column stride) can be read or written in 16-byte
// chunks of 8 elements: the tensor-core path's condition on every operand and
// epilogue buffer. Holds for fresh contiguous 16-bit tensors whose width is a
// multiple of 8 (the caching allocator aligns blocks to 512 bytes).
inline bool chunks_ok(const at::Tensor& m) {
  return m.size(1) % 8 == 0 && aligned16(m.data_ptr()) && stride_ok(m.size(0), m.stride(0));
}

// fp32, bf16 or fp16 on a CUDA device (the GEMM core's dtypes).
inline void check_cuda_dtype(const at::Tensor& x, const char* name) {
  check_dtype_in(x, name, {at::kFloat, at::kBFloat16, at::kHalf});
  device::check_on_device(x, name);
}

// The fields every core entry point's arguments carry (QkvFwdArgs, QkvBwdArgs,
// MlpGemmArgs): TF32 for fp32 inputs, SM count and smem limit of the current device,
// and the tile override.
template <class Args>
void set_device_fields(Args& a, at::ScalarType dtype) {
  a.tf32 = dtype == at::kFloat && tf32_allowed();
  a.num_sms = device::num_sms();
  a.max_smem = device::max_smem_per_block();
  a.tile_override = tile_override();
}

// Calls the entry point for `dtype` (fp16, bf16, else fp32) on the current stream and
// turns a launch error into an exception. No synchronisation.
template <class Args>
void launch_by_dtype(at::ScalarType dtype, const Args& a, cudaError_t (*f16)(const Args&, cudaStream_t),
                     cudaError_t (*bf16)(const Args&, cudaStream_t), cudaError_t (*f32)(const Args&, cudaStream_t)) {
  const cudaStream_t stream = device::current_stream();
  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case at::kHalf: err = f16(a, stream); break;
    case at::kBFloat16: err = bf16(a, stream); break;
    default: err = f32(a, stream); break;
  }
  TFKERNELS_CHECK_LAUNCH(err);
}

}  // namespace gemm_launch
}  // namespace tfkernels
