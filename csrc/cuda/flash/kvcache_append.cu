// flash_attention_kvcache's append pass (kvcache_append.h). One warp a row of D
// elements, lanes over the columns; three kinds of rows in one grid-stride loop:
// the B * Snew * Hkv new k rows, as many v rows, and (with rotary) the B * Sq * H
// q rows. A rotated column c < rotary_dim reads its pair partner from the source
// row, so every output element depends on the inputs only: no ordering between
// threads, no shared memory.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/convert.h"
#include "cuda/common/dtype.h"
#include "cuda/common/grid.h"
#include "cuda/flash/kvcache_append.h"

namespace tfkernels {
namespace flash {

namespace {

constexpr int kAppendWarps = 8;

// Rotary embedding of column c of row x at the cos/sin row of its position:
// interleaved pairs (2i, 2i + 1), else (i, i + rotary_dim / 2):
//   x'_a = x_a cos_i - x_b sin_i,  x'_b = x_b cos_i + x_a sin_i.
template <typename T>
__device__ __forceinline__ float rotate(const T* x, int c, const T* cos, const T* sin, int rotary_dim,
                                        bool interleaved) {
  const int half = rotary_dim / 2;
  int i, partner;
  bool first;  // c is the pair's first element (x_a)
  if (interleaved) {
    i = c / 2;
    partner = c ^ 1;
    first = (c & 1) == 0;
  } else {
    first = c < half;
    i = first ? c : c - half;
    partner = first ? c + half : c - half;
  }
  const float xc = cuda::to_float(x[c]);
  const float xp = cuda::to_float(x[partner]);
  const float cs = cuda::to_float(cos[i]);
  const float sn = cuda::to_float(sin[i]);
  return first ? xc * cs - xp * sn : xc * cs + xp * sn;
}

// Copies row `src` to `dst`, rotating its first rotary_dim columns when cos != nullptr.
template <typename T>
__device__ __forceinline__ void copy_row(T* dst, const T* src, const T* cos, const T* sin, const KvcacheAppendParams& p,
                                         int lane) {
#pragma unroll 1
  for (int c = lane; c < p.head_dim; c += 32) {
    dst[c] = (cos != nullptr && c < p.rotary_dim) ? cuda::from_float<T>(rotate(src, c, cos, sin, p.rotary_dim,
                                                                                p.interleaved))
                                                  : src[c];
  }
}

template <typename T>
__global__ void __launch_bounds__(kAppendWarps * 32) kvcache_append_kernel(const __grid_constant__ KvcacheAppendParams p) {
  const int lane = threadIdx.x % 32;
  const bool rotary = p.rotary_cos != nullptr;
  const int64_t kv_rows = p.k_new != nullptr ? static_cast<int64_t>(p.batch) * p.seqlen_new * p.kv_heads : 0;
  const int64_t q_rows = rotary ? static_cast<int64_t>(p.batch) * p.seqlen_q * p.heads : 0;
  const int64_t total = 2 * kv_rows + q_rows;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kAppendWarps;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kAppendWarps + threadIdx.x / 32; w < total; w += warps) {
    if (w < 2 * kv_rows) {
      // New row j of (batch, kv head) of k (w < kv_rows) or v.
      const bool is_k = w < kv_rows;
      const int64_t r = is_k ? w : w - kv_rows;
      const int h = static_cast<int>(r % p.kv_heads);
      const int j = static_cast<int>((r / p.kv_heads) % p.seqlen_new);
      const int b = static_cast<int>(r / (static_cast<int64_t>(p.kv_heads) * p.seqlen_new));
      const int64_t pos = static_cast<int64_t>(p.cache_seqlens[b]) + j;
      if (pos < 0 || pos >= p.capacity) continue;
      int64_t block = b, slot = pos;
      if (p.block_table != nullptr) {
        block = p.block_table[b * p.block_table_batch_stride + pos / p.page_block_size];
        slot = pos % p.page_block_size;
        if (block < 0 || block >= p.num_pages) continue;
      }
      const T* src = is_k ? static_cast<const T*>(p.k_new) + b * p.kn_batch_stride + j * p.kn_row_stride +
                                h * p.kn_head_stride
                          : static_cast<const T*>(p.v_new) + b * p.vn_batch_stride + j * p.vn_row_stride +
                                h * p.vn_head_stride;
      T* dst = is_k ? static_cast<T*>(p.k_cache) + block * p.kc_batch_stride + slot * p.kc_row_stride +
                          h * p.kc_head_stride
                    : static_cast<T*>(p.v_cache) + block * p.vc_batch_stride + slot * p.vc_row_stride +
                          h * p.vc_head_stride;
      const T* cos = nullptr;
      const T* sin = nullptr;
      if (is_k && rotary) {
        const int64_t ro = pos < p.seqlen_ro ? pos : p.seqlen_ro - 1;
        cos = static_cast<const T*>(p.rotary_cos) + ro * p.cos_row_stride;
        sin = static_cast<const T*>(p.rotary_sin) + ro * p.sin_row_stride;
      }
      copy_row(dst, src, cos, sin, p, lane);
    } else {
      // Query row i of (batch, head), rotated into the contiguous scratch.
      const int64_t r = w - 2 * kv_rows;
      const int h = static_cast<int>(r % p.heads);
      const int i = static_cast<int>((r / p.heads) % p.seqlen_q);
      const int b = static_cast<int>(r / (static_cast<int64_t>(p.heads) * p.seqlen_q));
      int64_t pos = static_cast<int64_t>(p.cache_seqlens[b]) + (p.q_per_row ? i : 0);
      pos = pos < 0 ? 0 : (pos < p.seqlen_ro ? pos : p.seqlen_ro - 1);
      const T* src = static_cast<const T*>(p.q) + b * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride;
      T* dst = static_cast<T*>(p.q_rot) + r * p.head_dim;  // [B, Sq, H, D] contiguous: r = (b Sq + i) H + h
      copy_row(dst, src, static_cast<const T*>(p.rotary_cos) + pos * p.cos_row_stride,
               static_cast<const T*>(p.rotary_sin) + pos * p.sin_row_stride, p, lane);
    }
  }
}

}  // namespace

cudaError_t run_kvcache_append(const KvcacheAppendParams& params, cuda::DType dtype, cudaStream_t stream) {
  const int64_t kv_rows = params.k_new != nullptr ? static_cast<int64_t>(params.batch) * params.seqlen_new * params.kv_heads : 0;
  const int64_t q_rows =
      params.rotary_cos != nullptr ? static_cast<int64_t>(params.batch) * params.seqlen_q * params.heads : 0;
  const int64_t rows = 2 * kv_rows + q_rows;
  if (rows == 0) return cudaSuccess;
  const unsigned int blocks = cuda::grid_for(rows, kAppendWarps);
  return cuda::dispatch_dtype(dtype, [&](auto tag) {
    using T = cuda::tag_type<decltype(tag)>;
    kvcache_append_kernel<T><<<blocks, kAppendWarps * 32, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

}  // namespace flash
}  // namespace tfkernels
