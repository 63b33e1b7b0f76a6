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
  m.def(
      "flash_attention_fwd(Tensor q, Tensor k, Tensor v, bool is_causal, str causal_alignment, "
      "float? scale, Tensor? seqlens_k, bool deterministic) -> (Tensor out, Tensor lse)");
  // grad_lse is optional: it is non-None only when a caller differentiates through lse.
  m.def(
      "flash_attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, bool is_causal, str causal_alignment, float? scale, "
      "Tensor? seqlens_k, bool deterministic) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

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
