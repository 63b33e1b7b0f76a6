// Entry points of the flash-attention kernels, callable from the torch-facing
// launcher (csrc/cuda/flash_attention.cpp). Each returns the CUDA error of its
// attribute setup or launch (cudaSuccess when fine); it never synchronises.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

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

}  // namespace flash
}  // namespace tfkernels
