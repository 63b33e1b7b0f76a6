// What the torch-facing flash-attention launchers share once their arguments are
// checked: the alignment copies, the FwdParams / BwdParams block, the scratch
// buffers and the dispatch from (dtype, head dim) to a kernel instantiation, for
// both layouts the kernels take:
//   padded  q [B,H,Sq,D], k, v [B,Hkv,Sk,D], lse [B,H,Sq]    (flash_attention.cpp)
//   packed  q [total_q,H,D], k, v [total_k,Hkv,D], lse [H,total_q], with
//           cu_seqlens_q/k                                   (flash_varlen.cpp)
// The layout is told by the tensors' rank. The KV-cache launcher (flash_kvcache.cpp)
// fills its own params and uses the forward's pieces below. Host code with torch
// headers.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include <tuple>

#include "args.h"
#include "cuda/flash/flash_params.h"

namespace tfkernels {
namespace flash_launch {

// The tensors of the attention variants, as the op takes them.
struct VariantTensors {
  const c10::optional<at::Tensor>& sinks;      // float32 [H] contiguous (checked)
  const c10::optional<at::Tensor>& rng_state;  // int64 [2] on q's device when dropout_p > 0 (checked)
};

// A packed batch: the int32 [B+1] offsets (on the device, contiguous) and the rows
// of q and k. nullptr where the launcher is padded.
struct PackedRows {
  const at::Tensor& cu_seqlens_q;
  const at::Tensor& cu_seqlens_k;
  int64_t total_q, total_k;
};

// Runs the forward on checked arguments; shape.seqlen_q/k are the grid's extents
// (max_seqlen when packed). Returns out (shaped like q, contiguous) and lse.
std::tuple<at::Tensor, at::Tensor> forward(const AttentionShape& shape, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const c10::optional<at::Tensor>& seqlens_k,
                                           const VariantTensors& variants, const PackedRows* packed);

// Runs the backward on checked arguments; returns grad_q, grad_k, grad_v (contiguous,
// shaped like q, k, v) and grad_sinks (float32 [H], or [0] without sinks).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const AttentionShape& shape, const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& seqlens_k, bool deterministic, const VariantTensors& variants,
    const PackedRows* packed);

// The stride of a dim that is only ever indexed with 0 does not matter; pass 0 so
// that huge or odd strides of size-1 dims never enter the address arithmetic.
int64_t stride_of(const at::Tensor& t, int64_t d);

// A window bound as the kernels take it: -1 (unbounded) or a value clamped to
// Sq + Sk, past which every bound is as good as none (mask.h).
int window_bound(int64_t w, int64_t seqlen_q, int64_t seqlen_k);

// TFK_HEADDIM_SWITCH's answer for a head dim whose instantiation a
// TFKERNELS_HEAD_DIMS build left out: a clear error.
cudaError_t head_dim_not_built(int64_t head_dim, int padded);

// The padded head dim of the 16-bit forward instantiation that runs head_dim on
// the current device (the next larger one whose shared memory fits; clear error
// when none does).
int fwd_kernel_dim(int64_t head_dim);

// The forward kernel's tile (query rows, keys) for q's dtype and head dim.
struct FwdTile {
  int block_m, block_n;
};
FwdTile fwd_tile(at::ScalarType dtype, int64_t head_dim);

// Launches the forward kernel for q's dtype (fp32 SIMT, or fp16/bf16 tensor
// cores) on the current stream; raises on a launch error.
void launch_flash_fwd(const flash::FwdParams& p, at::ScalarType dtype);

// Autograd hands over expanded gradients (out.sum() gives stride 0 everywhere):
// legal input; returns grad_out copied when its last dim is not contiguous.
at::Tensor contiguous_last_dim(const at::Tensor& grad_out);

}  // namespace flash_launch
}  // namespace tfkernels
