// Host-side descriptors of the GEMM core: plain structs shared by the torch-facing
// launchers (.cpp, compiled by the host compiler) and the kernel translation units
// (.cu, CUDA headers only). No torch, no device code here.
//
// The core computes C[m, n] = sum_k A[m, k] * B[n, k] (C = A B^T) for any M, N, K,
// fp32 accumulation, and hands each finished value to an epilogue functor
// (epilogue.h) that decides what "storing C" means: bias, GELU, dGELU, a scatter
// into attention heads, a row sum of A on the side.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace tfkernels {
namespace gemm {

// How an operand sits in memory, named by its contiguous ("inner") dimension.
//   A: kInnerK  = [M, K] with K contiguous (x in the forward, dq in dx = dQKV W)
//      kInnerMN = [K, M] with M contiguous (dQKV^T in dW = dQKV^T x)
//   B: kInnerK  = [N, K] with K contiguous (the weight in the forward)
//      kInnerMN = [K, N] with N contiguous (W in dx, x in dW)
enum class Layout { kInnerK, kInnerMN };

// An operand seen as a matrix X[i][j] with j the inner (contiguous) index and i the
// outer one; the Layout says which of (i, j) is K. Two forms:
//
// plain (seg_len == 0):  &X[i][j] = ptr[0] + i * ld[0] + j
//
// segmented (seg_len > 0): the inner index is split into up to three parts (the q,
// k and v tensors), each cut into segments of seg_len elements (heads), and the
// outer index into segments of outer_len (sequences in a batch):
//     p = part of j (part_begin[p] <= j < part_begin[p+1]),  j' = j - part_begin[p]
//     g = j' / seg_len, d = j' % seg_len,  b = i / outer_len, s = i % outer_len
//     &X[i][j] = ptr[p] + g * seg_stride[p] + b * batch_stride[p] + s * ld[p] + d
// So dq [B, H, S, D] with strides (sb, sh, ss, 1) is X[b*S + s][h*D + d] with
// seg_len = D, seg_stride = sh, outer_len = S, batch_stride = sb, ld = ss: the
// backward reads dq, dk, dv where they lie, as one [B*S, (H+2Hkv)*D] matrix, or
// its transpose, with no re-packing copy.
//
// The tensor-core path reads 8-element (16-byte) chunks along j: it needs ptrs
// 16-byte aligned, every stride, seg_len and part_begin a multiple of 8, and the
// inner extent a multiple of 8 (the launcher checks; otherwise the generic path).
struct Operand {
  const void* ptr[3] = {nullptr, nullptr, nullptr};
  int64_t ld[3] = {0, 0, 0};
  int64_t seg_stride[3] = {0, 0, 0};
  int64_t batch_stride[3] = {0, 0, 0};
  int part_begin[3] = {0, 0, 0};
  int seg_len = 0;    // 0: plain
  int outer_len = 1;  // segmented only
};

inline Operand plain_operand(const void* ptr, int64_t ld) {
  Operand o;
  o.ptr[0] = ptr;
  o.ld[0] = ld;
  return o;
}

// Which kernel a GEMM runs, decided from the device and the operands (the launcher
// fills it; gemm_launch.cuh reads it): 16-bit with vector_ok -> tensor cores with the
// tile heuristic; otherwise the generic kernel, with TF32 mma for fp32 when allowed.
struct DeviceConfig {
  bool vector_ok = false;   // every 16-byte alignment condition holds (tensor-core path)
  bool tf32 = false;        // fp32 inputs only: TF32 tensor cores allowed
  int num_sms = 1;
  int tile_override = -1;   // a TileShape (tile_size.h) to force, or -1: the heuristic
  size_t max_smem = 0;      // the device's opt-in smem per block (sharedMemPerBlockOptin); 0: no limit
};

// Fused QKV forward: q/k/v = split_heads(x W^T + bias).
//   GEMM: M = B*S tokens, N = (H + 2*Hkv) * D, K = E; A = x (kInnerK), B = W (kInnerK).
struct QkvFwdParams {
  Operand x;                // plain [M, E]
  Operand w;                // plain [N, E]
  const void* bias = nullptr;  // [N] or null
  void* q = nullptr;        // [B, H, S, D] contiguous
  void* k = nullptr;        // [B, Hkv, S, D]
  void* v = nullptr;
  int M = 0, N = 0, K = 0, S = 1, H = 1, Hkv = 1, D = 1;
  DeviceConfig config;
};

// Fused QKV backward, two GEMMs reading dQKV = [dq | dk | dv] in head layout:
//   dx = dQKV W      M = tokens, N = E, K = Nqkv; A = dQKV (kInnerK, segmented), B = W (kInnerMN)
//   dW = dQKV^T x    M = Nqkv, N = E, K = tokens; A = dQKV (kInnerMN, segmented), B = x (kInnerMN)
//   db = column sums of dQKV, fused into the dW GEMM as row sums of its A operand.
struct QkvBwdParams {
  Operand dqkv;             // segmented, X[token][n]
  Operand x;                // plain [tokens, E]
  Operand w;                // plain [Nqkv, E]
  void* dx = nullptr;       // [tokens, E] contiguous
  void* dw = nullptr;       // [Nqkv, E] contiguous
  void* db = nullptr;       // [Nqkv]
  int tokens = 0, E = 0, Nqkv = 0;
  DeviceConfig config;      // the backward has no 128x256 shape
};

// ------------------------------------------------------------------ MLP family
//
// linear_gelu and fused_mlp (forward and backward) are sequences of GEMMs of four
// kinds, each one call of the mlp_gemm<T> entry point, plus one elementwise pass
// (mlp_dgelu<T>). The launcher (csrc/cuda/mlp.cpp) builds the sequence, the
// operands (plain) and the temporaries; csrc/cuda/gemm/mlp_impl.cuh says what each
// kind computes.
enum class MlpGemmKind {
  // out = act(A B^T + bias) [M, N], and `pre` = A B^T + bias when pre_out is set.
  // A = x [M, K] (kInnerK), B = W [N, K] (kInnerK). act: kNone / kErf / kTanh.
  kForward,
  // out = A B^T: the data gradient G W. A = G [M, K] (kInnerK), B = W as [K, N] (kInnerMN).
  kDgrad,
  // out = A B^T and rowsum[m] = sum_k A[m, k]: the weight gradient G^T x with the bias
  // gradient fused. A = G^T, i.e. G [K, M] (kInnerMN); B = x as [K, N] (kInnerMN).
  kWgrad,
  // out = (A B^T) * gelu'(aux) and aux_out = gelu(aux): the gradient of the hidden
  // pre-activation of fused_mlp, grad_pre = (grad_out W2) * gelu'(pre), with the hidden
  // activation h = gelu(pre) (the next weight-gradient GEMM's operand) written from the
  // same pass. Layouts as kDgrad. act: kErf / kTanh (the form of GELU).
  kDgradDGelu,
};

enum class MlpAct { kNone, kErf, kTanh };

struct MlpGemmParams {
  MlpGemmKind kind = MlpGemmKind::kForward;
  MlpAct act = MlpAct::kNone;
  Operand a;                    // plain
  Operand b;                    // plain
  int M = 0, N = 0, K = 0;
  void* out = nullptr;          // [M, ldc]
  int64_t ldc = 0;
  const void* bias = nullptr;   // kForward: [N] or null
  void* pre_out = nullptr;      // kForward: [M, ld_pre] or null
  int64_t ld_pre = 0;
  const void* aux = nullptr;    // kDgradDGelu: pre [M, ld_aux]
  int64_t ld_aux = 0;
  void* aux_out = nullptr;      // kDgradDGelu: gelu(pre) [M, ld_aux_out]
  int64_t ld_aux_out = 0;
  void* rowsum = nullptr;       // kWgrad: [M]
  // vector_ok: every operand's inner extent, row stride and pointer, and every
  // epilogue pointer and row stride, allow 16-byte accesses.
  DeviceConfig config;
};

// grad_pre[m, n] = grad_out[m, n] * gelu'(pre[m, n]) (linear_gelu's backward has no GEMM
// to fuse dGELU into). Rows read through their strides, grad_pre written contiguous.
struct MlpDGeluParams {
  const void* grad_out = nullptr;  // [M, ld_grad]
  int64_t ld_grad = 0;
  const void* pre = nullptr;       // [M, ld_pre]
  int64_t ld_pre = 0;
  void* grad_pre = nullptr;        // [M, N] contiguous
  int64_t M = 0, N = 0;
  bool tanh = false;
  // vector_ok: N a multiple of 8, rows 16-byte aligned (8-wide accesses); num_sms
  // sizes the grid.
  DeviceConfig config;
};

// Entry points, T = float, __half or __nv_bfloat16: templates defined in
// qkv_impl.cuh / mlp_impl.cuh and instantiated once per dtype in qkv_<dtype>.cu /
// mlp_<dtype>.cu, so the dtypes build in parallel. They launch on `stream`, never
// synchronise, and return the launch status.
template <typename T>
cudaError_t qkv_forward(const QkvFwdParams& params, cudaStream_t stream);
template <typename T>
cudaError_t qkv_backward(const QkvBwdParams& params, cudaStream_t stream);
template <typename T>
cudaError_t mlp_gemm(const MlpGemmParams& params, cudaStream_t stream);
template <typename T>
cudaError_t mlp_dgelu(const MlpDGeluParams& params, cudaStream_t stream);

}  // namespace gemm
}  // namespace tfkernels
