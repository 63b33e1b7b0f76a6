#include "args.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <string>

namespace tfkernels {

namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.dim() << "-D " << t.sizes();
  return s.str();
}

}  // namespace

GeluApprox parse_gelu_approximate(c10::string_view approximate) {
  if (approximate == "none") return GeluApprox::kNone;
  if (approximate == "tanh") return GeluApprox::kTanh;
  TORCH_CHECK(false, "tfkernels: approximate must be \"none\" or \"tanh\", got \"",
              std::string(approximate), "\"");
}

void check_dtype_in(const at::Tensor& t, const char* name, c10::ArrayRef<at::ScalarType> allowed) {
  TORCH_CHECK(t.defined(), "tfkernels: ", name, " is an undefined tensor");
  for (auto dtype : allowed) {
    if (t.scalar_type() == dtype) return;
  }
  std::ostringstream s;
  for (size_t i = 0; i < allowed.size(); ++i) s << (i ? ", " : "") << allowed[i];
  TORCH_CHECK(false, "tfkernels: ", name, " must have dtype in {", s.str(), "} on ", t.device().type(),
              ", got ", t.scalar_type());
}

void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK(t.dim() == rank, "tfkernels: ", name, " must be a ", rank, "-D tensor ", layout, ", got ",
              shape_str(t));
}

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "tfkernels: ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "tfkernels: ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

void check_dim_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected, const char* what) {
  TORCH_CHECK(t.size(dim) == expected, "tfkernels: ", name, ".shape[", dim, "] (", what, ") must be ",
              expected, ", got ", t.size(dim), " (", name, " is ", shape_str(t), ")");
}

void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  // An empty tensor has no element to read: any strides (autograd hands over expanded zeros).
  TORCH_CHECK(t.dim() == 0 || t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "tfkernels: ", name,
              " must be contiguous in its last dimension (stride 1), got strides ", t.strides());
}

static void check_floating_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                                const char* ref_name) {
  check_same_device(t, name, ref, ref_name);
  check_same_dtype(t, name, ref, ref_name);
}

void check_rng_state(const at::Tensor& rng_state, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(rng_state.scalar_type() == at::kLong && rng_state.dim() == 1 && rng_state.size(0) == 2,
              "tfkernels: rng_state must be an int64 tensor [2] (seed, offset), got ", rng_state.scalar_type(), " ",
              shape_str(rng_state));
  check_same_device(rng_state, "rng_state", ref, ref_name);
}

void check_attention_variants(AttentionShape& s, const at::Tensor& q, int64_t window_left,
                                     int64_t window_right, double softcap, const c10::optional<at::Tensor>& sinks,
                                     double dropout_p, const c10::optional<at::Tensor>& rng_state) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1,
              "tfkernels: window_size must be a pair of ints >= -1 (-1 = unbounded), got (", window_left, ", ",
              window_right, ")");
  s.window_left = window_left;
  s.window_right = window_right;
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0,
              "tfkernels: softcap must be a finite number >= 0 (0 = off), got ", softcap);
  s.softcap = static_cast<float>(softcap);
  s.has_sinks = sinks.has_value() && sinks->defined();
  if (s.has_sinks) {
    const at::Tensor& t = *sinks;
    TORCH_CHECK(t.scalar_type() == at::kFloat, "tfkernels: sinks must be float32 (the Python wrapper casts), got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == s.heads, "tfkernels: sinks must be a 1-D tensor [H] with H = ",
                s.heads, " (q.shape[1]), got ", shape_str(t));
    TORCH_CHECK(t.is_contiguous(), "tfkernels: sinks must be contiguous, got strides ", t.strides());
    check_same_device(t, "sinks", q, "q");
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "tfkernels: dropout_p must be in [0, 1), got ", dropout_p);
  s.dropout_p = static_cast<float>(dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(rng_state.has_value() && rng_state->defined(),
                "tfkernels: rng_state (int64 [2]) is required when dropout_p > 0, got None");
    check_rng_state(*rng_state, q, "q");
  }
}

// The causal flag and alignment, and the scale (default 1/sqrt(head_dim)); s.head_dim must be set.
static void check_mask_and_scale(AttentionShape& s, bool is_causal, c10::string_view causal_alignment,
                                 c10::optional<double> scale) {
  TORCH_CHECK(causal_alignment == "top_left" || causal_alignment == "bottom_right",
              "tfkernels: causal_alignment must be \"top_left\" or \"bottom_right\", got \"",
              std::string(causal_alignment), "\"");
  s.causal = is_causal;
  s.bottom_right = causal_alignment == "bottom_right";

  double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  TORCH_CHECK(std::isfinite(sc), "tfkernels: scale must be finite, got ", sc);
  s.scale = static_cast<float>(sc);
}

AttentionShape check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    bool is_causal, c10::string_view causal_alignment,
                                    c10::optional<double> scale,
                                    const c10::optional<at::Tensor>& seqlens_k, int64_t window_left,
                                    int64_t window_right, double softcap, const c10::optional<at::Tensor>& sinks,
                                    double dropout_p, const c10::optional<at::Tensor>& rng_state) {
  check_dtype_in(q, "q", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  check_rank(q, "q", 4, "[B, H, Sq, D]");
  check_rank(k, "k", 4, "[B, Hkv, Sk, D]");
  check_rank(v, "v", 4, "[B, Hkv, Sk, D]");
  check_floating_like(k, "k", q, "q");
  check_floating_like(v, "v", q, "q");

  AttentionShape s{};
  s.batch = q.size(0);
  s.heads = q.size(1);
  s.seqlen_q = q.size(2);
  s.head_dim = q.size(3);
  s.kv_heads = k.size(1);
  s.seqlen_k = k.size(2);
  TORCH_CHECK(s.head_dim >= 1 && s.head_dim <= kMaxHeadDim, "tfkernels: head dim q.shape[3] must be in [1, ",
              kMaxHeadDim, "], got ", s.head_dim);
  check_dim_size(k, "k", 0, s.batch, "batch, as q");
  check_dim_size(k, "k", 3, s.head_dim, "head dim, as q");
  check_dim_size(v, "v", 0, s.batch, "batch, as q");
  check_dim_size(v, "v", 1, s.kv_heads, "kv heads, as k");
  check_dim_size(v, "v", 2, s.seqlen_k, "Sk, as k");
  check_dim_size(v, "v", 3, s.head_dim, "head dim, as q");
  TORCH_CHECK(s.kv_heads >= 1 && s.heads % s.kv_heads == 0, "tfkernels: the number of query heads (q.shape[1] = ",
              s.heads, ") must be a multiple of the number of kv heads (k.shape[1] = ", s.kv_heads, ")");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");

  check_mask_and_scale(s, is_causal, causal_alignment, scale);

  s.has_seqlens_k = seqlens_k.has_value() && seqlens_k->defined();
  if (s.has_seqlens_k) {
    const at::Tensor& lens = *seqlens_k;
    TORCH_CHECK(lens.scalar_type() == at::kInt || lens.scalar_type() == at::kLong,
                "tfkernels: seqlens_k must have dtype int32 or int64, got ", lens.scalar_type());
    TORCH_CHECK(lens.dim() == 1 && lens.size(0) == s.batch, "tfkernels: seqlens_k must be a 1-D tensor [B] with B = ",
                s.batch, ", got ", shape_str(lens));
    check_same_device(lens, "seqlens_k", q, "q");
    // Values can be read without a host sync only on the CPU; CUDA kernels clamp
    // lengths to [0, Sk] instead of reading them back.
    if (lens.device().is_cpu() && s.batch > 0) {
      const int64_t lo = lens.min().item<int64_t>();
      const int64_t hi = lens.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi <= s.seqlen_k, "tfkernels: seqlens_k values must lie in [0, Sk = ", s.seqlen_k,
                  "], got min ", lo, " and max ", hi);
    }
  }
  check_attention_variants(s, q, window_left, window_right, softcap, sinks, dropout_p, rng_state);
  return s;
}

// grad_out and out of an attention backward: q's dtype, device and shape, last dim contiguous.
static void check_grad_out_and_out(const at::Tensor& q, const at::Tensor& grad_out, const at::Tensor& out) {
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"}, {out, "out"}}) {
    check_floating_like(t, name, q, "q");
    TORCH_CHECK(t.sizes() == q.sizes(), "tfkernels: ", name, " must have the shape of q ", q.sizes(), ", got ",
                t.sizes());
    check_last_dim_contiguous(t, name);
  }
}

// grad_lse (optional) of an attention backward: float32 of lse's shape, on q's device.
static void check_grad_lse(const c10::optional<at::Tensor>& grad_lse, const at::Tensor& lse, const at::Tensor& q) {
  if (grad_lse.has_value() && grad_lse->defined()) {
    TORCH_CHECK(grad_lse->sizes() == lse.sizes() && grad_lse->scalar_type() == at::kFloat,
                "tfkernels: grad_lse must be float32 of the shape of lse ", lse.sizes(), ", got ",
                grad_lse->scalar_type(), " ", grad_lse->sizes());
    check_same_device(*grad_lse, "grad_lse", q, "q");
  }
}

void check_attention_grad_args(const AttentionShape& s, const at::Tensor& q, const at::Tensor& grad_out,
                               const c10::optional<at::Tensor>& grad_lse, const at::Tensor& out,
                               const at::Tensor& lse) {
  check_grad_out_and_out(q, grad_out, out);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == s.batch &&
                  lse.size(1) == s.heads && lse.size(2) == s.seqlen_q,
              "tfkernels: lse must be float32 [B, H, Sq] = [", s.batch, ", ", s.heads, ", ", s.seqlen_q, "], got ",
              lse.scalar_type(), " ", lse.sizes());
  check_same_device(lse, "lse", q, "q");
  check_grad_lse(grad_lse, lse, q);
}

// ------------------------------------------------------------------ packed variable-length attention

// cu_seqlens_q or _k: int32 [B + 1] on q's device.
static void check_cu_seqlens_tensor(const at::Tensor& cu, const char* name, const at::Tensor& q) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, "tfkernels: ", name, " must have dtype int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, "tfkernels: ", name,
              " must be a 1-D tensor [B + 1] (B >= 0 sequences), got ", shape_str(cu));
  check_same_device(cu, name, q, "q");
}

VarlenShape check_varlen_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                        int64_t max_seqlen_q, int64_t max_seqlen_k, bool is_causal,
                                        c10::string_view causal_alignment, c10::optional<double> scale,
                                        int64_t window_left, int64_t window_right, double softcap,
                                        const c10::optional<at::Tensor>& sinks, double dropout_p,
                                        const c10::optional<at::Tensor>& rng_state) {
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
  // cu_seqlens are int32: every row index must fit.
  constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(vs.total_q <= kMaxRows && vs.total_k <= kMaxRows, "tfkernels: q.shape[0] (total_q = ", vs.total_q,
              ") and k.shape[0] (total_k = ", vs.total_k, ") must be <= ", kMaxRows, " (cu_seqlens are int32)");

  check_cu_seqlens_tensor(cu_seqlens_q, "cu_seqlens_q", q);
  check_cu_seqlens_tensor(cu_seqlens_k, "cu_seqlens_k", q);
  TORCH_CHECK(cu_seqlens_k.size(0) == cu_seqlens_q.size(0), "tfkernels: cu_seqlens_k must have the length of "
              "cu_seqlens_q (B + 1 = ", cu_seqlens_q.size(0), "), got ", cu_seqlens_k.size(0));
  s.batch = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK(max_seqlen_q >= 0, "tfkernels: max_seqlen_q must be >= 0, got ", max_seqlen_q);
  TORCH_CHECK(max_seqlen_k >= 0, "tfkernels: max_seqlen_k must be >= 0, got ", max_seqlen_k);
  s.seqlen_q = max_seqlen_q;
  s.seqlen_k = max_seqlen_k;
  s.has_seqlens_k = false;

  check_mask_and_scale(s, is_causal, causal_alignment, scale);
  check_attention_variants(s, q, window_left, window_right, softcap, sinks, dropout_p, rng_state);
  return vs;
}

// One of cu_seqlens_q / _k: starts at 0, never decreases, ends at `rows` (the
// tensor's), no sequence longer than max_seqlen.
static void check_cu_seqlens_values(const int32_t* cu, int64_t batch, const char* name, int64_t rows,
                                    const char* rows_what, int64_t max_seqlen, const char* max_name) {
  TORCH_CHECK(cu[0] == 0, "tfkernels: ", name, "[0] must be 0, got ", cu[0]);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], "tfkernels: ", name, " must be non-decreasing, got ", name, "[", b + 1, "] = ",
                cu[b + 1], " < ", name, "[", b, "] = ", cu[b]);
    TORCH_CHECK(cu[b + 1] - cu[b] <= max_seqlen, "tfkernels: sequence ", b, " is longer than ", max_name, " = ",
                max_seqlen, ": ", name, "[", b + 1, "] - ", name, "[", b, "] = ", cu[b + 1] - cu[b]);
  }
  TORCH_CHECK(cu[batch] == rows, "tfkernels: ", name, "[-1] must be the number of rows of ", rows_what, " = ", rows,
              ", got ", name, "[", batch, "] = ", cu[batch]);
}

void check_cu_seqlens_values(const VarlenShape& s, const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k) {
  check_cu_seqlens_values(cu_seqlens_q, s.attn.batch, "cu_seqlens_q", s.total_q, "q (q.shape[0])", s.attn.seqlen_q,
                          "max_seqlen_q");
  check_cu_seqlens_values(cu_seqlens_k, s.attn.batch, "cu_seqlens_k", s.total_k, "k (k.shape[0])", s.attn.seqlen_k,
                          "max_seqlen_k");
}

void check_varlen_grad_args(const VarlenShape& s, const at::Tensor& q, const at::Tensor& grad_out,
                            const c10::optional<at::Tensor>& grad_lse, const at::Tensor& out, const at::Tensor& lse) {
  check_grad_out_and_out(q, grad_out, out);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == s.attn.heads &&
                  lse.size(1) == s.total_q,
              "tfkernels: lse must be float32 [H, total_q] = [", s.attn.heads, ", ", s.total_q, "], got ",
              lse.scalar_type(), " ", lse.sizes());
  check_same_device(lse, "lse", q, "q");
  check_grad_lse(grad_lse, lse, q);
}

QkvShape check_qkv_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        int64_t num_heads, int64_t num_kv_heads) {
  check_dtype_in(x, "x", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  check_rank(x, "x", 3, "[B, S, E]");
  check_rank(weight, "weight", 2, "[(H + 2*Hkv) * D, E]");
  check_floating_like(weight, "weight", x, "x");
  TORCH_CHECK(num_heads >= 1, "tfkernels: num_heads must be >= 1, got ", num_heads);
  TORCH_CHECK(num_kv_heads >= 1 && num_heads % num_kv_heads == 0, "tfkernels: num_heads (", num_heads,
              ") must be a multiple of num_kv_heads, got num_kv_heads = ", num_kv_heads);
  QkvShape s{x.size(0), x.size(1), x.size(2), num_heads, num_kv_heads, 0};
  check_dim_size(weight, "weight", 1, s.embed, "E, as x.shape[2]");
  const int64_t rows = weight.size(0);
  const int64_t groups = num_heads + 2 * num_kv_heads;
  TORCH_CHECK(rows % groups == 0 && rows > 0, "tfkernels: weight.shape[0] must be (num_heads + 2*num_kv_heads) * "
              "head_dim = ", groups, " * D, got ", rows);
  s.head_dim = rows / groups;
  if (bias.has_value() && bias->defined()) {
    check_floating_like(*bias, "bias", x, "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == rows, "tfkernels: bias must be a 1-D tensor [", rows,
                "], got ", shape_str(*bias));
  }
  return s;
}

void check_qkv_grad_args(const QkvShape& s, const at::Tensor& x, const at::Tensor& grad_q, const at::Tensor& grad_k,
                         const at::Tensor& grad_v) {
  const std::vector<int64_t> q_shape{s.batch, s.heads, s.seqlen, s.head_dim};
  const std::vector<int64_t> kv_shape{s.batch, s.kv_heads, s.seqlen, s.head_dim};
  for (auto [t, name, shape] : {std::tuple<const at::Tensor&, const char*, const std::vector<int64_t>&>{
                                    grad_q, "grad_q", q_shape},
                                {grad_k, "grad_k", kv_shape},
                                {grad_v, "grad_v", kv_shape}}) {
    check_floating_like(t, name, x, "x");
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "tfkernels: ", name, " must have shape ", at::IntArrayRef(shape),
                ", got ", t.sizes());
  }
}

LinearShape check_linear_args(const at::Tensor& x, const char* x_name, const at::Tensor& weight,
                              const char* weight_name, const c10::optional<at::Tensor>& bias, const char* bias_name) {
  check_dtype_in(x, x_name, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  TORCH_CHECK(x.dim() >= 1, "tfkernels: ", x_name, " must have at least 1 dimension [..., K], got a scalar");
  check_rank(weight, weight_name, 2, "[N, K]");
  check_floating_like(weight, weight_name, x, x_name);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  LinearShape s{rows, x.size(-1), weight.size(0)};
  check_dim_size(weight, weight_name, 1, s.in_features, "K, as the last dim of the input");
  if (bias.has_value() && bias->defined()) {
    check_floating_like(*bias, bias_name, x, x_name);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.out_features, "tfkernels: ", bias_name,
                " must be a 1-D tensor [", s.out_features, "], got ", shape_str(*bias));
  }
  return s;
}

void check_mlp_second_layer(const at::Tensor& x, const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                            int64_t hidden) {
  check_rank(w2, "w2", 2, "[N, F]");
  check_floating_like(w2, "w2", x, "x");
  check_dim_size(w2, "w2", 1, hidden, "F, as w1.shape[0]");
  if (b2.has_value() && b2->defined()) {
    check_floating_like(*b2, "b2", x, "x");
    TORCH_CHECK(b2->dim() == 1 && b2->size(0) == w2.size(0), "tfkernels: b2 must be a 1-D tensor [", w2.size(0),
                "], got ", shape_str(*b2));
  }
}

void check_rows_like(const at::Tensor& t, const char* name, const at::Tensor& x, const char* x_name,
                     int64_t features) {
  check_floating_like(t, name, x, x_name);
  bool ok = t.dim() == x.dim() && t.size(-1) == features;
  for (int64_t d = 0; ok && d + 1 < x.dim(); ++d) ok = t.size(d) == x.size(d);
  TORCH_CHECK(ok, "tfkernels: ", name, " must have the leading dims of ", x_name, " ", x.sizes(),
              " and last dim ", features, ", got ", t.sizes());
}

}  // namespace tfkernels
