// The append pass of flash_attention_kvcache (kvcache_append.cu): the new k, v
// rows written into the dense or paged cache at cache_seqlens[b] + j, k rotated
// first when rotary_cos/sin are given, and q rotated into a scratch copy. Runs on
// the stream before the attention kernel, which then reads the appended cache.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/common/dtype.h"

namespace tfkernels {
namespace flash {

struct KvcacheAppendParams {
  // New rows k_new, v_new [B, Snew, Hkv, D] (strides in elements, last dim
  // contiguous); nullptr = nothing to append.
  const void* k_new;
  const void* v_new;
  int64_t kn_batch_stride, kn_row_stride, kn_head_stride;
  int64_t vn_batch_stride, vn_row_stride, vn_head_stride;
  // The caches: dense [B, S_cache, Hkv, D] or paged [num_pages, page_block_size,
  // Hkv, D] with block_table int32 [B, *] (row stride block_table_batch_stride);
  // `capacity` rows a sequence (S_cache, or table width * page_block_size).
  void* k_cache;
  void* v_cache;
  int64_t kc_batch_stride, kc_row_stride, kc_head_stride;
  int64_t vc_batch_stride, vc_row_stride, vc_head_stride;
  const int* block_table;
  int64_t block_table_batch_stride;
  int page_block_size, num_pages, capacity;
  const int* cache_seqlens;  // int32 [B] on the device
  int batch, seqlen_new, kv_heads, heads, seqlen_q, head_dim;
  // Rotary: cos, sin [seqlen_ro, rotary_dim / 2] in the dtype of q (row strides in
  // elements); nullptr = none. interleaved: pairs (2i, 2i + 1), else (i, i + rotary_dim / 2).
  // q_per_row: q row i at position cache_seqlens[b] + i (causal or windowed), else cache_seqlens[b].
  const void* rotary_cos;
  const void* rotary_sin;
  int64_t cos_row_stride, sin_row_stride;
  int rotary_dim, seqlen_ro;
  bool interleaved, q_per_row;
  // q [B, Sq, H, D] (any strides, last dim contiguous) rotated into q_rot
  // (contiguous [B, Sq, H, D]) when rotary is given.
  const void* q;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  void* q_rot;
};

// Nothing is written outside the caches even for unvalidated values (CUDA-graph
// capture skips the host checks): rows at positions outside [0, capacity) or in
// a block outside [0, num_pages) are skipped; rotary positions are clamped to
// [0, seqlen_ro) for the read.
cudaError_t run_kvcache_append(const KvcacheAppendParams& params, cuda::DType dtype, cudaStream_t stream);

}  // namespace flash
}  // namespace tfkernels
