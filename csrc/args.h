// Argument validation shared by every device's kernels. Each check names the
// argument, what was expected and what came, so a user never has to guess.
// The functions return plain structs of sizes and flags that kernels consume.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>

#include "head_dim.h"

namespace tfkernels {

enum class GeluApprox { kNone, kTanh };

GeluApprox parse_gelu_approximate(c10::string_view approximate);

// Floating dtype among `allowed` (CPU: f32, f64, bf16, f16; CUDA kernels may allow fewer).
void check_dtype_in(const at::Tensor& t, const char* name, c10::ArrayRef<at::ScalarType> allowed);
void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout);
void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name);
void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name);
void check_dim_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected, const char* what);
void check_last_dim_contiguous(const at::Tensor& t, const char* name);

struct AttentionShape {
  int64_t batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim;
  float scale;           // softmax scale (default 1/sqrt(head_dim))
  bool causal;
  bool bottom_right;     // causal alignment: query i sees keys j <= i + (len_k - Sq)
  bool has_seqlens_k;
  // Variants (see csrc/ops.cpp). The window is as given, not yet combined with causal.
  int64_t window_left, window_right;  // -1 = unbounded
  float softcap;                      // 0 = off
  bool has_sinks;
  float dropout_p;                    // 0 = off
};

// Validates q, k, v (and seqlens_k, including its values when it lives on the CPU),
// resolves the scale and alignment, and validates the variants: window sizes >= -1,
// softcap finite and >= 0, sinks float32 [H] contiguous on q's device, dropout_p in
// [0, 1) with rng_state int64 [2] on q's device when dropout_p > 0.
AttentionShape check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    bool is_causal, c10::string_view causal_alignment,
                                    c10::optional<double> scale,
                                    const c10::optional<at::Tensor>& seqlens_k, int64_t window_left,
                                    int64_t window_right, double softcap, const c10::optional<at::Tensor>& sinks,
                                    double dropout_p, const c10::optional<at::Tensor>& rng_state);

// The variants alone (window, softcap, sinks against s.heads, dropout and rng_state), into s;
// check_attention_args calls it, and so do the ops with their own q/k/v layouts.
void check_attention_variants(AttentionShape& s, const at::Tensor& q, int64_t window_left, int64_t window_right,
                              double softcap, const c10::optional<at::Tensor>& sinks, double dropout_p,
                              const c10::optional<at::Tensor>& rng_state);

// The dropout RNG state: rng_state int64 [2] (seed, offset) on `device`.
void check_rng_state(const at::Tensor& rng_state, const at::Tensor& ref, const char* ref_name);

// For the backward: grad_out and out like q, lse float32 [B,H,Sq], grad_lse like lse.
void check_attention_grad_args(const AttentionShape& shape, const at::Tensor& q,
                               const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse,
                               const at::Tensor& out, const at::Tensor& lse);

struct QkvShape {
  int64_t batch, seqlen, embed, heads, kv_heads, head_dim;
  int64_t out_features() const { return (heads + 2 * kv_heads) * head_dim; }
};

QkvShape check_qkv_args(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, int64_t num_heads, int64_t num_kv_heads);
void check_qkv_grad_args(const QkvShape& shape, const at::Tensor& x, const at::Tensor& grad_q,
                         const at::Tensor& grad_k, const at::Tensor& grad_v);

// A linear layer x [..., K] times weight [N, K]^T (+ bias [N]); rows = prod(leading dims).
struct LinearShape {
  int64_t rows, in_features, out_features;
};

LinearShape check_linear_args(const at::Tensor& x, const char* x_name, const at::Tensor& weight,
                              const char* weight_name, const c10::optional<at::Tensor>& bias,
                              const char* bias_name);
// The second layer of an MLP: w2 [N, F] with F = `hidden` (w1.shape[0]), b2 [N].
void check_mlp_second_layer(const at::Tensor& x, const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                            int64_t hidden);
// `t` must be [..., features] with the same leading dims as `x`.
void check_rows_like(const at::Tensor& t, const char* name, const at::Tensor& x, const char* x_name,
                     int64_t features);

}  // namespace tfkernels
