// Entry points of the flash-attention kernels, callable from the torch-facing
// launcher (csrc/cuda/flash_attention.cpp). Each returns the CUDA error of its
// attribute setup or launch (cudaSuccess when fine); it never synchronises.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/common/dtype.h"
#include "cuda/flash/flash_params.h"

namespace tfkernels {
namespace flash {

// Element: __half or __nv_bfloat16; kHeadDim: a padded head dim (32, 64, ..., 256).
// Defined in flash_fwd_launch_template.h, instantiated once per
// flash_fwd_hdim<D>_<dtype>.cu file.
template <typename Element, int kHeadDim>
cudaError_t run_flash_fwd(const FwdParams& params, cudaStream_t stream);

// fp32 inputs, any head dim <= 256: a SIMT kernel that never rounds to 16 bits.
cudaError_t run_flash_fwd_fp32(const FwdParams& params, cudaStream_t stream);
// Its tile: query rows and keys (split-KV sizes its grid by them).
constexpr int kFwdFp32BlockM = 16;
constexpr int kFwdFp32BlockN = 32;

// ---------------------------------------------------------------- backward
// The launcher (csrc/cuda/flash_attention.cpp) runs, on one stream:
//   run_flash_bwd_preprocess (delta = rowsum(dO * O) - grad_lse, any dtype),
//   then run_flash_bwd<Element, D> (16-bit) or run_flash_bwd_fp32, and in the
//   16-bit default (non-deterministic) mode run_flash_bwd_convert_dq.
cudaError_t run_flash_bwd_preprocess(const BwdParams& params, cuda::DType dtype, cudaStream_t stream);

// dq = dq_accum * scale rounded to the 16-bit dtype; both contiguous
// [B,H,Sq,head_dim].
cudaError_t run_flash_bwd_convert_dq(const BwdParams& params, cuda::DType dtype, cudaStream_t stream);

// Defined in flash_bwd_launch_template.h, instantiated once per
// flash_bwd_hdim<D>_<dtype>.cu file. Deterministic mode writes dq itself;
// otherwise dq_accum (zeroed by the caller) receives atomics.
template <typename Element, int kHeadDim>
cudaError_t run_flash_bwd(const BwdParams& params, cudaStream_t stream);

// fp32, any head dim <= 256: SIMT kernels, always deterministic (no atomics);
// writes dq, dk, dv directly (dq_accum unused).
cudaError_t run_flash_bwd_fp32(const BwdParams& params, cudaStream_t stream);

// ---------------------------------------------------------------- split-KV (kvcache)
// After run_flash_fwd(_fp32) with params.num_splits > 1 (split_kv.h): out (any
// dtype, params' strides) and lse from the splits' o_accum / lse_accum, the sink
// added once. (The kvcache append kernel is declared in kvcache_append.h.)
cudaError_t run_flash_fwd_split_combine(const FwdParams& params, cuda::DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------- dropout (tests)
// The keep mask [B,H,Sq,Sk] (bool, contiguous) the kernels draw for rng_state
// (int64 [2] on the device) and dropout_p: the test-only op _dropout_mask.
cudaError_t run_dropout_mask(const int64_t* rng_state, bool* out, int batch, int heads, int seqlen_q, int seqlen_k,
                             float dropout_p, cudaStream_t stream);

}  // namespace flash
}  // namespace tfkernels
