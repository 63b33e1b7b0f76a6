// Launch of the 16-bit forward kernel for one (Element, head dim) pair. Included
// only by the generated flash_fwd_hdim<D>_<dtype>.cu files, each of which
// instantiates run_flash_fwd<Element, D> once, so ninja builds them in parallel.
//
// Tuning notes (to be measured on the GPU; see kernel_traits.h FwdConfig):
// 128-row query tiles with 8 warps share every K/V tile among 128 rows; the grid
// is (ceil(Sq / 128), H, B) with blockIdx.x fastest so the blocks of one head
// run together and K/V stay in L2.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/common/smem_opt_in.h"
#include "cuda/flash/flash_api.h"
#include "cuda/flash/flash_fwd_kernel.h"
#include "cuda/flash/kernel_traits.h"

namespace tfkernels {
namespace flash {

template <typename Element, int kHeadDim>
cudaError_t run_flash_fwd(const FwdParams& params, cudaStream_t stream) {
  using Traits = typename FwdConfig<kHeadDim>::Traits;
  auto kernel = &flash_fwd_kernel<Traits, Element>;
  constexpr int kSmem = Traits::kSmemBytes;
  static cuda::DynamicSmemOptIn opt_in;  // one per instantiation
  const cudaError_t err = opt_in.apply(kernel, kSmem);
  if (err != cudaSuccess) return err;
  // Split-KV (split_kv.h): num_splits blocks per query tile, side by side in x.
  const int splits = params.num_splits > 1 ? params.num_splits : 1;
  const dim3 grid((params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM * splits, params.heads, params.batch);
  kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace flash
}  // namespace tfkernels
