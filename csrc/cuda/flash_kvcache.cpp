// The torch-facing launcher of flash_attention_kvcache on CUDA (csrc/ops.cpp has
// the schema and its semantics): the checks shared with every device
// (kvcache_args.h; the value checks read host copies of cache_seqlens and
// block_table, except during CUDA-graph capture, where the kernels clamp), then
// on the current stream:
//   1. kvcache_append.cu: the new k, v rows into the cache (rotated k), and q
//      rotated into a scratch copy when rotary_cos/sin are given;
//   2. the forward kernel (flash_launch.h) over the cache as [B, S, Hkv, D]
//      strides (no copies), seqlens_k = cache_seqlens + Snew, causal and window
//      bottom-right aligned, paged through block_table (paged_kv.h);
//   3. with num_splits > 1, the split-KV combine (split_kv.h).
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "alloc.h"
#include "args.h"
#include "cuda/common/device_context.h"
#include "cuda/common/launcher_utils.h"
#include "cuda/flash/flash_api.h"
#include "cuda/flash/kvcache_append.h"
#include "cuda/flash_launch.h"
#include "cuda/unverified.h"
#include "kvcache_args.h"

namespace tfkernels {
namespace {

using flash_launch::stride_of;

// The most splits a row is cut into (and so the size of the fp32 scratch:
// splits * B * H * Sq * (D + 1) floats).
constexpr int kMaxSplits = 128;
// num_splits = 0 gives a split at least this many key tiles (256 keys at D <= 128):
// fewer would spend more on the split's Q load and partial write than it saves.
constexpr int64_t kMinTilesPerSplit = 4;

// num_splits = 0: enough blocks to fill the machine once (the forward kernels run
// one block an SM), from the shape alone (the cache capacity, not cache_seqlens),
// so that eager and CUDA-graph runs choose alike; 1 when the unsplit grid
// already fills 80% of the SMs.
int choose_num_splits(const KvcacheShape& s, const flash_launch::FwdTile& tile) {
  if (s.num_splits > 0) return static_cast<int>(std::min<int64_t>(s.num_splits, kMaxSplits));
  const int64_t blocks = s.batch * s.heads * ((s.seqlen_q + tile.block_m - 1) / tile.block_m);
  const int64_t sms = device::num_sms();
  if (blocks <= 0 || blocks * 5 >= sms * 4) return 1;
  const int64_t key_tiles = (s.capacity + tile.block_n - 1) / tile.block_n;
  const int64_t wanted = (sms + blocks - 1) / blocks;
  const int64_t affordable = key_tiles / kMinTilesPerSplit;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, affordable, kMaxSplits})));
}

// Host copies of cache_seqlens and block_table for the value checks.
void check_values(const KvcacheShape& s, const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table) {
  const at::Tensor lens = cache_seqlens.to(at::kCPU).contiguous();
  at::Tensor table;
  if (s.paged) table = block_table->to(at::kCPU).contiguous();
  check_kvcache_values(s, lens.data_ptr<int32_t>(), s.paged ? table.data_ptr<int32_t>() : nullptr,
                       s.paged ? table.stride(0) : 0);
}

// The append pass: new rows into the cache, q into q_rot (when rotary).
void append(const KvcacheShape& s, const at::Tensor& q, const at::Tensor& q_rot, const at::Tensor& k_cache,
            const at::Tensor& v_cache, const c10::optional<at::Tensor>& k, const c10::optional<at::Tensor>& v,
            const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table,
            const c10::optional<at::Tensor>& rotary_cos, const c10::optional<at::Tensor>& rotary_sin) {
  flash::KvcacheAppendParams a{};
  if (s.seqlen_new > 0) {
    a.k_new = k->data_ptr();
    a.v_new = v->data_ptr();
    a.kn_batch_stride = stride_of(*k, 0);
    a.kn_row_stride = stride_of(*k, 1);
    a.kn_head_stride = stride_of(*k, 2);
    a.vn_batch_stride = stride_of(*v, 0);
    a.vn_row_stride = stride_of(*v, 1);
    a.vn_head_stride = stride_of(*v, 2);
  }
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.kc_batch_stride = stride_of(k_cache, 0);
  a.kc_row_stride = stride_of(k_cache, 1);
  a.kc_head_stride = stride_of(k_cache, 2);
  a.vc_batch_stride = stride_of(v_cache, 0);
  a.vc_row_stride = stride_of(v_cache, 1);
  a.vc_head_stride = stride_of(v_cache, 2);
  if (s.paged) {
    a.block_table = block_table->data_ptr<int32_t>();
    a.block_table_batch_stride = stride_of(*block_table, 0);
    a.page_block_size = static_cast<int>(s.cache_rows);
    a.num_pages = static_cast<int>(s.num_blocks);
  }
  a.capacity = static_cast<int>(s.capacity);
  a.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  a.batch = static_cast<int>(s.batch);
  a.seqlen_new = static_cast<int>(s.seqlen_new);
  a.kv_heads = static_cast<int>(s.kv_heads);
  a.heads = static_cast<int>(s.heads);
  a.seqlen_q = static_cast<int>(s.seqlen_q);
  a.head_dim = static_cast<int>(s.head_dim);
  if (s.rotary_dim > 0) {
    a.rotary_cos = rotary_cos->data_ptr();
    a.rotary_sin = rotary_sin->data_ptr();
    a.cos_row_stride = stride_of(*rotary_cos, 0);
    a.sin_row_stride = stride_of(*rotary_sin, 0);
    a.rotary_dim = static_cast<int>(s.rotary_dim);
    a.seqlen_ro = static_cast<int>(s.seqlen_ro);
    a.interleaved = s.rotary_interleaved;
    a.q_per_row = s.rotate_q_per_row();
    a.q = q.data_ptr();
    a.q_batch_stride = stride_of(q, 0);
    a.q_row_stride = stride_of(q, 1);
    a.q_head_stride = stride_of(q, 2);
    a.q_rot = q_rot.data_ptr();
  }
  TFKERNELS_CHECK_LAUNCH(flash::run_kvcache_append(a, cuda::dtype_of(q), device::current_stream()));
}

std::tuple<at::Tensor, at::Tensor> flash_attention_kvcache_cuda(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const c10::optional<at::Tensor>& k,
    const c10::optional<at::Tensor>& v, const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table,
    const c10::optional<at::Tensor>& rotary_cos, const c10::optional<at::Tensor>& rotary_sin,
    bool rotary_interleaved, bool is_causal, c10::optional<double> scale, int64_t window_left, int64_t window_right,
    double softcap, const c10::optional<at::Tensor>& sinks, int64_t num_splits) {
  TFKERNELS_WARN_UNVERIFIED_CUDA("flash_attention_with_kvcache");
  const KvcacheShape s =
      check_kvcache_args(q, k_cache, v_cache, k, v, cache_seqlens, block_table, rotary_cos, rotary_sin,
                         rotary_interleaved, is_causal, scale, window_left, window_right, softcap, sinks, num_splits,
                         {at::kHalf, at::kBFloat16, at::kFloat});
  device::check_on_device(q, "q");
  cuda::check_limit("flash_attention_with_kvcache", "heads and batches", {s.heads, s.batch}, cuda::kMaxGridYZ);
  cuda::check_limit("flash_attention_with_kvcache", "sequence lengths and cache capacities",
                    {s.seqlen_q, s.capacity, s.seqlen_new}, (int64_t(1) << 30) - 1);
  cuda::check_limit("flash_attention_with_kvcache", "cache blocks", {s.num_blocks}, cuda::kMaxInt32);
  const device::Guard guard(q.device());
  if (!device::stream_is_capturing()) check_values(s, cache_seqlens, block_table);

  at::Tensor out = empty_output({s.batch, s.seqlen_q, s.heads, s.head_dim}, q.options());
  at::Tensor lse = empty_output({s.batch, s.heads, s.seqlen_q}, q.options().dtype(at::kFloat));
  if (s.batch == 0) return {out, lse};

  at::Tensor q_rot;
  if (s.rotary_dim > 0) q_rot = at::empty({s.batch, s.seqlen_q, s.heads, s.head_dim}, q.options());
  if (s.seqlen_new > 0 || s.rotary_dim > 0) {
    append(s, q, q_rot, k_cache, v_cache, k, v, cache_seqlens, block_table, rotary_cos, rotary_sin);
  }
  if (s.seqlen_q == 0 || s.heads == 0) return {out, lse};
  const at::Tensor& q_used = s.rotary_dim > 0 ? q_rot : q;

  // Every sequence attends over its cache_seqlens[b] + Snew keys (clamped to the
  // capacity by the kernels).
  const at::Tensor seqlens_k = s.seqlen_new > 0 ? cache_seqlens + static_cast<int32_t>(s.seqlen_new) : cache_seqlens;
  const bool is_fp32 = q.scalar_type() == at::kFloat;
  flash::FwdParams p{};
  p.q = q_used.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  // [B, S, H, D] layouts as (batch, head, row) strides; a paged cache's batch
  // stride is its block stride (paged_kv.h).
  p.q_batch_stride = stride_of(q_used, 0);
  p.q_head_stride = stride_of(q_used, 2);
  p.q_row_stride = stride_of(q_used, 1);
  p.k_batch_stride = stride_of(k_cache, 0);
  p.k_head_stride = stride_of(k_cache, 2);
  p.k_row_stride = stride_of(k_cache, 1);
  p.v_batch_stride = stride_of(v_cache, 0);
  p.v_head_stride = stride_of(v_cache, 2);
  p.v_row_stride = stride_of(v_cache, 1);
  p.o_batch_stride = stride_of(out, 0);
  p.o_head_stride = stride_of(out, 2);
  p.o_row_stride = stride_of(out, 1);
  p.seqlens_k = seqlens_k.data_ptr<int32_t>();
  p.seqlens_k_is_int64 = false;
  p.batch = static_cast<int>(s.batch);
  p.heads = static_cast<int>(s.heads);
  p.kv_heads = static_cast<int>(s.kv_heads);
  p.head_group = static_cast<int>(s.heads / s.kv_heads);
  p.seqlen_q = static_cast<int>(s.seqlen_q);
  p.seqlen_k = static_cast<int>(s.capacity);
  p.head_dim = static_cast<int>(s.head_dim);
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  p.scale = static_cast<float>(sc);
  p.scale_log2 = static_cast<float>(sc * 1.4426950408889634074);
  p.causal = s.causal;
  p.bottom_right = true;
  p.window_left = flash_launch::window_bound(s.window_left, s.seqlen_q, s.capacity);
  p.window_right = flash_launch::window_bound(s.window_right, s.seqlen_q, s.capacity);
  p.softcap = static_cast<float>(s.softcap);
  p.sinks = s.has_sinks ? sinks->data_ptr<float>() : nullptr;
  // 16-byte copies need D % 8 == 0 and 16-byte aligned rows of q, the caches and
  // out; otherwise the kernel's element-wise path (the cache is never copied: the
  // append wrote into it in place).
  p.aligned16 = !is_fp32 && s.head_dim % 8 == 0 && cuda::aligned16(q_used) && cuda::aligned16(k_cache) &&
                cuda::aligned16(v_cache) && cuda::aligned16(out);
  if (s.paged) {
    p.block_table = block_table->data_ptr<int32_t>();
    p.block_table_batch_stride = stride_of(*block_table, 0);
    p.page_block_size = static_cast<int>(s.cache_rows);
    p.num_pages = static_cast<int>(s.num_blocks);
  }

  const int splits = choose_num_splits(s, flash_launch::fwd_tile(q.scalar_type(), s.head_dim));
  at::Tensor o_accum, lse_accum;
  if (splits > 1) {
    o_accum = at::empty({splits, s.batch, s.heads, s.seqlen_q, s.head_dim}, q.options().dtype(at::kFloat));
    lse_accum = at::empty({splits, s.batch, s.heads, s.seqlen_q}, q.options().dtype(at::kFloat));
    p.num_splits = splits;
    p.o_accum = o_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }
  flash_launch::launch_flash_fwd(p, q.scalar_type());
  if (splits > 1) {
    TFKERNELS_CHECK_LAUNCH(flash::run_flash_fwd_split_combine(p, cuda::dtype_of(q), device::current_stream()));
  }
  return {out, lse};
}

}  // namespace

TFKERNELS_CUDA_LIBRARY_IMPL(m) { m.impl("flash_attention_kvcache", &flash_attention_kvcache_cuda); }

}  // namespace tfkernels
