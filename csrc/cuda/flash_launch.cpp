// The shared half of the CUDA flash-attention launchers (flash_launch.h): params,
// alignment copies, scratch and kernel dispatch for the padded and packed layouts,
// and the forward pieces the KV-cache launcher (flash_kvcache.cpp) builds on.
#include "cuda/flash_launch.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "alloc.h"
#include "cuda/common/device_context.h"
#include "cuda/common/dtype.h"
#include "cuda/common/launcher_utils.h"
#include "cuda/flash/flash_api.h"
#include "cuda/flash/kernel_traits.h"
#include "cuda/flash/static_switch.h"

namespace tfkernels {
namespace flash_launch {
namespace {

using cuda::aligned16;

// Batch, head and row strides of a padded [B,H,S,D] or packed [total,H,D] tensor
// (packed: no batch dim, the kernels offset rows by cu_seqlens instead).
struct Strides {
  int64_t batch, head, row;
};
Strides strides_of(const at::Tensor& t) {
  if (t.dim() == 4) return {stride_of(t, 0), stride_of(t, 1), stride_of(t, 2)};
  return {0, stride_of(t, 1), stride_of(t, 0)};
}

// 16-bit inputs with D % 8 == 0 take the 16-byte cp.async path: misaligned views (an
// odd storage offset, a row stride that is not a multiple of 8) are copied to fresh,
// aligned memory so that they keep it. D % 8 != 0 takes the kernels' element-wise
// path instead (no host-side padding). Returns the params' aligned16.
bool align_for_16byte_loads(const AttentionShape& shape, bool is_fp32, std::initializer_list<at::Tensor*> tensors) {
  if (is_fp32 || shape.head_dim % 8 != 0) return false;
  for (at::Tensor* t : tensors) {
    if (!aligned16(*t)) *t = t->clone(at::MemoryFormat::Contiguous);
  }
  return true;
}

// The fields the forward and backward kernels share: pointers and strides of q, k,
// v, out and lse, seqlens_k or cu_seqlens, the problem sizes and the variants.
// Returns the seqlens_k tensor the params point into, which the caller keeps alive
// until the launch.
at::Tensor set_attention_params(flash::FwdParams& p, const AttentionShape& shape, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                const at::Tensor& lse, const c10::optional<at::Tensor>& seqlens_k,
                                const VariantTensors& variants, const PackedRows* packed, bool fast) {
  p.q = const_cast<void*>(q.data_ptr());
  p.k = const_cast<void*>(k.data_ptr());
  p.v = const_cast<void*>(v.data_ptr());
  p.out = const_cast<void*>(out.data_ptr());
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  const Strides qs = strides_of(q), ks = strides_of(k), vs = strides_of(v), os = strides_of(out);
  p.q_batch_stride = qs.batch;
  p.q_head_stride = qs.head;
  p.q_row_stride = qs.row;
  p.k_batch_stride = ks.batch;
  p.k_head_stride = ks.head;
  p.k_row_stride = ks.row;
  p.v_batch_stride = vs.batch;
  p.v_head_stride = vs.head;
  p.v_row_stride = vs.row;
  p.o_batch_stride = os.batch;
  p.o_head_stride = os.head;
  p.o_row_stride = os.row;

  at::Tensor lens;
  if (shape.has_seqlens_k) {
    lens = seqlens_k->contiguous();  // a device-side copy at most: no host sync
    p.seqlens_k = lens.data_ptr();
    p.seqlens_k_is_int64 = lens.scalar_type() == at::kLong;
  }
  if (packed != nullptr) {
    p.cu_seqlens_q = packed->cu_seqlens_q.data_ptr<int>();
    p.cu_seqlens_k = packed->cu_seqlens_k.data_ptr<int>();
    p.total_q = static_cast<int>(packed->total_q);
    p.total_k = static_cast<int>(packed->total_k);
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
  p.window_left = window_bound(shape.window_left, shape.seqlen_q, shape.seqlen_k);
  p.window_right = window_bound(shape.window_right, shape.seqlen_q, shape.seqlen_k);
  p.softcap = shape.softcap;
  p.sinks = shape.has_sinks ? variants.sinks->data_ptr<float>() : nullptr;
  p.dropout_p = shape.dropout_p;
  p.rng_state = shape.dropout_p > 0.0f ? variants.rng_state->data_ptr<int64_t>() : nullptr;
  p.aligned16 = fast;
  return lens;
}

// lse (and delta) of the layout: [B,H,Sq] padded, [H,total_q] packed.
std::vector<int64_t> lse_sizes(const AttentionShape& shape, const PackedRows* packed) {
  if (packed != nullptr) return {shape.heads, packed->total_q};
  return {shape.batch, shape.heads, shape.seqlen_q};
}

}  // namespace

int64_t stride_of(const at::Tensor& t, int64_t d) { return t.size(d) > 1 ? t.stride(d) : 0; }

int window_bound(int64_t w, int64_t seqlen_q, int64_t seqlen_k) {
  return static_cast<int>(w < 0 ? -1 : std::min<int64_t>(w, seqlen_q + seqlen_k));
}

cudaError_t head_dim_not_built(int64_t head_dim, int padded) {
  TORCH_CHECK(false, "tfkernels: head dim ", head_dim, " needs the flash-attention kernels for head dim ", padded,
              ", which this build left out (it was built with TFKERNELS_HEAD_DIMS restricting the head dims); "
              "rebuild with TFKERNELS_HEAD_DIMS unset or including ", padded);
  return cudaErrorInvalidValue;
}

int fwd_kernel_dim(int64_t head_dim) {
  // sm_80 and sm_90 give a block 163 and 227 KB of shared memory, enough for
  // every instantiation. sm_86/sm_89 give 99 KB: there the D = 128 tiles (102 KB)
  // do not fit, so a head dim runs on the next larger instantiation that does
  // (D <= 128 on the 160 kernel, 86 KB; its D tail is zero-filled like any
  // padded dim), and a dim with none left gets a clear error.
  const int64_t smem_limit = device::max_smem_per_block();
  const int padded = flash::padded_head_dim(static_cast<int>(head_dim));
  int kernel_dim = padded;
  while (kernel_dim <= kMaxHeadDim && flash::fwd_smem_bytes(kernel_dim) > smem_limit) kernel_dim += 32;
  TORCH_CHECK(kernel_dim <= kMaxHeadDim, "tfkernels: flash attention with head dim ", head_dim, " needs ",
              flash::fwd_smem_bytes(padded), " bytes of shared memory a block; this device allows ", smem_limit);
  return kernel_dim;
}

FwdTile fwd_tile(at::ScalarType dtype, int64_t head_dim) {
  if (dtype == at::kFloat) return FwdTile{flash::kFwdFp32BlockM, flash::kFwdFp32BlockN};
  const int kernel_dim = fwd_kernel_dim(head_dim);
  return FwdTile{flash::fwd_block_m(kernel_dim), flash::fwd_block_n(kernel_dim)};
}

void launch_flash_fwd(const flash::FwdParams& p, at::ScalarType dtype) {
  const cudaStream_t stream = device::current_stream();
  cudaError_t err = cudaSuccess;
  if (dtype == at::kFloat) {
    err = flash::run_flash_fwd_fp32(p, stream);
  } else {
    auto missing = [&](int padded) { return head_dim_not_built(p.head_dim, padded); };
    const int kernel_dim = fwd_kernel_dim(p.head_dim);
    err = cuda::dispatch_16bit(cuda::dtype_of(dtype), [&](auto tag) {
      using Element = typename decltype(tag)::type;
      return TFK_HEADDIM_SWITCH(kernel_dim, missing, [&] { return flash::run_flash_fwd<Element, kHeadDim>(p, stream); });
    });
  }
  TFKERNELS_CHECK_LAUNCH(err);
}

std::tuple<at::Tensor, at::Tensor> forward(const AttentionShape& shape, const at::Tensor& q_in,
                                           const at::Tensor& k_in, const at::Tensor& v_in,
                                           const c10::optional<at::Tensor>& seqlens_k,
                                           const VariantTensors& variants, const PackedRows* packed) {
  at::Tensor out = empty_output(q_in.sizes(), q_in.options());
  at::Tensor lse = empty_output(lse_sizes(shape, packed), q_in.options().dtype(at::kFloat));
  if (shape.batch == 0 || shape.heads == 0 || shape.seqlen_q == 0 || q_in.numel() == 0) return {out, lse};

  const bool is_fp32 = q_in.scalar_type() == at::kFloat;
  at::Tensor q = q_in, k = k_in, v = v_in;
  const bool fast = align_for_16byte_loads(shape, is_fp32, {&q, &k, &v});

  flash::FwdParams p{};
  const at::Tensor lens = set_attention_params(p, shape, q, k, v, out, lse, seqlens_k, variants, packed, fast);

  launch_flash_fwd(p, q.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const AttentionShape& shape, const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse_in,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, const c10::optional<at::Tensor>& seqlens_k, bool deterministic,
    const VariantTensors& variants, const PackedRows* packed) {
  at::Tensor grad_q = empty_output(q_in.sizes(), q_in.options());
  at::Tensor grad_k = empty_output(k_in.sizes(), k_in.options());
  at::Tensor grad_v = empty_output(v_in.sizes(), v_in.options());
  // Zeros: written by the sink pass unless there are no rows to sum.
  at::Tensor grad_sinks = at::zeros({shape.has_sinks ? shape.heads : 0}, q_in.options().dtype(at::kFloat));
  if (shape.batch == 0 || shape.heads == 0) return {grad_q, grad_k, grad_v, grad_sinks};

  const bool is_fp32 = q_in.scalar_type() == at::kFloat;
  at::Tensor q = q_in, k = k_in, v = v_in, dout = grad_out;
  // As the forward: misaligned views are copied to keep the 16-byte cp.async path.
  const bool fast = align_for_16byte_loads(shape, is_fp32, {&q, &k, &v, &dout});
  // out is read element-wise by the preprocessing pass only: any strides.
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_lse;
  if (grad_lse_in.has_value() && grad_lse_in->defined()) grad_lse = grad_lse_in->contiguous();
  // fp32 scratch from the caching allocator on the current device: delta laid out as
  // lse, dq_accum as dq.
  at::Tensor delta = at::empty(lse_sizes(shape, packed), q_in.options().dtype(at::kFloat));
  at::Tensor dq_accum;
  if (!is_fp32 && !deterministic) dq_accum = at::zeros(q_in.sizes(), q_in.options().dtype(at::kFloat));

  flash::BwdParams p{};
  const at::Tensor lens =
      set_attention_params(p, shape, q, k, v, out_in, lse, seqlens_k, variants, packed, fast);
  const Strides ds = strides_of(dout), dqs = strides_of(grad_q), dks = strides_of(grad_k);
  p.dout = dout.data_ptr();
  p.do_batch_stride = ds.batch;
  p.do_head_stride = ds.head;
  p.do_row_stride = ds.row;
  p.grad_lse = grad_lse.defined() ? grad_lse.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.defined() ? dq_accum.data_ptr<float>() : nullptr;
  p.dq = grad_q.data_ptr();
  p.dk = grad_k.data_ptr();
  p.dv = grad_v.data_ptr();
  // grad_q, dq_accum (both contiguous, shaped like q) share one layout; so do grad_k, grad_v.
  p.dq_batch_stride = dqs.batch;
  p.dq_head_stride = dqs.head;
  p.dq_row_stride = dqs.row;
  p.dk_batch_stride = dks.batch;
  p.dk_head_stride = dks.head;
  p.dk_row_stride = dks.row;
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

at::Tensor contiguous_last_dim(const at::Tensor& grad_out) {
  return (grad_out.dim() >= 1 && grad_out.size(-1) > 1 && grad_out.stride(-1) != 1) ? grad_out.contiguous() : grad_out;
}

}  // namespace flash_launch
}  // namespace tfkernels
