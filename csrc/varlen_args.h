// Argument checks of the packed variable-length attention ops
// (flash_attention_varlen_fwd/_bwd), shared by every device so that each gives the
// same messages: q [total_q,H,D], k, v [total_k,Hkv,D], cu_seqlens_q/k int32 [B+1]
// and max_seqlen_q/k, plus everything flash_attention checks (args.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>

#include "args.h"

namespace tfkernels {

struct VarlenShape {
  // batch = B (sequences), seqlen_q/seqlen_k = max_seqlen_q/k, has_seqlens_k false.
  AttentionShape attn;
  int64_t total_q, total_k;  // rows of q and of k, v
};

// check_values: read cu_seqlens (a device-to-host copy when they live on a GPU) and
// check them: cu[0] = 0, never decreasing, cu[-1] = the tensor's rows, every length
// <= max_seqlen. False only where reading is impossible (CUDA graph capture); the
// kernels clamp then, so bad values cannot reach outside the tensors.
VarlenShape check_varlen_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                        int64_t max_seqlen_q, int64_t max_seqlen_k, bool is_causal,
                                        c10::string_view causal_alignment, c10::optional<double> scale,
                                        int64_t window_left, int64_t window_right, double softcap,
                                        const c10::optional<at::Tensor>& sinks, double dropout_p,
                                        const c10::optional<at::Tensor>& rng_state, bool check_values);

// For the backward: grad_out and out like q, lse float32 [H, total_q], grad_lse like lse.
void check_varlen_grad_args(const VarlenShape& shape, const at::Tensor& q, const at::Tensor& grad_out,
                            const c10::optional<at::Tensor>& grad_lse, const at::Tensor& out,
                            const at::Tensor& lse);

}  // namespace tfkernels
