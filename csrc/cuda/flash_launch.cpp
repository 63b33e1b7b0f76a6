// Shared pieces of the flash-attention launchers (flash_launch.h).
#include "cuda/flash_launch.h"

#include <algorithm>

#include "cuda/common/device_context.h"
#include "cuda/common/dtype.h"
#include "cuda/common/launcher_utils.h"
#include "cuda/flash/flash_api.h"
#include "cuda/flash/kernel_traits.h"
#include "cuda/flash/static_switch.h"

namespace tfkernels {
namespace flash_launch {

int64_t stride_of(const at::Tensor& t, int64_t d) { return t.size(d) > 1 ? t.stride(d) : 0; }

int window_bound(int64_t w, int64_t seqlen_q, int64_t seqlen_k) {
  return static_cast<int>(w < 0 ? -1 : std::min<int64_t>(w, seqlen_q + seqlen_k));
}

cudaError_t head_dim_not_built(int64_t head_dim, int padded) {
  TORCH_CHECK(false, "tfkernels: head dim ", head_dim, " needs the flash-attention kernels for head dim ", padded,
              ", which this build left out (it was built with TFKERNELS_HEAD_DIMS restricting the head dims); "
              "rebuild with TFKERNELS_HEAD_DIMS unset or including ", padded);
  return cudaErrorInvalidValue;
}

int fwd_kernel_dim(int64_t head_dim) {
  // sm_80 and sm_90 give a block 163 and 227 KB of shared memory, enough for
  // every instantiation. sm_86/sm_89 give 99 KB: there the D = 128 tiles (102 KB)
  // do not fit, so a head dim runs on the next larger instantiation that does
  // (D <= 128 on the 160 kernel, 86 KB; its D tail is zero-filled like any
  // padded dim), and a dim with none left gets a clear error.
  const int64_t smem_limit = device::max_smem_per_block();
  const int padded = flash::padded_head_dim(static_cast<int>(head_dim));
  int kernel_dim = padded;
  while (kernel_dim <= kMaxHeadDim && flash::fwd_smem_bytes(kernel_dim) > smem_limit) kernel_dim += 32;
  TORCH_CHECK(kernel_dim <= kMaxHeadDim, "tfkernels: flash attention with head dim ", head_dim, " needs ",
              flash::fwd_smem_bytes(padded), " bytes of shared memory a block; this device allows ", smem_limit);
  return kernel_dim;
}

FwdTile fwd_tile(at::ScalarType dtype, int64_t head_dim) {
  if (dtype == at::kFloat) return FwdTile{flash::kFwdFp32BlockM, flash::kFwdFp32BlockN};
  const int kernel_dim = fwd_kernel_dim(head_dim);
  return FwdTile{flash::fwd_block_m(kernel_dim), flash::fwd_block_n(kernel_dim)};
}

void launch_flash_fwd(const flash::FwdParams& p, at::ScalarType dtype) {
  const cudaStream_t stream = device::current_stream();
  cudaError_t err = cudaSuccess;
  if (dtype == at::kFloat) {
    err = flash::run_flash_fwd_fp32(p, stream);
  } else {
    auto missing = [&](int padded) { return head_dim_not_built(p.head_dim, padded); };
    const int kernel_dim = fwd_kernel_dim(p.head_dim);
    err = cuda::dispatch_16bit(cuda::dtype_of(dtype), [&](auto tag) {
      using Element = typename decltype(tag)::type;
      return TFK_HEADDIM_SWITCH(kernel_dim, missing, [&] { return flash::run_flash_fwd<Element, kHeadDim>(p, stream); });
    });
  }
  TFKERNELS_CHECK_LAUNCH(err);
}

}  // namespace flash_launch
}  // namespace tfkernels
