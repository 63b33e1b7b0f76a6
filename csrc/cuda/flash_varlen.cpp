// The torch-facing entry points of the CUDA flash attention on packed
// variable-length batches (flash_attention_varlen_fwd/_bwd): q [total_q,H,D], k, v
// [total_k,Hkv,D], sequence b in rows cu_seqlens[b] .. cu_seqlens[b+1]. Checks
// (args.h, shared with the CPU kernels), then the launch shared with the
// padded ops (flash_launch.h). The kernels take each sequence's rows from
// cu_seqlens in their block bookkeeping (csrc/cuda/flash/block_info.h): no padding
// copies, grids over max_seqlen_q / max_seqlen_k.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "cuda/common/device_context.h"
#include "cuda/common/launcher_utils.h"
#include "cuda/flash_launch.h"
#include "cuda/unverified.h"
#include "args.h"

namespace tfkernels {
namespace {

// Checks shared by the forward and the backward. The values of cu_seqlens are read
// back (a tiny device-to-host copy) except during CUDA graph capture, where no sync
// is allowed: the kernels clamp them to the tensors' rows instead.
VarlenShape check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                         int64_t max_seqlen_k, bool is_causal, c10::string_view causal_alignment,
                         c10::optional<double> scale, int64_t window_left, int64_t window_right, double softcap,
                         const c10::optional<at::Tensor>& sinks, double dropout_p,
                         const c10::optional<at::Tensor>& rng_state) {
  const VarlenShape shape = check_varlen_attention_args(
      q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, causal_alignment, scale,
      window_left, window_right, softcap, sinks, dropout_p, rng_state);
  if (!device::stream_is_capturing()) {
    // One device-to-host copy when q and k share their offsets (self-attention).
    const at::Tensor cu_q = cu_seqlens_q.to(at::kCPU).contiguous();
    const at::Tensor cu_k = cu_seqlens_k.is_same(cu_seqlens_q) ? cu_q : cu_seqlens_k.to(at::kCPU).contiguous();
    check_cu_seqlens_values(shape, cu_q.data_ptr<int32_t>(), cu_k.data_ptr<int32_t>());
  }
  check_dtype_in(q, "q", {at::kHalf, at::kBFloat16, at::kFloat});
  device::check_on_device(q, "q");
  // Sequences and heads index grid dims z and y; rows stay below 2^30 so that the
  // kernels' int32 row arithmetic (row + tile size, clamped offsets) cannot overflow.
  const AttentionShape& s = shape.attn;
  cuda::check_limit("flash_attention_varlen", "heads and sequences", {s.heads, s.batch}, cuda::kMaxGridYZ);
  cuda::check_limit("flash_attention_varlen", "rows (total_q, total_k, max_seqlen_q, max_seqlen_k)",
                    {shape.total_q, shape.total_k, s.seqlen_q, s.seqlen_k}, (int64_t(1) << 30) - 1);
  return shape;
}

std::tuple<at::Tensor, at::Tensor> flash_attention_varlen_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool is_causal,
    c10::string_view causal_alignment, c10::optional<double> scale, bool deterministic, int64_t window_left,
    int64_t window_right, double softcap, const c10::optional<at::Tensor>& sinks, double dropout_p,
    const c10::optional<at::Tensor>& rng_state) {
  TFKERNELS_WARN_UNVERIFIED_CUDA("flash_attention_varlen");
  (void)deterministic;  // only the backward is affected
  const VarlenShape shape = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                                         causal_alignment, scale, window_left, window_right, softcap, sinks,
                                         dropout_p, rng_state);
  const device::Guard guard(q.device());
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const flash_launch::PackedRows packed{cu_q, cu_k, shape.total_q, shape.total_k};
  return flash_launch::forward(shape.attn, q, k, v, c10::nullopt, {sinks, rng_state}, &packed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_attention_varlen_bwd_cuda(
    const at::Tensor& grad_out_in, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    bool is_causal, c10::string_view causal_alignment, c10::optional<double> scale, bool deterministic,
    int64_t window_left, int64_t window_right, double softcap, const c10::optional<at::Tensor>& sinks,
    double dropout_p, const c10::optional<at::Tensor>& rng_state) {
  const VarlenShape shape = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                                         causal_alignment, scale, window_left, window_right, softcap, sinks,
                                         dropout_p, rng_state);
  const at::Tensor grad_out = flash_launch::contiguous_last_dim(grad_out_in);
  check_varlen_grad_args(shape, q, grad_out, grad_lse, out, lse);
  const device::Guard guard(q.device());
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const flash_launch::PackedRows packed{cu_q, cu_k, shape.total_q, shape.total_k};
  return flash_launch::backward(shape.attn, grad_out, grad_lse, q, k, v, out, lse, c10::nullopt, deterministic,
                                {sinks, rng_state}, &packed);
}

}  // namespace

TFKERNELS_CUDA_LIBRARY_IMPL(m) {
  m.impl("flash_attention_varlen_fwd", &flash_attention_varlen_fwd_cuda);
  m.impl("flash_attention_varlen_bwd", &flash_attention_varlen_bwd_cuda);
}

}  // namespace tfkernels
