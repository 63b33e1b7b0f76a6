#include "varlen_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace tfkernels {

namespace {

// dtype, rank and device of one cu_seqlens tensor.
void check_cu_seqlens_tensor(const at::Tensor& cu, const char* name, const at::Tensor& q) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, "tfkernels: ", name, " must have dtype int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, "tfkernels: ", name,
              " must be a 1-D tensor [B + 1] (B >= 0 sequences), got ", cu.dim(), "-D ", cu.sizes());
  check_same_device(cu, name, q, "q");
}

// The values of one cu_seqlens (host copy): 0 first, never decreasing, `rows` last,
// every length <= max_seqlen.
void check_cu_seqlens_values(const at::Tensor& cu_any, const char* name, int64_t rows, const char* rows_name,
                             int64_t max_seqlen, const char* max_name) {
  // rows_name e.g. "total_q = q.shape[0]".
  const at::Tensor cu = cu_any.to(at::kCPU).contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.numel();
  TORCH_CHECK(c[0] == 0, "tfkernels: ", name, "[0] must be 0, got ", c[0]);
  for (int64_t b = 0; b + 1 < n; ++b) {
    const int64_t len = static_cast<int64_t>(c[b + 1]) - c[b];
    TORCH_CHECK(len >= 0, "tfkernels: ", name, " must be non-decreasing, got ", name, "[", b + 1, "] = ", c[b + 1],
                " < ", name, "[", b, "] = ", c[b]);
    TORCH_CHECK(len <= max_seqlen, "tfkernels: sequence ", b, " has length ", len, " (", name, "[", b + 1, "] - ",
                name, "[", b, "]), more than ", max_name, " = ", max_seqlen);
  }
  TORCH_CHECK(c[n - 1] == rows, "tfkernels: ", name, "[-1] must equal ", rows_name, " = ", rows, ", got ",
              c[n - 1]);
}

}  // namespace

VarlenShape check_varlen_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                        int64_t max_seqlen_q, int64_t max_seqlen_k, bool is_causal,
                                        c10::string_view causal_alignment, c10::optional<double> scale,
                                        int64_t window_left, int64_t window_right, double softcap,
                                        const c10::optional<at::Tensor>& sinks, double dropout_p,
                                        const c10::optional<at::Tensor>& rng_state, bool check_values) {
  check_dtype_in(q, "q", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  check_rank(q, "q", 3, "[total_q, H, D]");
  check_rank(k, "k", 3, "[total_k, Hkv, D]");
  check_rank(v, "v", 3, "[total_k, Hkv, D]");
  check_floating_like(k, "k", q, "q");
  check_floating_like(v, "v", q, "q");

  VarlenShape vs{};
  AttentionShape& s = vs.attn;
  vs.total_q = q.size(0);
  vs.total_k = k.size(0);
  s.heads = q.size(1);
  s.head_dim = q.size(2);
  s.kv_heads = k.size(1);
  TORCH_CHECK(s.head_dim >= 1 && s.head_dim <= kMaxHeadDim, "tfkernels: head dim q.shape[2] must be in [1, ",
              kMaxHeadDim, "], got ", s.head_dim);
  check_dim_size(k, "k", 2, s.head_dim, "head dim, as q");
  check_dim_size(v, "v", 0, vs.total_k, "total_k, as k");
  check_dim_size(v, "v", 1, s.kv_heads, "kv heads, as k");
  check_dim_size(v, "v", 2, s.head_dim, "head dim, as q");
  TORCH_CHECK(s.kv_heads >= 1 && s.heads % s.kv_heads == 0, "tfkernels: the number of query heads (q.shape[1] = ",
              s.heads, ") must be a multiple of the number of kv heads (k.shape[1] = ", s.kv_heads, ")");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");

  check_cu_seqlens_tensor(cu_seqlens_q, "cu_seqlens_q", q);
  check_cu_seqlens_tensor(cu_seqlens_k, "cu_seqlens_k", q);
  TORCH_CHECK(cu_seqlens_k.size(0) == cu_seqlens_q.size(0),
              "tfkernels: cu_seqlens_k must have the length of cu_seqlens_q (B + 1 = ", cu_seqlens_q.size(0),
              "), got ", cu_seqlens_k.size(0));
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "tfkernels: max_seqlen_q and max_seqlen_k must be >= 0, got ",
              max_seqlen_q, " and ", max_seqlen_k);
  if (check_values) {
    check_cu_seqlens_values(cu_seqlens_q, "cu_seqlens_q", vs.total_q, "total_q = q.shape[0]", max_seqlen_q, "max_seqlen_q");
    check_cu_seqlens_values(cu_seqlens_k, "cu_seqlens_k", vs.total_k, "total_k = k.shape[0]", max_seqlen_k, "max_seqlen_k");
  }
  s.batch = cu_seqlens_q.size(0) - 1;
  s.seqlen_q = max_seqlen_q;
  s.seqlen_k = max_seqlen_k;
  s.has_seqlens_k = false;

  check_mask_and_scale(s, is_causal, causal_alignment, scale);
  check_attention_variants(s, q, window_left, window_right, softcap, sinks, dropout_p, rng_state);
  return vs;
}

void check_varlen_grad_args(const VarlenShape& shape, const at::Tensor& q, const at::Tensor& grad_out,
                            const c10::optional<at::Tensor>& grad_lse, const at::Tensor& out,
                            const at::Tensor& lse) {
  check_grad_tensors_like_forward(q, grad_out, grad_lse, out, lse, {shape.attn.heads, shape.total_q},
                                  "[H, total_q]");
}

}  // namespace tfkernels
