// Every tfkernels op schema, in one place. Kernels register per dispatch key in
// csrc/cpu/ (CPU) and csrc/cuda/ (CUDA); autograd and fake (meta) kernels are
// registered from Python in tfkernels/ops.py.
//
// Conventions: tensors first, then attributes. Forward ops return everything the
// backward needs (the attention log-sum-exp, the MLP pre-activation), so autograd
// saves outputs instead of recomputing them; `save_pre=false` skips that memory in
// inference.
#include "op_namespace.h"

TFKERNELS_LIBRARY(TFKERNELS_OP_NAMESPACE, m) {
  // Attention. q [B,H,Sq,D]; k, v [B,Hkv,Sk,D]; H % Hkv == 0. causal_alignment is
  // "top_left" (SDPA's is_causal) or "bottom_right" (FlashAttention's). seqlens_k
  // is an integer [B] of valid key lengths. lse is float32 [B,H,Sq]; -inf marks a
  // query row that sees no key (its output is 0). `deterministic` only affects the
  // backward; it is an argument of the forward so that autograd can carry it.
  // Variants (README, Semantics): window_left/right bound the keys a row sees
  // around its (alignment-shifted) diagonal, -1 = unbounded; softcap c > 0 maps
  // scores to c * tanh(s / c), 0 = off; sinks (float32 [H] or None) join every
  // row's softmax denominator, and lse includes them; dropout_p > 0 drops
  // probabilities with the counter-based RNG of csrc/dropout_rng.h seeded by
  // rng_state (int64 [2] = seed, offset, on q's device), which the backward
  // reuses to regenerate the same mask.
  m.def(
      "flash_attention_fwd(Tensor q, Tensor k, Tensor v, bool is_causal, str causal_alignment, "
      "float? scale, Tensor? seqlens_k, bool deterministic, int window_left, int window_right, "
      "float softcap, Tensor? sinks, float dropout_p, Tensor? rng_state) -> (Tensor out, Tensor lse)");
  // grad_lse is optional: it is non-None only when a caller differentiates through lse.
  // grad_sinks is float32 [H] with sinks, else an empty float32 [0].
  m.def(
      "flash_attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, bool is_causal, str causal_alignment, float? scale, "
      "Tensor? seqlens_k, bool deterministic, int window_left, int window_right, float softcap, "
      "Tensor? sinks, float dropout_p, Tensor? rng_state) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_sinks)");
  // Packed variable-length attention (FlashAttention's varlen layout). q [total_q,H,D],
  // k, v [total_k,Hkv,D] (last dim contiguous, any row/head strides); sequence b owns
  // rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] of q (and likewise of k, v). cu_seqlens
  // are int32 [B+1] on q's device, start at 0, never decrease, and end at total; every
  // length is <= max_seqlen (which sizes the CUDA grid). out [total_q,H,D]; lse float32
  // [H,total_q]. Every other argument means what it means for flash_attention_fwd, per
  // sequence: the causal offset uses that sequence's lengths, and dropout draws for
  // (sequence b, head, row, key) as the padded op does for batch entry b.
  m.def(
      "flash_attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, bool is_causal, str causal_alignment, float? scale, "
      "bool deterministic, int window_left, int window_right, float softcap, Tensor? sinks, float dropout_p, "
      "Tensor? rng_state) -> (Tensor out, Tensor lse)");
  m.def(
      "flash_attention_varlen_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "bool is_causal, str causal_alignment, float? scale, bool deterministic, int window_left, "
      "int window_right, float softcap, Tensor? sinks, float dropout_p, Tensor? rng_state) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_sinks)");
  // Attention over a KV cache, inference only (FlashAttention's flash_attn_with_kvcache).
  // q [B,Sq,H,D]. The cache is dense, k_cache/v_cache [B,S_cache,Hkv,D], or paged,
  // [num_blocks,block_size,Hkv,D] with block_table int32 [B,max_blocks] (row p of
  // sequence b lives in block block_table[b][p / block_size], slot p % block_size).
  // The new k, v [B,Snew,Hkv,D] (both or neither) are written into the cache in place
  // at rows cache_seqlens[b] .. + Snew (int32 [B]), rotated first when rotary_cos/sin
  // [seqlen_ro, rotary_dim/2] are given (interleaved: pairs 2i, 2i+1; else i, i +
  // rotary_dim/2); q is rotated at positions cache_seqlens[b] + i when causal or
  // windowed, else at cache_seqlens[b]. Sequence b then attends over its
  // cache_seqlens[b] + Snew keys, causal and window bottom-right aligned. num_splits:
  // key ranges computed apart and merged by lse (0 = chosen from the shape). out
  // [B,Sq,H,D]; lse float32 [B,H,Sq].
  m.def(
      "flash_attention_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
      "Tensor cache_seqlens, Tensor? block_table, Tensor? rotary_cos, Tensor? rotary_sin, "
      "bool rotary_interleaved, bool is_causal, float? scale, int window_left, int window_right, "
      "float softcap, Tensor? sinks, int num_splits) -> (Tensor out, Tensor lse)");
  // Test-only: the attention dropout keep mask, bool [B,H,Sq,Sk], that the kernels
  // draw for rng_state and dropout_p (True = kept), so tests can compare exactly.
  m.def(
      "_dropout_mask(Tensor rng_state, int batch, int heads, int seqlen_q, int seqlen_k, float dropout_p) "
      "-> Tensor");

  // Fused QKV projection. x [B,S,E]; weight [(H+2*Hkv)*D, E] with rows ordered q heads,
  // k heads, v heads; returns q [B,H,S,D] and k, v [B,Hkv,S,D], contiguous.
  m.def(
      "fused_qkv(Tensor x, Tensor weight, Tensor? bias, int num_heads, int num_kv_heads) "
      "-> (Tensor q, Tensor k, Tensor v)");
  // grad_bias is always computed (a cheap reduction); autograd drops it without a bias.
  m.def(
      "fused_qkv_bwd(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor x, Tensor weight) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  // GELU family. approximate is "none" (erf) or "tanh". x [..., N] for bias_gelu,
  // [..., K] with weight [N, K] for the linear ops.
  m.def("bias_gelu(Tensor x, Tensor bias, str approximate) -> Tensor");
  m.def(
      "bias_gelu_bwd(Tensor grad_out, Tensor x, Tensor bias, str approximate) "
      "-> (Tensor grad_x, Tensor grad_bias)");
  m.def(
      "linear_gelu(Tensor x, Tensor weight, Tensor? bias, str approximate, bool save_pre) "
      "-> (Tensor out, Tensor pre)");
  m.def(
      "linear_gelu_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor pre, str approximate) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // out = gelu(x W1^T + b1) W2^T + b2. `pre` (x W1^T + b1) is kept for the backward,
  // which recomputes gelu(pre) instead of storing the hidden activation too.
  m.def(
      "fused_mlp(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str approximate, "
      "bool save_pre) -> (Tensor out, Tensor pre)");
  m.def(
      "fused_mlp_bwd(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, Tensor pre, str approximate) "
      "-> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");

  // Test-only: runs one PTX primitive in one warp (csrc/cuda/probe/), for the
  // fragment-layout tests against the PTX ISA's tables. CUDA (and emulated) only.
  m.def("_ptx_probe(str probe, Tensor input, int out_numel, int divisor) -> Tensor");
}
