#include "kvcache_args.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

#include "args.h"

namespace tfkernels {

namespace {

// Optional tensors arrive as nullopt or as an undefined tensor, depending on the caller.
bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_index_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "tfkernels: ", name,
              " must have dtype int32 (the Python wrapper converts int64), got ", t.scalar_type());
  check_same_device(t, name, q, "q");
}

// A cache-like tensor: 4-D, q's dtype and device, last dim contiguous.
void check_cache_like(const at::Tensor& t, const char* name, const char* layout, const at::Tensor& q) {
  check_rank(t, name, 4, layout);
  check_same_device(t, name, q, "q");
  check_same_dtype(t, name, q, "q");
  check_last_dim_contiguous(t, name);
}

}  // namespace

KvcacheShape check_kvcache_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const c10::optional<at::Tensor>& k, const c10::optional<at::Tensor>& v,
                                const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table,
                                const c10::optional<at::Tensor>& rotary_cos,
                                const c10::optional<at::Tensor>& rotary_sin, bool rotary_interleaved, bool is_causal,
                                c10::optional<double> scale, int64_t window_left, int64_t window_right,
                                double softcap, const c10::optional<at::Tensor>& sinks, int64_t num_splits,
                                c10::ArrayRef<at::ScalarType> allowed) {
  check_dtype_in(q, "q", allowed);
  check_rank(q, "q", 4, "[B, Sq, H, D]");
  check_last_dim_contiguous(q, "q");
  KvcacheShape s{};
  s.batch = q.size(0);
  s.seqlen_q = q.size(1);
  s.heads = q.size(2);
  s.head_dim = q.size(3);
  TORCH_CHECK(s.head_dim >= 1 && s.head_dim <= kMaxHeadDim, "tfkernels: head dim q.shape[3] must be in [1, ",
              kMaxHeadDim, "], got ", s.head_dim);

  s.paged = given(block_table);
  const char* cache_layout = s.paged ? "[num_blocks, block_size, Hkv, D] (paged: block_table is given)"
                                     : "[B, S_cache, Hkv, D] (dense: no block_table)";
  check_cache_like(k_cache, "k_cache", cache_layout, q);
  check_cache_like(v_cache, "v_cache", cache_layout, q);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "tfkernels: v_cache must have the shape of k_cache ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  s.kv_heads = k_cache.size(2);
  check_dim_size(k_cache, "k_cache", 3, s.head_dim, "head dim, as q");
  TORCH_CHECK(s.kv_heads >= 1 && s.heads % s.kv_heads == 0, "tfkernels: the number of query heads (q.shape[2] = ",
              s.heads, ") must be a multiple of the number of kv heads (k_cache.shape[2] = ", s.kv_heads, ")");
  s.cache_rows = k_cache.size(1);
  if (s.paged) {
    const at::Tensor& bt = *block_table;
    check_index_tensor(bt, "block_table", q);
    TORCH_CHECK(bt.dim() == 2 && bt.size(0) == s.batch, "tfkernels: block_table must be a 2-D tensor "
                "[B, max_blocks] with B = ", s.batch, " (q.shape[0]), got ", bt.dim(), "-D ", bt.sizes());
    TORCH_CHECK(s.cache_rows >= 1, "tfkernels: the paged k_cache's block_size (k_cache.shape[1]) must be >= 1, got ",
                s.cache_rows);
    s.num_blocks = k_cache.size(0);
    s.max_blocks = bt.size(1);
    s.capacity = s.max_blocks * s.cache_rows;
  } else {
    check_dim_size(k_cache, "k_cache", 0, s.batch, "batch, as q");
    s.capacity = s.cache_rows;
  }

  TORCH_CHECK(given(k) == given(v), "tfkernels: the new k and v must be given together (both or neither), got k ",
              given(k) ? "given" : "None", " and v ", given(v) ? "given" : "None");
  if (given(k)) {
    for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{*k, "k"}, {*v, "v"}}) {
      check_cache_like(t, name, "[B, Snew, Hkv, D]", q);
      check_dim_size(t, name, 0, s.batch, "batch, as q");
      check_dim_size(t, name, 2, s.kv_heads, "kv heads, as k_cache");
      check_dim_size(t, name, 3, s.head_dim, "head dim, as q");
    }
    check_dim_size(*v, "v", 1, k->size(1), "Snew, as k");
    s.seqlen_new = k->size(1);
  }

  check_index_tensor(cache_seqlens, "cache_seqlens", q);
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == s.batch,
              "tfkernels: cache_seqlens must be a 1-D tensor [B] with B = ", s.batch, " (q.shape[0]), got ",
              cache_seqlens.dim(), "-D ", cache_seqlens.sizes());

  TORCH_CHECK(given(rotary_cos) == given(rotary_sin), "tfkernels: rotary_cos and rotary_sin must be given together, "
              "got rotary_cos ", given(rotary_cos) ? "given" : "None", " and rotary_sin ",
              given(rotary_sin) ? "given" : "None");
  s.rotary_interleaved = rotary_interleaved;
  if (given(rotary_cos)) {
    const at::Tensor &cos = *rotary_cos, &sin = *rotary_sin;
    check_rank(cos, "rotary_cos", 2, "[seqlen_ro, rotary_dim / 2]");
    check_same_device(cos, "rotary_cos", q, "q");
    check_same_dtype(cos, "rotary_cos", q, "q");
    check_last_dim_contiguous(cos, "rotary_cos");
    TORCH_CHECK(sin.sizes() == cos.sizes(), "tfkernels: rotary_sin must have the shape of rotary_cos ", cos.sizes(),
                ", got ", sin.sizes());
    check_same_device(sin, "rotary_sin", q, "q");
    check_same_dtype(sin, "rotary_sin", q, "q");
    check_last_dim_contiguous(sin, "rotary_sin");
    s.seqlen_ro = cos.size(0);
    s.rotary_dim = 2 * cos.size(1);
    TORCH_CHECK(s.rotary_dim <= s.head_dim, "tfkernels: rotary_dim (2 * rotary_cos.shape[1]) must be even and <= "
                "the head dim ", s.head_dim, ", got ", s.rotary_dim);
  }

  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  TORCH_CHECK(std::isfinite(sc), "tfkernels: scale must be finite, got ", sc);
  TORCH_CHECK(num_splits >= 0, "tfkernels: num_splits must be >= 0 (0 = chosen from the shape), got ", num_splits);
  s.num_splits = num_splits;
  s.causal = is_causal;
  if (given(sinks)) {
    TORCH_CHECK(sinks->dim() == 1 && sinks->size(0) == s.heads, "tfkernels: sinks must be a 1-D tensor [H] with H = ",
                s.heads, " (q.shape[2]), got ", sinks->dim(), "-D ", sinks->sizes());
  }
  AttentionShape variants{};
  variants.heads = s.heads;
  check_attention_variants(variants, q, window_left, window_right, softcap, sinks, 0.0, c10::nullopt);
  s.window_left = window_left;
  s.window_right = window_right;
  s.softcap = softcap;
  s.has_sinks = variants.has_sinks;
  return s;
}

void check_kvcache_values(const KvcacheShape& s, const int32_t* cache_seqlens, const int32_t* block_table,
                          int64_t block_table_stride) {
  int64_t largest_position = -1;  // the largest rotated position
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t len = cache_seqlens[b];
    TORCH_CHECK(len >= 0, "tfkernels: cache_seqlens must be >= 0, got cache_seqlens[", b, "] = ", len);
    const int64_t total = len + s.seqlen_new;
    TORCH_CHECK(total <= s.capacity, "tfkernels: the cache is too small for the append: cache_seqlens[", b,
                "] + Snew = ", len, " + ", s.seqlen_new, " = ", total, " rows, but the cache holds ", s.capacity,
                s.paged ? " (max_blocks * block_size = block_table.shape[1] * k_cache.shape[1])"
                        : " (S_cache = k_cache.shape[1])");
    if (s.paged) {
      const int64_t used = (total + s.cache_rows - 1) / s.cache_rows;
      for (int64_t p = 0; p < used; ++p) {
        const int64_t block = block_table[b * block_table_stride + p];
        TORCH_CHECK(block >= 0 && block < s.num_blocks, "tfkernels: block_table entries must lie in [0, num_blocks = ",
                    s.num_blocks, ") (k_cache.shape[0]), got block_table[", b, "][", p, "] = ", block,
                    " (sequence ", b, " uses its first ", used, " entries)");
      }
    }
    if (s.rotary_dim > 0) {
      if (s.seqlen_new > 0) largest_position = std::max(largest_position, total - 1);
      const int64_t q_last = s.rotate_q_per_row() ? len + s.seqlen_q - 1 : len;
      if (s.seqlen_q > 0) largest_position = std::max(largest_position, q_last);
    }
  }
  TORCH_CHECK(largest_position < s.seqlen_ro, "tfkernels: rotary_cos/rotary_sin have seqlen_ro = ", s.seqlen_ro,
              " rows (shape[0]), too few for the largest rotated position ", largest_position,
              " (it needs seqlen_ro > ", largest_position, ")");
}

}  // namespace tfkernels
