// The small passes around the backward kernels:
//   flash_bwd_delta_kernel:      delta[b,h,i] = sum_d dO[i,d] O[i,d] (fp32) - grad_lse[b,h,i]
//                                (one warp a row; any batch/head/row strides)
//   flash_bwd_sink_grad_kernel:  grad_sinks[h] = -sum_{b,i} exp(sink_h - lse[b,h,i]) delta[b,h,i]
//                                (with sinks; one block a head, after the delta pass)
//   flash_bwd_convert_dq_kernel: dq = dq_accum * scale in the input dtype
//                                (16-bit default mode, after the atomics)
// Each treats every query row alike, so a packed varlen batch is one entry of
// total_q rows to them (AllRows, block_info.h): lse [H,total_q] is [1,H,total_q].
// Why grad_lse enters delta: d lse_i / d s_ij = P_ij, so the gradient through lse
// adds P_ij * grad_lse_i to dS_ij = P_ij (dP_ij - delta_i), which is the same as
// subtracting grad_lse_i from delta_i.
// Why the sink gradient is that sum: the sink is one more logit of every row's
// softmax with probability P_sink = exp(sink - lse) and no value, so its dS is
// P_sink (0 - delta_i); the sum over the rows of every batch of head h is a
// fixed-order block reduction (no atomics), deterministic in both modes and small
// next to the attention kernels (B * Sq reads a head).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/convert.h"
#include "cuda/common/dtype.h"
#include "cuda/common/ptx.h"
#include "cuda/flash/block_info.h"
#include "cuda/flash/flash_api.h"

namespace tfkernels {
namespace flash {

namespace {

constexpr int kDeltaWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kDeltaWarps * 32) flash_bwd_delta_kernel(const __grid_constant__ BwdParams p) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const AllRows all = AllRows::of(p);  // packed: one entry of total_q rows
  const int64_t rows = static_cast<int64_t>(all.batches) * p.heads * all.rows;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDeltaWarps + warp;
  if (row >= rows) return;
  const int i = static_cast<int>(row % all.rows);
  const int64_t bh = row / all.rows;
  const int h = static_cast<int>(bh % p.heads);
  const int b = static_cast<int>(bh / p.heads);
  const T* o = static_cast<const T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + i * p.o_row_stride;
  const T* d = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride + i * p.do_row_stride;
  float sum = 0.0f;
  for (int c = lane; c < p.head_dim; c += 32) sum = fmaf(cuda::to_float(o[c]), cuda::to_float(d[c]), sum);
  sum = cuda::group_sum<32>(sum);
  if (lane == 0) p.delta[row] = sum - (p.grad_lse != nullptr ? p.grad_lse[row] : 0.0f);
}

constexpr int kSinkThreads = 256;

__global__ void __launch_bounds__(kSinkThreads) flash_bwd_sink_grad_kernel(const __grid_constant__ BwdParams p) {
  constexpr float kNegInf = -__builtin_huge_valf();
  __shared__ float warp_sums[kSinkThreads / 32];
  const int head = blockIdx.x;
  const float sink = p.sinks[head];
  const AllRows all = AllRows::of(p);
  const int64_t rows = static_cast<int64_t>(all.batches) * all.rows;  // (b, i) of this head
  float sum = 0.0f;
  for (int64_t t = threadIdx.x; t < rows; t += kSinkThreads) {
    const int64_t b = t / all.rows;
    const int64_t idx = (b * p.heads + head) * all.rows + t % all.rows;
    const float p_sink = sink == kNegInf ? 0.0f : expf(sink - p.lse[idx]);
    sum = fmaf(p_sink, p.delta[idx], sum);
  }
  sum = cuda::group_sum<32>(sum);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kSinkThreads / 32; ++w) total += warp_sums[w];
    p.grad_sinks[head] = -total;
  }
}

template <typename T>
__global__ void flash_bwd_convert_dq_kernel(const float* __restrict__ acc, T* __restrict__ dq, int64_t n,
                                            float scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    dq[i] = cuda::from_float<T>(acc[i] * scale);
  }
}

}  // namespace

cudaError_t run_flash_bwd_preprocess(const BwdParams& params, cuda::DType dtype, cudaStream_t stream) {
  const AllRows all = AllRows::of(params);
  const int64_t rows = static_cast<int64_t>(all.batches) * params.heads * all.rows;
  if (rows == 0) return cudaSuccess;  // grad_sinks, if any, stays as allocated (zeros)
  const int64_t blocks = (rows + kDeltaWarps - 1) / kDeltaWarps;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  cuda::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    flash_bwd_delta_kernel<T><<<grid, kDeltaWarps * 32, 0, stream>>>(params);
  });
  if (params.sinks != nullptr) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    flash_bwd_sink_grad_kernel<<<params.heads, kSinkThreads, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

// 16-bit default mode only: the fp32 path writes dq directly.
cudaError_t run_flash_bwd_convert_dq(const BwdParams& params, cuda::DType dtype, cudaStream_t stream) {
  if (dtype == cuda::DType::kFloat32) return cudaErrorInvalidValue;
  // dq and dq_accum have one layout (contiguous [B,H,Sq,D] or [total_q,H,D]).
  const AllRows all = AllRows::of(params);
  const int64_t n = static_cast<int64_t>(all.batches) * params.heads * all.rows * params.head_dim;
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > 65536) blocks = 65536;  // grid-stride beyond
  const dim3 grid(static_cast<unsigned>(blocks));
  cuda::dispatch_16bit(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    flash_bwd_convert_dq_kernel<T><<<grid, kThreads, 0, stream>>>(params.dq_accum, static_cast<T*>(params.dq), n,
                                                                  params.scale);
  });
  return cudaGetLastError();
}

}  // namespace flash
}  // namespace tfkernels
