// The torch-facing launcher of the CUDA flash-attention forward: argument checks
// (check_attention_args, the CPU op's semantics), output allocation, the plain
// FwdParams block, and the dispatch from (dtype, head dim) to a kernel
// instantiation; the same for the backward (flash_attention_bwd: delta
// preprocessing, the dK/dV and dQ kernels, fp32 scratch buffers from the caching
// allocator). The kernels themselves live in csrc/cuda/flash/ and include no
// torch headers.
#include <ATen/ATen.h>
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
#include "cuda/flash/kernel_traits.h"
#include "cuda/flash/static_switch.h"
#include "cuda/flash_launch.h"
#include "cuda/unverified.h"

namespace tfkernels {
namespace {

using cuda::aligned16;
using flash_launch::head_dim_not_built;
using flash_launch::stride_of;

// Heads and batches index grid dims y and z; rows and keys stay below 2^30 so that
// the kernels' int32 tile arithmetic (row + tile size) cannot overflow.
void check_cuda_limits(const AttentionShape& shape) {
  cuda::check_limit("flash_attention", "heads and batches", {shape.heads, shape.batch}, cuda::kMaxGridYZ);
  cuda::check_limit("flash_attention", "sequence lengths", {shape.seqlen_q, shape.seqlen_k}, (int64_t(1) << 30) - 1);
}

// The tensors of the attention variants, as the op takes them.
struct VariantTensors {
  const c10::optional<at::Tensor>& sinks;      // float32 [H] contiguous (checked)
  const c10::optional<at::Tensor>& rng_state;  // int64 [2] on q's device when dropout_p > 0 (checked)
};

// The fields the forward and backward kernels share: pointers and strides of q, k,
// v, out and lse, seqlens_k, the problem sizes and the variants. Returns the
// seqlens_k tensor the params point into, which the caller keeps alive until the
// launch.
at::Tensor set_attention_params(flash::FwdParams& p, const AttentionShape& shape, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                const at::Tensor& lse, const c10::optional<at::Tensor>& seqlens_k,
                                const VariantTensors& variants, bool fast) {
  p.q = const_cast<void*>(q.data_ptr());
  p.k = const_cast<void*>(k.data_ptr());
  p.v = const_cast<void*>(v.data_ptr());
  p.out = const_cast<void*>(out.data_ptr());
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.q_batch_stride = stride_of(q, 0);
  p.q_head_stride = stride_of(q, 1);
  p.q_row_stride = stride_of(q, 2);
  p.k_batch_stride = stride_of(k, 0);
  p.k_head_stride = stride_of(k, 1);
  p.k_row_stride = stride_of(k, 2);
  p.v_batch_stride = stride_of(v, 0);
  p.v_head_stride = stride_of(v, 1);
  p.v_row_stride = stride_of(v, 2);
  p.o_batch_stride = stride_of(out, 0);
  p.o_head_stride = stride_of(out, 1);
  p.o_row_stride = stride_of(out, 2);

  at::Tensor lens;
  if (shape.has_seqlens_k) {
    lens = seqlens_k->contiguous();  // a device-side copy at most: no host sync
    p.seqlens_k = lens.data_ptr();
    p.seqlens_k_is_int64 = lens.scalar_type() == at::kLong;
  }

  p.batch = static_cast<int>(shape.batch);
  p.heads = static_cast<int>(shape.heads);
  p.kv_heads = static_cast<int>(shape.kv_heads);
  p.head_group = static_cast<int>(shape.heads / shape.kv_heads);
  p.seqlen_q = static_cast<int>(shape.seqlen_q);
  p.seqlen_k = static_cast<int>(shape.seqlen_k);
  p.head_dim = static_cast<int>(shape.head_dim);
  p.scale = shape.scale;
  p.scale_log2 = static_cast<float>(static_cast<double>(shape.scale) * 1.4426950408889634074);
  p.causal = shape.causal;
  p.bottom_right = shape.bottom_right;
  p.window_left = flash_launch::window_bound(shape.window_left, shape.seqlen_q, shape.seqlen_k);
  p.window_right = flash_launch::window_bound(shape.window_right, shape.seqlen_q, shape.seqlen_k);
  p.softcap = shape.softcap;
  p.sinks = shape.has_sinks ? variants.sinks->data_ptr<float>() : nullptr;
  p.dropout_p = shape.dropout_p;
  p.rng_state = shape.dropout_p > 0.0f ? variants.rng_state->data_ptr<int64_t>() : nullptr;
  p.aligned16 = fast;
  return lens;
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                           const at::Tensor& v_in, bool is_causal,
                                                           c10::string_view causal_alignment,
                                                           c10::optional<double> scale,
                                                           const c10::optional<at::Tensor>& seqlens_k,
                                                           bool deterministic, int64_t window_left,
                                                           int64_t window_right, double softcap,
                                                           const c10::optional<at::Tensor>& sinks, double dropout_p,
                                                           const c10::optional<at::Tensor>& rng_state) {
  TFKERNELS_WARN_UNVERIFIED_CUDA("flash_attention");
  (void)deterministic;  // only the backward is affected
  const AttentionShape shape = check_attention_args(q_in, k_in, v_in, is_causal, causal_alignment, scale, seqlens_k,
                                                    window_left, window_right, softcap, sinks, dropout_p, rng_state);
  check_dtype_in(q_in, "q", {at::kHalf, at::kBFloat16, at::kFloat});
  device::check_on_device(q_in, "q");
  check_cuda_limits(shape);

  const device::Guard guard(q_in.device());
  at::Tensor out = empty_output({shape.batch, shape.heads, shape.seqlen_q, shape.head_dim}, q_in.options());
  at::Tensor lse = empty_output({shape.batch, shape.heads, shape.seqlen_q}, q_in.options().dtype(at::kFloat));
  if (shape.batch == 0 || shape.heads == 0 || shape.seqlen_q == 0) return {out, lse};

  const bool is_fp32 = q_in.scalar_type() == at::kFloat;
  at::Tensor q = q_in, k = k_in, v = v_in;
  bool fast = false;
  if (!is_fp32 && shape.head_dim % 8 == 0) {
    // Misaligned views (an odd storage offset, a row stride that is not a
    // multiple of 8) are copied to fresh, aligned memory so that they keep the
    // 16-byte cp.async path; D % 8 != 0 takes the kernel's element-wise path
    // instead (no host-side padding).
    for (at::Tensor* t : {&q, &k, &v}) {
      if (!aligned16(*t)) *t = t->clone(at::MemoryFormat::Contiguous);
    }
    fast = true;
  }

  flash::FwdParams p{};
  const at::Tensor lens = set_attention_params(p, shape, q, k, v, out, lse, seqlens_k, {sinks, rng_state}, fast);

  flash_launch::launch_flash_fwd(p, q.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd_cuda(
    const at::Tensor& grad_out_in, const c10::optional<at::Tensor>& grad_lse_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    bool is_causal, c10::string_view causal_alignment, c10::optional<double> scale,
    const c10::optional<at::Tensor>& seqlens_k, bool deterministic, int64_t window_left, int64_t window_right,
    double softcap, const c10::optional<at::Tensor>& sinks, double dropout_p,
    const c10::optional<at::Tensor>& rng_state) {
  const AttentionShape shape = check_attention_args(q_in, k_in, v_in, is_causal, causal_alignment, scale, seqlens_k,
                                                    window_left, window_right, softcap, sinks, dropout_p, rng_state);
  // Autograd hands over expanded gradients (out.sum() gives stride 0 everywhere):
  // legal input, so copy a grad_out whose last dim is not contiguous.
  const at::Tensor grad_out_c =
      (grad_out_in.dim() == 4 && grad_out_in.size(-1) > 1 && grad_out_in.stride(-1) != 1) ? grad_out_in.contiguous()
                                                                                           : grad_out_in;
  check_attention_grad_args(shape, q_in, grad_out_c, grad_lse_in, out_in, lse_in);
  check_dtype_in(q_in, "q", {at::kHalf, at::kBFloat16, at::kFloat});
  device::check_on_device(q_in, "q");
  check_cuda_limits(shape);

  const device::Guard guard(q_in.device());
  at::Tensor grad_q = empty_output(q_in.sizes(), q_in.options());
  at::Tensor grad_k = empty_output(k_in.sizes(), k_in.options());
  at::Tensor grad_v = empty_output(v_in.sizes(), v_in.options());
  // Zeros: written by the sink pass unless there are no rows to sum.
  at::Tensor grad_sinks = at::zeros({shape.has_sinks ? shape.heads : 0}, q_in.options().dtype(at::kFloat));
  if (shape.batch == 0 || shape.heads == 0) return {grad_q, grad_k, grad_v, grad_sinks};

  const bool is_fp32 = q_in.scalar_type() == at::kFloat;
  at::Tensor q = q_in, k = k_in, v = v_in, dout = grad_out_c;
  bool fast = false;
  if (!is_fp32 && shape.head_dim % 8 == 0) {
    // As the forward: misaligned views are copied to keep the 16-byte cp.async path.
    for (at::Tensor* t : {&q, &k, &v, &dout}) {
      if (!aligned16(*t)) *t = t->clone(at::MemoryFormat::Contiguous);
    }
    fast = true;
  }
  // out is read element-wise by the preprocessing pass only: any strides.
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_lse;
  if (grad_lse_in.has_value() && grad_lse_in->defined()) grad_lse = grad_lse_in->contiguous();
  // fp32 scratch from the caching allocator on the current device.
  at::Tensor delta = at::empty({shape.batch, shape.heads, shape.seqlen_q}, q_in.options().dtype(at::kFloat));
  at::Tensor dq_accum;
  if (!is_fp32 && !deterministic) {
    dq_accum = at::zeros({shape.batch, shape.heads, shape.seqlen_q, shape.head_dim}, q_in.options().dtype(at::kFloat));
  }

  flash::BwdParams p{};
  const at::Tensor lens = set_attention_params(p, shape, q, k, v, out_in, lse, seqlens_k, {sinks, rng_state}, fast);
  p.dout = dout.data_ptr();
  p.do_batch_stride = stride_of(dout, 0);
  p.do_head_stride = stride_of(dout, 1);
  p.do_row_stride = stride_of(dout, 2);
  p.grad_lse = grad_lse.defined() ? grad_lse.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.defined() ? dq_accum.data_ptr<float>() : nullptr;
  p.dq = grad_q.data_ptr();
  p.dk = grad_k.data_ptr();
  p.dv = grad_v.data_ptr();
  p.deterministic = deterministic;
  p.grad_sinks = shape.has_sinks ? grad_sinks.data_ptr<float>() : nullptr;

  const cudaStream_t stream = device::current_stream();
  const cuda::DType dtype = cuda::dtype_of(q_in);
  TFKERNELS_CHECK_LAUNCH(flash::run_flash_bwd_preprocess(p, dtype, stream));
  cudaError_t err = cudaSuccess;
  if (is_fp32) {
    err = flash::run_flash_bwd_fp32(p, stream);
  } else {
    auto missing = [&](int padded) { return head_dim_not_built(shape.head_dim, padded); };
    // The backward needs more shared memory than the forward (Q, dO, K, V, P, dS
    // tiles): every instantiation fits sm_80 (163 KB) and sm_90 (227 KB); on 99 KB
    // devices (sm_86/89) head dims above 128 get a clear error.
    const int64_t smem_limit = device::max_smem_per_block();
    const int kernel_dim = flash::padded_head_dim(p.head_dim);
    TORCH_CHECK(flash::bwd_smem_bytes(kernel_dim) <= smem_limit, "tfkernels: the flash attention backward with head dim ",
                shape.head_dim, " needs ", flash::bwd_smem_bytes(kernel_dim),
                " bytes of shared memory a block; this device allows ", smem_limit);
    err = cuda::dispatch_16bit(dtype, [&](auto tag) {
      using Element = typename decltype(tag)::type;
      return TFK_HEADDIM_SWITCH(kernel_dim, missing, [&] { return flash::run_flash_bwd<Element, kHeadDim>(p, stream); });
    });
    if (err == cudaSuccess && !deterministic) err = flash::run_flash_bwd_convert_dq(p, dtype, stream);
  }
  TFKERNELS_CHECK_LAUNCH(err);
  return {grad_q, grad_k, grad_v, grad_sinks};
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
