// Launch of the 16-bit backward kernels for one (Element, head dim) pair.
// Included only by the generated flash_bwd_hdim<D>_<dtype>.cu files, each of
// which instantiates run_flash_bwd<Element, D> once.
//
// Order on the stream (the launcher runs the first and last steps):
//   flash_bwd_preprocess (delta), [default: dq_accum zeroed by the launcher]
//   flash_bwd_dkdv_kernel  grid (ceil(Sk / 64), Hkv, B); default mode also adds
//                          dS K into dq_accum with fp32 atomics
//   deterministic:  flash_bwd_dq_kernel grid (ceil(Sq / 64), H, B) writes dQ
//   default:        flash_bwd_convert_dq (dQ = scale-free accumulator -> dtype)
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/common/smem_opt_in.h"
#include "cuda/flash/flash_api.h"
#include "cuda/flash/flash_bwd_kernel.h"
#include "cuda/flash/kernel_traits.h"

namespace tfkernels {
namespace flash {

template <typename Element, int kHeadDim>
cudaError_t run_flash_bwd(const BwdParams& params, cudaStream_t stream) {
  using Traits = typename BwdConfig<kHeadDim>::Traits;
  constexpr int kSmem = Traits::kSmemBytes;
  auto dkdv = &flash_bwd_dkdv_kernel<Traits, Element>;
  auto dq = &flash_bwd_dq_kernel<Traits, Element>;
  static cuda::DynamicSmemOptIn opt_in_dkdv;  // one per instantiation
  static cuda::DynamicSmemOptIn opt_in_dq;
  cudaError_t err = opt_in_dkdv.apply(dkdv, kSmem);
  if (err != cudaSuccess) return err;
  err = opt_in_dq.apply(dq, kSmem);
  if (err != cudaSuccess) return err;
  if (params.seqlen_k > 0) {
    const dim3 grid((params.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, params.kv_heads, params.batch);
    dkdv<<<grid, Traits::kNThreads, kSmem, stream>>>(params);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (params.deterministic && params.seqlen_q > 0) {
    const dim3 grid((params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, params.heads, params.batch);
    dq<<<grid, Traits::kNThreads, kSmem, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace flash
}  // namespace tfkernels
