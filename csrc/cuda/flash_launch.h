// What the torch-facing flash-attention launchers share (flash_attention.cpp, the
// padded op; flash_kvcache.cpp, the KV-cache op): the stride convention of the
// params block, window bounds, and the choice and launch of the forward kernel
// for a dtype and head dim on the current device. Host code with torch headers.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/flash/flash_params.h"

namespace tfkernels {
namespace flash_launch {

// The stride of a dim that is only ever indexed with 0 does not matter; pass 0 so
// that huge or odd strides of size-1 dims never enter the address arithmetic.
int64_t stride_of(const at::Tensor& t, int64_t d);

// A window bound as the kernels take it: -1 (unbounded) or a value clamped to
// Sq + Sk, past which every bound is as good as none (mask.h).
int window_bound(int64_t w, int64_t seqlen_q, int64_t seqlen_k);

// TFK_HEADDIM_SWITCH's answer for a head dim whose instantiation a
// TFKERNELS_HEAD_DIMS build left out: a clear error.
cudaError_t head_dim_not_built(int64_t head_dim, int padded);

// The padded head dim of the 16-bit forward instantiation that runs head_dim on
// the current device (the next larger one whose shared memory fits; clear error
// when none does).
int fwd_kernel_dim(int64_t head_dim);

// The forward kernel's tile (query rows, keys) for q's dtype and head dim.
struct FwdTile {
  int block_m, block_n;
};
FwdTile fwd_tile(at::ScalarType dtype, int64_t head_dim);

// Launches the forward kernel for q's dtype (fp32 SIMT, or fp16/bf16 tensor
// cores) on the current stream; raises on a launch error.
void launch_flash_fwd(const flash::FwdParams& p, at::ScalarType dtype);

}  // namespace flash_launch
}  // namespace tfkernels
