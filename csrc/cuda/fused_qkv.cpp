// CUDA kernels of fused_qkv and fused_qkv_bwd: argument checks, layout and
// alignment decisions, output allocation and launch on the current stream. The
// GEMM core itself lives in csrc/cuda/gemm/ (CUDA headers only); this file hands
// it plain descriptors (gemm_params.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <torch/library.h>

#include <cstdint>

#include "alloc.h"
#include "args.h"
#include "cuda/common/device_context.h"
#include "cuda/common/launcher_utils.h"
#include "cuda/gemm/gemm_params.h"
#include "cuda/gemm_launch_utils.h"
#include "cuda/unverified.h"

namespace tfkernels {
namespace {

namespace g = ::tfkernels::gemm;
using cuda::aligned16;
using cuda::is_aligned;
using g::check_cuda_dtype;
using g::last_dim_contiguous;

// The GEMM core indexes rows, columns and the reduction dim with int32.
void check_sizes(const QkvShape& s) {
  cuda::check_limit("fused_qkv", "B*S, E and (H + 2*Hkv)*D", {s.batch * s.seqlen, s.embed, s.out_features()},
                    cuda::kMaxInt32);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_qkv_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              int64_t num_heads, int64_t num_kv_heads) {
  TFKERNELS_WARN_UNVERIFIED_CUDA("fused_qkv");
  const QkvShape s = check_qkv_args(x, weight, bias, num_heads, num_kv_heads);
  check_cuda_dtype(x, "x");
  check_sizes(s);
  const device::Guard guard(x.device());

  const int64_t M = s.batch * s.seqlen, N = s.out_features(), K = s.embed;
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor q = empty_output({s.batch, s.heads, s.seqlen, s.head_dim}, opts);
  at::Tensor k = empty_output({s.batch, s.kv_heads, s.seqlen, s.head_dim}, opts);
  at::Tensor v = empty_output({s.batch, s.kv_heads, s.seqlen, s.head_dim}, opts);
  if (M == 0) return {q, k, v};

  // x as [M, E] with one row stride (a view whenever torch can make one); W as [N, E].
  at::Tensor x2 = last_dim_contiguous(x.reshape({M, K}));
  at::Tensor w = last_dim_contiguous(weight);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();

  g::QkvFwdParams a;
  a.x = g::plain_operand(x2.data_ptr(), x2.stride(0));
  a.w = g::plain_operand(w.data_ptr(), w.stride(0));
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(K);
  a.S = static_cast<int>(s.seqlen);
  a.H = static_cast<int>(s.heads);
  a.Hkv = static_cast<int>(s.kv_heads);
  a.D = static_cast<int>(s.head_dim);
  // 16-byte cp.async along E, 16-byte bias loads and head-row stores along D.
  const bool vector_ok = K % 8 == 0 && s.head_dim % 8 == 0 && aligned16(x2) && aligned16(w) && is_aligned(a.bias, 16);
  a.config = g::device_config(x.scalar_type(), vector_ok);
  cuda::launch_for_dtype(x.scalar_type(), [&](auto tag, cudaStream_t stream) {
    return g::qkv_forward<cuda::tag_type<decltype(tag)>>(a, stream);
  });
  return {q, k, v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_qkv_bwd_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                                  const at::Tensor& grad_v, const at::Tensor& x,
                                                                  const at::Tensor& weight) {
  check_rank(grad_q, "grad_q", 4, "[B, H, S, D]");
  check_rank(grad_k, "grad_k", 4, "[B, Hkv, S, D]");
  check_rank(grad_v, "grad_v", 4, "[B, Hkv, S, D]");
  const QkvShape s = check_qkv_args(x, weight, c10::nullopt, grad_q.size(1), grad_k.size(1));
  check_qkv_grad_args(s, x, grad_q, grad_k, grad_v);
  check_cuda_dtype(x, "x");
  check_sizes(s);
  const device::Guard guard(x.device());

  const int64_t tokens = s.batch * s.seqlen, E = s.embed, N = s.out_features(), D = s.head_dim;
  at::Tensor grad_x = empty_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_w = empty_output(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_b = empty_output({N}, weight.options());

  at::Tensor dq = last_dim_contiguous(grad_q), dk = last_dim_contiguous(grad_k), dv = last_dim_contiguous(grad_v);
  if (E == 0) {
    // No GEMM to fuse into; db is still the column sum of dQKV.
    if (N > 0) {
      grad_b.copy_(at::cat({dq.sum({0, 2}, false, at::kFloat).flatten(), dk.sum({0, 2}, false, at::kFloat).flatten(),
                            dv.sum({0, 2}, false, at::kFloat).flatten()}));
    }
    return {grad_x, grad_w, grad_b};
  }

  at::Tensor x2 = last_dim_contiguous(x.reshape({tokens, E}));
  at::Tensor w = last_dim_contiguous(weight);

  g::QkvBwdParams a;
  // dQKV as one matrix X[b*S + s][head*D + d] over the three tensors, read in place.
  const at::Tensor* parts[3] = {&dq, &dk, &dv};
  const int64_t begins[3] = {0, s.heads * D, (s.heads + s.kv_heads) * D};
  for (int p = 0; p < 3; ++p) {
    a.dqkv.ptr[p] = parts[p]->data_ptr();
    a.dqkv.batch_stride[p] = parts[p]->stride(0);
    a.dqkv.seg_stride[p] = parts[p]->stride(1);
    a.dqkv.ld[p] = parts[p]->stride(2);
    a.dqkv.part_begin[p] = static_cast<int>(begins[p]);
  }
  a.dqkv.seg_len = static_cast<int>(D);
  a.dqkv.outer_len = static_cast<int>(std::max<int64_t>(s.seqlen, 1));
  a.x = g::plain_operand(x2.data_ptr(), x2.stride(0));
  a.w = g::plain_operand(w.data_ptr(), w.stride(0));
  a.dx = grad_x.data_ptr();
  a.dw = grad_w.data_ptr();
  a.db = grad_b.data_ptr();
  a.tokens = static_cast<int>(tokens);
  a.E = static_cast<int>(E);
  a.Nqkv = static_cast<int>(N);
  bool ok = E % 8 == 0 && D % 8 == 0 && aligned16(x2) && aligned16(w);
  for (const at::Tensor* t : parts) ok = ok && aligned16(*t);
  a.config = g::device_config(x.scalar_type(), ok);
  cuda::launch_for_dtype(x.scalar_type(), [&](auto tag, cudaStream_t stream) {
    return g::qkv_backward<cuda::tag_type<decltype(tag)>>(a, stream);
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TFKERNELS_CUDA_LIBRARY_IMPL(m) {
  m.impl("fused_qkv", &fused_qkv_cuda);
  m.impl("fused_qkv_bwd", &fused_qkv_bwd_cuda);
}

}  // namespace tfkernels
