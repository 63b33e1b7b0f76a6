// Torch-side helpers shared by the launchers of the GEMM core (fused_qkv.cpp,
// mlp.cpp): the TF32 switch, the tile override, the 16-byte conditions that choose
// between the tensor-core and the generic kernel, and the DeviceConfig every entry
// point takes. Host code with torch headers: only for .cpp launchers, never for .cu
// kernel files.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Context.h>

#include <cstdlib>
#include <cstring>

#include "args.h"
#include "cuda/common/device_context.h"
#include "cuda/common/launcher_utils.h"
#include "cuda/gemm/gemm_params.h"

namespace tfkernels {
namespace gemm {

// torch.backends.cuda.matmul.allow_tf32 (also set by
// torch.set_float32_matmul_precision("high"/"medium")): the same switch cuBLAS obeys.
inline bool tf32_allowed() { return at::globalContext().allowTF32CuBLAS(); }

// TFKERNELS_GEMM_TILE=128x256|128x128|64x128 forces the tensor-core tile shape
// (tests cover every shape with it; benchmarks compare them). Unset: the heuristic.
// The values are tile_size.h's TileShape.
inline int tile_override() {
  const char* v = std::getenv("TFKERNELS_GEMM_TILE");
  if (v == nullptr || *v == '\0') return -1;
  if (std::strcmp(v, "128x256") == 0) return 0;
  if (std::strcmp(v, "128x128") == 0) return 1;
  if (std::strcmp(v, "64x128") == 0) return 2;
  TORCH_CHECK(false, "tfkernels: TFKERNELS_GEMM_TILE must be 128x256, 128x128 or 64x128, got \"", v, "\"");
}

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
inline bool chunks_ok(const at::Tensor& m) { return m.size(1) % 8 == 0 && cuda::aligned16(m); }

// fp32, bf16 or fp16 on a CUDA device (the GEMM core's dtypes).
inline void check_cuda_dtype(const at::Tensor& x, const char* name) {
  check_dtype_in(x, name, {at::kFloat, at::kBFloat16, at::kHalf});
  device::check_on_device(x, name);
}

// The current device's configuration for a GEMM on `dtype` operands, vector_ok the
// launcher's verdict on the 16-byte conditions.
inline DeviceConfig device_config(at::ScalarType dtype, bool vector_ok) {
  DeviceConfig c;
  c.vector_ok = vector_ok;
  c.tf32 = dtype == at::kFloat && tf32_allowed();
  c.num_sms = device::num_sms();
  c.max_smem = static_cast<size_t>(device::max_smem_per_block());
  c.tile_override = tile_override();
  return c;
}

}  // namespace gemm
}  // namespace tfkernels
