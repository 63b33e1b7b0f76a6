// The CPU flash-attention ops: flash_attention_fwd/_bwd (padded [B,H,S,D]) and
// flash_attention_varlen_fwd/_bwd (packed [total,H,D] with cu_seqlens). Each checks
// its arguments (csrc/args.cpp), allocates the outputs, describes where its
// sequences and rows are (flash_attention_layout.h) and runs the shared kernels
// (flash_attention.cpp). Nothing is copied into another layout: the packed op
// reads q, k, v in place (only a row stride below D, e.g. a broadcast row dim,
// forces one contiguous copy, as it does for the padded op).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "alloc.h"
#include "args.h"
#include "cpu/flash_attention_kernels.h"

namespace tfkernels::cpu {
namespace {

// Row stride >= D lets BLAS read rows in place; anything else (a broadcast or
// overlapping row dim) is copied once. `row_dim` is the tensor's sequence dim.
at::Tensor readable(const at::Tensor& t, int64_t row_dim) {
  const int64_t D = t.size(-1);
  const bool ok = t.size(row_dim) <= 1 || t.stride(row_dim) >= std::max<int64_t>(D, 1);
  return ok && (D <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// A row stride BLAS accepts: size-1 dims may carry any stride; give them the
// contiguous one (BLAS checks ld >= D).
int64_t row_stride(const at::Tensor& t, int64_t row_dim) {
  const int64_t D = t.size(-1);
  const int64_t ss = t.size(row_dim) > 1 ? t.stride(row_dim) : D;
  return std::max<int64_t>(ss, std::max<int64_t>(D, 1));
}

// [B, H, S, D] (any strides, last dim contiguous).
Rows padded_rows(const at::Tensor& t) {
  return Rows{t, RowLayout::padded(t.stride(0), t.stride(1), row_stride(t, 2), t.size(2))};
}

// [total, H, D] (any strides, last dim contiguous).
Rows packed_rows(const at::Tensor& t) { return Rows{t, RowLayout::packed(t.stride(1), row_stride(t, 0))}; }

// The softmax scale in double. AttentionShape.scale holds it as float, which is
// enough for float/bf16/half but would cost float64 results their precision;
// resolved exactly as check_attention_args does.
double resolve_scale(int64_t head_dim, c10::optional<double> scale) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

Variants make_variants(double softcap, const c10::optional<at::Tensor>& sinks, double dropout_p,
                       const c10::optional<at::Tensor>& rng_state) {
  Variants var;
  var.softcap = softcap;
  if (sinks.has_value() && sinks->defined()) var.sinks = sinks->data_ptr<float>();
  if (dropout_p > 0) {
    const int64_t* state = rng_state->data_ptr<int64_t>();
    var.dropout = true;
    var.rng = dropout::DropoutRng::make(static_cast<uint64_t>(state[0]), static_cast<uint64_t>(state[1]),
                                        static_cast<float>(dropout_p));
    var.keep_scale = 1.0 / (1.0 - dropout_p);
  }
  return var;
}

AttentionCall make_call(const AttentionShape& s, c10::optional<double> scale, const Sequences& seqs, int64_t reach,
                        double softcap, const c10::optional<at::Tensor>& sinks, double dropout_p,
                        const c10::optional<at::Tensor>& rng_state) {
  return AttentionCall{s.heads,
                       s.kv_heads,
                       s.head_dim,
                       resolve_scale(s.head_dim, scale),
                       seqs,
                       Band::make(reach, s.causal, s.bottom_right, s.window_left, s.window_right),
                       make_variants(softcap, sinks, dropout_p, rng_state)};
}

at::Tensor empty_grad_sinks(const AttentionShape& s, const at::Tensor& q) {
  return s.has_sinks ? empty_output({s.heads}, q.options().dtype(at::kFloat))
                     : at::empty({0}, q.options().dtype(at::kFloat));
}

// ------------------------------------------------------------------ padded: [B, H, S, D]

// The padded call's sequences; `lens_holder` keeps seqlens_k (as int64) alive.
Sequences padded_sequences(const AttentionShape& s, const c10::optional<at::Tensor>& seqlens_k,
                           at::Tensor& lens_holder) {
  const int64_t* lens = nullptr;
  if (s.has_seqlens_k) {
    lens_holder = seqlens_k->to(at::kLong).contiguous();
    lens = lens_holder.data_ptr<int64_t>();
  }
  return Sequences::padded(s.batch, s.seqlen_q, s.seqlen_k, lens);
}

// lse [B, H, Sq], contiguous.
Rows padded_lse_rows(const at::Tensor& lse, const AttentionShape& s) {
  return Rows{lse, RowLayout::padded(s.heads * s.seqlen_q, s.seqlen_q, 1, s.seqlen_q)};
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool is_causal, c10::string_view causal_alignment,
    c10::optional<double> scale, const c10::optional<at::Tensor>& seqlens_k, bool /*deterministic*/,
    int64_t window_left, int64_t window_right, double softcap, const c10::optional<at::Tensor>& sinks,
    double dropout_p, const c10::optional<at::Tensor>& rng_state) {
  const AttentionShape s = check_attention_args(q, k, v, is_causal, causal_alignment, scale, seqlens_k, window_left,
                                                window_right, softcap, sinks, dropout_p, rng_state);
  at::Tensor out = empty_output({s.batch, s.heads, s.seqlen_q, s.head_dim}, q.options());
  at::Tensor lse = empty_output({s.batch, s.heads, s.seqlen_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  at::Tensor lens_holder;
  const AttentionCall call = make_call(s, scale, padded_sequences(s, seqlens_k, lens_holder),
                                       s.seqlen_q + s.seqlen_k, softcap, sinks, dropout_p, rng_state);
  flash_forward(call, padded_rows(readable(q, 2)), padded_rows(readable(k, 2)), padded_rows(readable(v, 2)),
                padded_rows(out), padded_lse_rows(lse, s));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool is_causal,
    c10::string_view causal_alignment, c10::optional<double> scale, const c10::optional<at::Tensor>& seqlens_k,
    bool /*deterministic: the CPU backward always is*/, int64_t window_left, int64_t window_right, double softcap,
    const c10::optional<at::Tensor>& sinks, double dropout_p, const c10::optional<at::Tensor>& rng_state) {
  const AttentionShape s = check_attention_args(q, k, v, is_causal, causal_alignment, scale, seqlens_k, window_left,
                                                window_right, softcap, sinks, dropout_p, rng_state);
  check_attention_grad_args(s, q, grad_out, grad_lse, out, lse);
  at::Tensor gq = empty_output_like(q), gk = empty_output_like(k), gv = empty_output_like(v);
  at::Tensor gsinks = empty_grad_sinks(s, q);
  at::Tensor lens_holder;
  const AttentionCall call = make_call(s, scale, padded_sequences(s, seqlens_k, lens_holder),
                                       s.seqlen_q + s.seqlen_k, softcap, sinks, dropout_p, rng_state);
  at::Tensor glse_c;
  if (grad_lse.has_value() && grad_lse->defined()) glse_c = grad_lse->contiguous();
  const Rows glse_rows = glse_c.defined() ? padded_lse_rows(glse_c, s) : Rows{};
  flash_backward(call, padded_rows(readable(q, 2)), padded_rows(readable(k, 2)), padded_rows(readable(v, 2)),
                 padded_rows(readable(out, 2)), padded_rows(readable(grad_out, 2)),
                 padded_lse_rows(lse.contiguous(), s), glse_c.defined() ? &glse_rows : nullptr, padded_rows(gq),
                 padded_rows(gk), padded_rows(gv), s.has_sinks ? gsinks.data_ptr<float>() : nullptr);
  return {gq, gk, gv, gsinks};
}

// ------------------------------------------------------------------ packed: [total, H, D] + cu_seqlens

// The packed call's sequences, after checking cu_seqlens' values; the holders keep
// the (contiguous) cu_seqlens alive.
Sequences packed_sequences(const VarlenShape& s, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                           at::Tensor& cu_q_holder, at::Tensor& cu_k_holder) {
  cu_q_holder = cu_seqlens_q.contiguous();
  cu_k_holder = cu_seqlens_k.contiguous();
  const int32_t* cu_q = cu_q_holder.data_ptr<int32_t>();
  const int32_t* cu_k = cu_k_holder.data_ptr<int32_t>();
  check_cu_seqlens_values(s, cu_q, cu_k);
  return Sequences::packed(s.attn.batch, cu_q, cu_k);
}

// lse [H, total_q], contiguous.
Rows packed_lse_rows(const at::Tensor& lse, const VarlenShape& s) {
  return Rows{lse, RowLayout::packed(s.total_q, 1)};
}

std::tuple<at::Tensor, at::Tensor> flash_attention_varlen_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool is_causal,
    c10::string_view causal_alignment, c10::optional<double> scale, bool /*deterministic*/, int64_t window_left,
    int64_t window_right, double softcap, const c10::optional<at::Tensor>& sinks, double dropout_p,
    const c10::optional<at::Tensor>& rng_state) {
  const VarlenShape s =
      check_varlen_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                                  causal_alignment, scale, window_left, window_right, softcap, sinks, dropout_p,
                                  rng_state);
  at::Tensor cu_q, cu_k;
  const Sequences seqs = packed_sequences(s, cu_seqlens_q, cu_seqlens_k, cu_q, cu_k);
  at::Tensor out = empty_output({s.total_q, s.attn.heads, s.attn.head_dim}, q.options());
  at::Tensor lse = empty_output({s.attn.heads, s.total_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const AttentionCall call =
      make_call(s.attn, scale, seqs, s.total_q + s.total_k, softcap, sinks, dropout_p, rng_state);
  flash_forward(call, packed_rows(readable(q, 0)), packed_rows(readable(k, 0)), packed_rows(readable(v, 0)),
                packed_rows(out), packed_lse_rows(lse, s));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_attention_varlen_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    bool is_causal, c10::string_view causal_alignment, c10::optional<double> scale,
    bool /*deterministic: the CPU backward always is*/, int64_t window_left, int64_t window_right, double softcap,
    const c10::optional<at::Tensor>& sinks, double dropout_p, const c10::optional<at::Tensor>& rng_state) {
  const VarlenShape s =
      check_varlen_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                                  causal_alignment, scale, window_left, window_right, softcap, sinks, dropout_p,
                                  rng_state);
  check_varlen_grad_args(s, q, grad_out, grad_lse, out, lse);
  at::Tensor cu_q, cu_k;
  const Sequences seqs = packed_sequences(s, cu_seqlens_q, cu_seqlens_k, cu_q, cu_k);
  at::Tensor gq = empty_output_like(q), gk = empty_output_like(k), gv = empty_output_like(v);
  at::Tensor gsinks = empty_grad_sinks(s.attn, q);
  const AttentionCall call =
      make_call(s.attn, scale, seqs, s.total_q + s.total_k, softcap, sinks, dropout_p, rng_state);
  at::Tensor glse_c;
  if (grad_lse.has_value() && grad_lse->defined()) glse_c = grad_lse->contiguous();
  const Rows glse_rows = glse_c.defined() ? packed_lse_rows(glse_c, s) : Rows{};
  flash_backward(call, packed_rows(readable(q, 0)), packed_rows(readable(k, 0)), packed_rows(readable(v, 0)),
                 packed_rows(readable(out, 0)), packed_rows(readable(grad_out, 0)),
                 packed_lse_rows(lse.contiguous(), s), glse_c.defined() ? &glse_rows : nullptr, packed_rows(gq),
                 packed_rows(gk), packed_rows(gv), s.attn.has_sinks ? gsinks.data_ptr<float>() : nullptr);
  return {gq, gk, gv, gsinks};
}

}  // namespace
}  // namespace tfkernels::cpu

TORCH_LIBRARY_IMPL(tfkernels, CPU, m) {
  m.impl("flash_attention_fwd", &tfkernels::cpu::flash_attention_fwd_cpu);
  m.impl("flash_attention_bwd", &tfkernels::cpu::flash_attention_bwd_cpu);
  m.impl("flash_attention_varlen_fwd", &tfkernels::cpu::flash_attention_varlen_fwd_cpu);
  m.impl("flash_attention_varlen_bwd", &tfkernels::cpu::flash_attention_varlen_bwd_cpu);
}
