// The combine pass of split-KV (split_kv.h): for every query row, the num_splits
// partial outputs O_s (normalised by their own denominators) and base-2 lse_s
// become out and lse:
//   m = max_s lse_s, w_s = 2^(lse_s - m), l = sum_s w_s, out = sum_s w_s O_s / l,
// with the finish of the unsplit kernels (RowFinish, variants.h): the head's sink
// joins l here (the splits leave it out), a row that sees no key (the mask says
// so, not the splits) gets 0 and -inf (or the sink), a row whose visible scores
// were all -inf (every lse_s = -inf, l = 0) gets NaN, and a NaN lse_s (NaN or
// +inf scores in that split) makes l, out and lse NaN. One warp a row, lanes over
// the head dim; fp32 throughout, one rounding to the output dtype.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/convert.h"
#include "cuda/common/dtype.h"
#include "cuda/common/grid.h"
#include "cuda/flash/block_info.h"
#include "cuda/flash/flash_api.h"
#include "cuda/flash/split_kv.h"
#include "cuda/flash/variants.h"

namespace tfkernels {
namespace flash {

namespace {

constexpr int kCombineWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kCombineWarps * 32) flash_fwd_split_combine_kernel(const __grid_constant__ FwdParams p) {
  constexpr float kNegInf = -__builtin_huge_valf();
  const int lane = threadIdx.x % 32;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seqlen_q;
  const int64_t row_index = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  if (row_index >= rows) return;
  const int i = static_cast<int>(row_index % p.seqlen_q);
  const int64_t bh = row_index / p.seqlen_q;
  const int head = static_cast<int>(bh % p.heads);
  const int batch = static_cast<int>(bh / p.heads);
  const int splits = split_count(p);

  float m = kNegInf;  // fmaxf drops NaN; the sum below keeps it
  for (int s = 0; s < splits; ++s) m = fmaxf(m, p.lse_accum[partial_index(p, s, batch, head, i)]);
  const float m_use = m == kNegInf ? 0.0f : m;
  float l = 0.0f;
  for (int s = 0; s < splits; ++s) l += exp2f(p.lse_accum[partial_index(p, s, batch, head, i)] - m_use);

  const BlockInfo info(p, batch);
  const RowFinish<true> fin(m, l, info.mask.row_sees_a_key(i), sink_logit(p, head));
  T* out = static_cast<T*>(p.out) + batch * p.o_batch_stride + head * p.o_head_stride + i * p.o_row_stride;
  for (int c = lane; c < p.head_dim; c += 32) {
    float acc = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const int64_t index = partial_index(p, s, batch, head, i);
      const float w = exp2f(p.lse_accum[index] - m_use);
      // A split that saw nothing has w = 0 and O_s = 0 (never 0 * NaN).
      acc = fmaf(w, p.o_accum[index * p.head_dim + c], acc);
    }
    out[c] = cuda::from_float<T>(acc * fin.inv_l);
  }
  if (lane == 0) p.lse[row_index] = fin.lse;
}

}  // namespace

cudaError_t run_flash_fwd_split_combine(const FwdParams& params, cuda::DType dtype, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(params.batch) * params.heads * params.seqlen_q;
  if (rows == 0) return cudaSuccess;
  const unsigned int blocks = static_cast<unsigned int>(cuda::ceil_div<int64_t>(rows, kCombineWarps));
  return cuda::dispatch_dtype(dtype, [&](auto tag) {
    using T = cuda::tag_type<decltype(tag)>;
    flash_fwd_split_combine_kernel<T><<<blocks, kCombineWarps * 32, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

}  // namespace flash
}  // namespace tfkernels
