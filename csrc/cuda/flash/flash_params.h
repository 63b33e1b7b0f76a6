// The plain parameter block the torch-facing launcher (csrc/cuda/flash_attention.cpp)
// fills and every flash-attention kernel reads. No torch types: kernel translation
// units include only CUDA headers and our own, because a torch header costs about a
// minute of nvcc time per architecture in every file that includes it.
#pragma once

#include <cstdint>

#include "head_dim.h"

namespace tfkernels {
namespace flash {

struct FwdParams {
  // q [B,H,Sq,D], k/v [B,Hkv,Sk,D] with any batch/head/row strides (in elements);
  // the last dim is contiguous. out is [B,H,Sq,D] (strides passed all the same);
  // lse is contiguous float32 [B,H,Sq].
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t o_batch_stride, o_head_stride, o_row_stride;

  // Optional device array [B] of valid key lengths (int32 or int64), clamped to
  // [0, Sk] in the kernel; nullptr means every batch has Sk keys.
  const void* seqlens_k;
  bool seqlens_k_is_int64;

  int batch, heads, kv_heads;
  int head_group;  // heads / kv_heads: query head h reads kv head h / head_group
  int seqlen_q, seqlen_k;
  int head_dim;    // the real D; kernels are instantiated for a padded D >= head_dim

  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e): scores go to base 2 so exp is one ex2

  bool causal;
  bool bottom_right;  // causal (and window) offset len_k - Sq instead of 0
  // Sliding window: query i sees keys i + off - window_left .. i + off + window_right;
  // -1 = unbounded on that side (mask.h folds these with causal and len_k).
  int window_left, window_right;

  // Variants (issue 15; variants.h). softcap > 0: scores are
  // softcap * tanh(scale q.k / softcap). sinks: nullptr or float32 [H], a per-head
  // logit in every row's softmax denominator (and lse). dropout_p > 0: P is
  // multiplied by keep / (1 - p), keep from csrc/dropout_rng.h with (seed, offset)
  // = rng_state[0..1], an int64 [2] read from device memory (CUDA-graph safe).
  float softcap;
  const float* sinks;
  float dropout_p;
  const int64_t* rng_state;

  // Packed variable-length batches (issue 16; block_info.h). nullptr: the padded
  // layout above. Otherwise q and out are [total_q,H,D], k and v [total_k,Hkv,D]
  // (batch strides unused), sequence b owns rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]
  // of q (int32 [B+1] on the device; the kernels clamp the values to [0, total], so
  // unvalidated ones, as in CUDA graph capture, never reach outside the tensors), likewise
  // for k/v, seqlen_q/seqlen_k hold max_seqlen_q/k (the grids' extent), and lse (and
  // the backward's delta, grad_lse) is [H,total_q].
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  int total_q, total_k;

  // 16-bit path only: D % 8 == 0 and every base pointer and batch/head/row stride
  // is a multiple of 16 bytes, so 16-byte cp.async loads and 16-byte stores are
  // legal. When false the kernels load and store element by element (odd head
  // dims such as 59 take this path; the launcher copies misaligned views of
  // D % 8 == 0 tensors instead so that they keep the fast path).
  bool aligned16;

  // ---- KV cache (flash_attention_kvcache, csrc/cuda/flash_kvcache.cpp; forward only).
  // Every field is zero for the other ops (the launchers value-initialise FwdParams).
  // Paged K/V (paged_kv.h): block_table int32 [B, *] with row stride
  // block_table_batch_stride, nullptr = dense. Key row p of batch b then lives in
  // block block_table[b][p / page_block_size] (clamped to [0, num_pages)), slot
  // p % page_block_size: k + block * k_batch_stride + slot * k_row_stride + the
  // head offset (the batch stride is the block stride); likewise v.
  const int* block_table;
  int64_t block_table_batch_stride;
  int page_block_size;
  int num_pages;
  // Split-KV (split_kv.h): num_splits > 1 divides a block's key tiles among that
  // many blocks (grid x = query tile * num_splits + split); each writes its rows'
  // normalised partial O to o_accum (fp32 [splits, B, H, Sq, head_dim]) and base-2
  // lse to lse_accum (fp32 [splits, B, H, Sq]) instead of out/lse, and the combine
  // kernel merges them (with the sink) into out and lse. 0 or 1 = unsplit.
  int num_splits;
  float* o_accum;
  float* lse_accum;
};

// Backward parameters: the forward's block (q, k, v, out, lse, strides, sizes,
// masks; `out` is read) plus dO, the gradients and the fp32 scratch buffers. The
// kernels derive their key and query tile ranges from the base (block_info.h).
struct BwdParams : FwdParams {
  const void* dout;  // [B,H,Sq,D], any batch/head/row strides, last dim contiguous
  int64_t do_batch_stride, do_head_stride, do_row_stride;
  const float* grad_lse;  // optional contiguous fp32 laid out as lse (nullptr: none)
  float* delta;           // scratch fp32 laid out as lse: rowsum(dO * O) - grad_lse
  float* dq_accum;        // scratch fp32 laid out as dq (below), zeroed (default mode only)
  // Outputs, contiguous: dq [B,H,Sq,D], dk and dv [B,Hkv,Sk,D] (packed: [total,H,D]).
  void* dq;
  void* dk;
  void* dv;
  float* grad_sinks;      // float32 [H] when sinks is given: -sum_{b,i} exp(sink - lse) delta
  // The gradients' layouts (strides in elements): dq and dq_accum share one
  // ([B,H,Sq,D] padded, [total_q,H,D] packed), dk and dv another ([B,Hkv,Sk,D] or
  // [total_k,Hkv,D]); D = head_dim, contiguous rows.
  int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
  int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
  // deterministic: dQ by a second kernel that walks the K/V tiles of each query
  // tile (no atomics); otherwise fp32 atomicAdd into dq_accum, then a convert pass.
  bool deterministic;
};

// Kernels exist for the multiples of 32 up to kMaxHeadDim (head_dim.h); a real D is
// rounded up to the next one and its tail is zero-filled by predicated loads.
inline constexpr int padded_head_dim(int d) { return d <= 32 ? 32 : ((d + 31) / 32) * 32; }

}  // namespace flash
}  // namespace tfkernels
