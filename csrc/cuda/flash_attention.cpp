// The torch-facing entry points of the CUDA flash attention on padded [B,H,S,D]
// tensors: argument checks (check_attention_args, the CPU op's semantics), then
// the launch shared with the packed varlen ops (flash_launch.h: params, scratch,
// dispatch to the kernel instantiations). The kernels themselves live in
// csrc/cuda/flash/ and include no torch headers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "alloc.h"
#include "args.h"
#include "cuda/common/device_context.h"
#include "cuda/common/dtype.h"
#include "cuda/common/launcher_utils.h"
#include "cuda/flash/flash_api.h"
#include "cuda/flash_launch.h"
#include "cuda/unverified.h"

namespace tfkernels {
namespace {

// Heads and batches index grid dims y and z; rows and keys stay below 2^30 so that
// the kernels' int32 tile arithmetic (row + tile size) cannot overflow.
void check_cuda_limits(const AttentionShape& shape) {
  cuda::check_limit("flash_attention", "heads and batches", {shape.heads, shape.batch}, cuda::kMaxGridYZ);
  cuda::check_limit("flash_attention", "sequence lengths", {shape.seqlen_q, shape.seqlen_k}, (int64_t(1) << 30) - 1);
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, bool is_causal,
                                                           c10::string_view causal_alignment,
                                                           c10::optional<double> scale,
                                                           const c10::optional<at::Tensor>& seqlens_k,
                                                           bool deterministic, int64_t window_left,
                                                           int64_t window_right, double softcap,
                                                           const c10::optional<at::Tensor>& sinks, double dropout_p,
                                                           const c10::optional<at::Tensor>& rng_state) {
  TFKERNELS_WARN_UNVERIFIED_CUDA("flash_attention");
  (void)deterministic;  // only the backward is affected
  const AttentionShape shape = check_attention_args(q, k, v, is_causal, causal_alignment, scale, seqlens_k,
                                                    window_left, window_right, softcap, sinks, dropout_p, rng_state);
  check_dtype_in(q, "q", {at::kHalf, at::kBFloat16, at::kFloat});
  device::check_on_device(q, "q");
  check_cuda_limits(shape);

  const device::Guard guard(q.device());
  return flash_launch::forward(shape, q, k, v, seqlens_k, {sinks, rng_state}, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd_cuda(
    const at::Tensor& grad_out_in, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    bool is_causal, c10::string_view causal_alignment, c10::optional<double> scale,
    const c10::optional<at::Tensor>& seqlens_k, bool deterministic, int64_t window_left, int64_t window_right,
    double softcap, const c10::optional<at::Tensor>& sinks, double dropout_p,
    const c10::optional<at::Tensor>& rng_state) {
  const AttentionShape shape = check_attention_args(q, k, v, is_causal, causal_alignment, scale, seqlens_k,
                                                    window_left, window_right, softcap, sinks, dropout_p, rng_state);
  const at::Tensor grad_out = flash_launch::contiguous_last_dim(grad_out_in);
  check_attention_grad_args(shape, q, grad_out, grad_lse, out, lse);
  check_dtype_in(q, "q", {at::kHalf, at::kBFloat16, at::kFloat});
  device::check_on_device(q, "q");
  check_cuda_limits(shape);

  const device::Guard guard(q.device());
  return flash_launch::backward(shape, grad_out, grad_lse, q, k, v, out, lse, seqlens_k, deterministic,
                                {sinks, rng_state}, nullptr);
}

// The test-only op: the dropout keep mask the kernels draw for rng_state.
at::Tensor dropout_mask_cuda(const at::Tensor& rng_state, int64_t batch, int64_t heads, int64_t seqlen_q,
                             int64_t seqlen_k, double dropout_p) {
  check_rng_state(rng_state, rng_state, "rng_state");
  TORCH_CHECK(batch >= 0 && heads >= 0 && seqlen_q >= 0 && seqlen_k >= 0,
              "tfkernels: _dropout_mask: sizes must be >= 0, got ", batch, ", ", heads, ", ", seqlen_q, ", ", seqlen_k);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "tfkernels: _dropout_mask: dropout_p must be in [0, 1), got ",
              dropout_p);
  TORCH_CHECK(batch * heads < (int64_t(1) << 31) && seqlen_q < (int64_t(1) << 30) && seqlen_k < (int64_t(1) << 30),
              "tfkernels: _dropout_mask: sizes out of range (B * H < 2^31, Sq and Sk < 2^30), got ", batch, ", ",
              heads, ", ", seqlen_q, ", ", seqlen_k);
  device::check_on_device(rng_state, "rng_state");
  const device::Guard guard(rng_state.device());
  const at::Tensor state = rng_state.contiguous();
  at::Tensor mask = at::empty({batch, heads, seqlen_q, seqlen_k}, rng_state.options().dtype(at::kBool));
  TFKERNELS_CHECK_LAUNCH(flash::run_dropout_mask(state.data_ptr<int64_t>(), mask.data_ptr<bool>(),
                                                 static_cast<int>(batch), static_cast<int>(heads),
                                                 static_cast<int>(seqlen_q), static_cast<int>(seqlen_k),
                                                 static_cast<float>(dropout_p), device::current_stream()));
  return mask;
}

}  // namespace

TFKERNELS_CUDA_LIBRARY_IMPL(m) {
  m.impl("flash_attention_fwd", &flash_attention_fwd_cuda);
  m.impl("flash_attention_bwd", &flash_attention_bwd_cuda);
  m.impl("_dropout_mask", &dropout_mask_cuda);
}

}  // namespace tfkernels
