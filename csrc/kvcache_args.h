// Argument validation of flash_attention_kvcache (csrc/ops.cpp), shared by every
// device's launcher so that a bad call fails with the same message everywhere.
//
// Two steps: check_kvcache_args looks at shapes, dtypes, devices and the scalar
// attributes (no tensor values); check_kvcache_values then reads cache_seqlens and
// block_table, given as host int32 copies (a tiny device-to-host copy on CUDA,
// skipped during graph capture, where the kernels clamp instead).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace tfkernels {

struct KvcacheShape {
  int64_t batch, seqlen_q, heads, kv_heads, head_dim;
  int64_t seqlen_new;     // Snew: rows of the new k, v (0 without them)
  bool paged;
  int64_t cache_rows;     // dense: S_cache; paged: block_size
  int64_t num_blocks;     // paged: k_cache.shape[0]
  int64_t max_blocks;     // paged: block_table.shape[1]
  int64_t capacity;       // rows one sequence can hold: S_cache, or max_blocks * block_size
  int64_t rotary_dim;     // 0 without rotary; else 2 * rotary_cos.shape[1]
  int64_t seqlen_ro;      // rotary_cos.shape[0]
  bool rotary_interleaved;
  bool causal;
  int64_t window_left, window_right;  // -1 = unbounded; not yet combined with causal
  double softcap;
  bool has_sinks;
  int64_t num_splits;     // 0 = chosen from the shape

  // q rows are rotated at cache_seqlens[b] + i when the mask depends on the row, else at cache_seqlens[b].
  bool rotate_q_per_row() const { return causal || window_left >= 0 || window_right >= 0; }
};

// q [B,Sq,H,D]; k_cache, v_cache [B,S_cache,Hkv,D] or, with block_table int32 [B,max_blocks],
// [num_blocks,block_size,Hkv,D]; k, v [B,Snew,Hkv,D] (both or neither); cache_seqlens int32 [B];
// rotary_cos, rotary_sin [seqlen_ro, rotary_dim/2] in q's dtype (both or neither), rotary_dim <= D;
// sinks float32 [H]; every tensor on q's device, last dim contiguous. `allowed` lists q's dtypes.
KvcacheShape check_kvcache_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const c10::optional<at::Tensor>& k, const c10::optional<at::Tensor>& v,
                                const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table,
                                const c10::optional<at::Tensor>& rotary_cos,
                                const c10::optional<at::Tensor>& rotary_sin, bool rotary_interleaved, bool is_causal,
                                c10::optional<double> scale, int64_t window_left, int64_t window_right,
                                double softcap, const c10::optional<at::Tensor>& sinks, int64_t num_splits,
                                c10::ArrayRef<at::ScalarType> allowed);

// The values: cache_seqlens[b] >= 0 and cache_seqlens[b] + Snew <= capacity; the block_table
// entries a sequence uses (its first ceil((cache_seqlens[b] + Snew) / block_size)) in
// [0, num_blocks) (entries past those are never read: padding such as -1 is allowed there);
// seqlen_ro > every rotated position. cache_seqlens: B host int32; block_table: host int32
// with row stride `block_table_stride` (ignored when not paged).
void check_kvcache_values(const KvcacheShape& s, const int32_t* cache_seqlens, const int32_t* block_table,
                          int64_t block_table_stride);

}  // namespace tfkernels
