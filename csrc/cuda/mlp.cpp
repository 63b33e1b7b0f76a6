// CUDA kernels of linear_gelu, linear_gelu_bwd, fused_mlp and fused_mlp_bwd: argument
// checks, temporaries, the sequence of GEMMs on the project's GEMM core
// (csrc/cuda/gemm/mlp_impl.cuh; no cuBLAS anywhere) and the launch on the current
// stream, never synchronising.
//
// Notation: x [..., K] seen as [M, K] (M = product of the leading dims), W / W1 [F, K],
// W2 [N, F]; for linear_gelu the output width is N = W.shape[0]. 2-byte elements for
// fp16/bf16 in the byte counts below.
//
// linear_gelu: one GEMM, x W^T, whose epilogue adds the bias, applies GELU and, when
//   save_pre, also stores pre = x W^T + b (the same 16-byte vectors, already in
//   registers). Keeping pre vs recomputing it in the backward: pre costs 2 bytes per
//   output element written here and 2 read in the backward (4 MN bytes, and MN
//   elements of memory between forward and backward, which eager PyTorch keeps too:
//   F.gelu saves its input). Recomputing it is the GEMM itself again, 2 K FLOPs per
//   element. At the H100/H200 balance point (~800 TFLOP/s over ~3.3-4.8 TB/s, i.e.
//   ~170-240 FLOP per byte) 2K FLOPs cost as much as 4 bytes when K ~ 340-480, so for
//   every realistic d_model (768 and up) saving pre is the cheaper side, by ~2x at
//   K = 768 and ~10x at K = 4096. Only d_model below ~400 would favour the recompute,
//   and there the whole op is small. Hence: pre is saved (the schema's `pre` output),
//   and with save_pre = false (inference) it is neither written nor allocated
//   beyond an empty [0] tensor.
//
// linear_gelu_bwd: grad_pre = grad_out * gelu'(pre) (one elementwise pass: the only
//   GEMMs left, dx and dW, read grad_pre as their operand, and the core has no
//   operand-transform prologue), then
//     dx = grad_pre W                    (kDgrad)
//     dW = grad_pre^T x, db = column sums of grad_pre, fused as the row sums of the
//          dW GEMM's A operand            (kWgrad)
//   Temporary: grad_pre [M, N] (eager materialises the same tensor).
//
// fused_mlp: kForward x W1^T with the GELU epilogue writing h = gelu(pre) [M, F] (a
//   temporary: the down GEMM's A operand) and pre (when saved), then kForward h W2^T
//   + b2. Temporary: h, freed when the op returns (eager keeps h for the backward in
//   addition to pre; we keep pre only).
//
// fused_mlp_bwd:
//   1. grad_pre = (grad_out W2) * gelu'(pre), h = gelu(pre)   (kDgradDGelu: dGELU in
//      the epilogue of the grad_out W2 GEMM, which reads pre; gelu(pre) from the same
//      read, one erf/tanh for both)
//   2. dW2 = grad_out^T h, db2 = column sums of grad_out       (kWgrad)   -> h freed
//   3. dW1 = grad_pre^T x, db1 = column sums of grad_pre       (kWgrad)
//   4. dx = grad_pre W1                                        (kDgrad)
//   Temporaries: grad_pre and h, [M, F] each (h freed after step 2; the caching
//   allocator's stream order makes that safe with no sync). Peak: pre + h + grad_pre
//   = 3 MF, what eager holds too (pre, h saved; grad_h, then grad_pre). Writing h from
//   step 1's epilogue instead of a separate recompute pass saves that pass's read of
//   pre (2 MF bytes) at the cost of h and grad_pre living together; a recompute pass
//   could share one buffer (h, consumed by dW2, then overwritten by grad_pre) and
//   would bring the peak to 2 MF: the alternative if memory, not time, is the limit.
//
// Weight and bias gradients come out in the weights' dtype (= x's dtype), accumulated
// in fp32 inside the GEMMs (bias gradients: exact fp32 sums of the 16-bit values),
// deterministic (no atomics). Per GEMM, the tensor-core kernel runs when every
// operand and output allows 16-byte chunks (widths multiples of 8, aligned pointers
// and row strides), else the generic kernel; fp32 always runs the generic kernel,
// TF32 when torch allows it for matmuls.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

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
using g::as_rows;
using g::check_cuda_dtype;
using g::chunks_ok;
using g::last_dim_contiguous;

std::vector<int64_t> with_last(const at::Tensor& x, int64_t features) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = features;
  return sizes;
}

// The GEMM core indexes rows, columns and the reduction dim with int32.
void check_dims(const char* op, std::initializer_list<int64_t> dims) {
  cuda::check_limit(op, "rows and features", dims, cuda::kMaxInt32);
}

const void* bias_ptr(const c10::optional<at::Tensor>& bias, at::Tensor& holder) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  holder = bias->contiguous();
  return holder.data_ptr();
}

g::MlpAct gelu_act(GeluApprox approx) { return approx == GeluApprox::kTanh ? g::MlpAct::kTanh : g::MlpAct::kErf; }

// One GEMM of the core, C [M, N] = A B^T with both operands given as the 2-D
// row-major tensors they are stored as (unit column stride): for kInnerK operands
// [M or N, K], for kInnerMN operands [K, M or N]. `out` is C's buffer, contiguous
// [M, N]. The tensor-core path is allowed when every tensor the GEMM touches passes
// chunks_ok (and the bias is aligned).
class Gemm {
 public:
  Gemm(g::MlpGemmKind kind, g::MlpAct act, const at::Tensor& a, const at::Tensor& b, int64_t M, int64_t N,
       int64_t K, const at::Tensor& out) {
    args_.kind = kind;
    args_.act = act;
    args_.a = g::plain_operand(a.data_ptr(), a.stride(0));
    args_.b = g::plain_operand(b.data_ptr(), b.stride(0));
    args_.M = static_cast<int>(M);
    args_.N = static_cast<int>(N);
    args_.K = static_cast<int>(K);
    args_.out = out.data_ptr();
    args_.ldc = N;
    vector_ok_ = chunks_ok(a) && chunks_ok(b) && chunks_ok(out);
  }
  Gemm& bias(const void* p) {
    args_.bias = p;
    vector_ok_ = vector_ok_ && cuda::is_aligned(p, 16);
    return *this;
  }
  Gemm& pre_out(const at::Tensor& pre) {  // [M, N] contiguous
    args_.pre_out = pre.data_ptr();
    args_.ld_pre = pre.stride(0);
    vector_ok_ = vector_ok_ && chunks_ok(pre);
    return *this;
  }
  Gemm& dgelu(const at::Tensor& pre, const at::Tensor& hidden) {  // [M, N] each
    args_.aux = pre.data_ptr();
    args_.ld_aux = pre.stride(0);
    args_.aux_out = hidden.data_ptr();
    args_.ld_aux_out = hidden.stride(0);
    vector_ok_ = vector_ok_ && chunks_ok(pre) && chunks_ok(hidden);
    return *this;
  }
  Gemm& rowsum(const at::Tensor& sums) {  // [M]; one scalar store per row
    args_.rowsum = sums.data_ptr();
    return *this;
  }
  void run(at::ScalarType dtype) {
    args_.config = g::device_config(dtype, vector_ok_);
    cuda::launch_for_dtype(dtype, [&](auto tag, cudaStream_t stream) {
      return g::mlp_gemm<cuda::tag_type<decltype(tag)>>(args_, stream);
    });
  }

 private:
  g::MlpGemmParams args_;
  bool vector_ok_ = false;
};

// grad_pre = grad_out * gelu'(pre), all [M, N]; grad_pre contiguous.
void dgelu_pass(const at::Tensor& grad_out, const at::Tensor& pre, const at::Tensor& grad_pre, GeluApprox approx) {
  g::MlpDGeluParams a;
  a.grad_out = grad_out.data_ptr();
  a.ld_grad = grad_out.stride(0);
  a.pre = pre.data_ptr();
  a.ld_pre = pre.stride(0);
  a.grad_pre = grad_pre.data_ptr();
  a.M = grad_pre.size(0);
  a.N = grad_pre.size(1);
  a.tanh = approx == GeluApprox::kTanh;
  a.config = g::device_config(grad_pre.scalar_type(), chunks_ok(grad_out) && chunks_ok(pre) && chunks_ok(grad_pre));
  cuda::launch_for_dtype(grad_pre.scalar_type(), [&](auto tag, cudaStream_t stream) {
    return g::mlp_dgelu<cuda::tag_type<decltype(tag)>>(a, stream);
  });
}

// The weight-gradient GEMM also writes the bias gradient, unless its output has no
// columns (K = 0 for db/db1, F = 0 for db2): then no tile runs and the column sums
// come from one reduction here (degenerate shapes only).
void bias_grad_without_gemm(const at::Tensor& rows, const at::Tensor& grad_bias) {
  if (grad_bias.numel() == 0) return;
  grad_bias.copy_(rows.sum(0, /*keepdim=*/false, at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias,
                                                    c10::string_view approximate, bool save_pre) {
  TFKERNELS_WARN_UNVERIFIED_CUDA("linear_gelu");
  const LinearShape s = check_linear_args(x, "x", weight, "weight", bias, "bias");
  const GeluApprox approx = parse_gelu_approximate(approximate);
  check_cuda_dtype(x, "x");
  const int64_t M = s.rows, K = s.in_features, N = s.out_features;
  check_dims("linear_gelu", {M, K, N});
  const device::Guard guard(x.device());

  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = empty_output(with_last(x, N), opts);
  at::Tensor pre = save_pre ? empty_output(with_last(x, N), opts) : empty_output({0}, opts);
  if (M == 0 || N == 0) return {out, pre};

  const at::Tensor x2 = as_rows(x, M, K);
  const at::Tensor w = last_dim_contiguous(weight);
  at::Tensor b;
  Gemm gemm(g::MlpGemmKind::kForward, gelu_act(approx), x2, w, M, N, K, out.view({M, N}));
  gemm.bias(bias_ptr(bias, b));
  if (save_pre) gemm.pre_out(pre.view({M, N}));
  gemm.run(x.scalar_type());
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                                    const at::Tensor& weight, const at::Tensor& pre,
                                                                    c10::string_view approximate) {
  const LinearShape s = check_linear_args(x, "x", weight, "weight", c10::nullopt, "bias");
  check_rows_like(grad_out, "grad_out", x, "x", s.out_features);
  check_rows_like(pre, "pre", x, "x", s.out_features);
  const GeluApprox approx = parse_gelu_approximate(approximate);
  check_cuda_dtype(x, "x");
  const int64_t M = s.rows, K = s.in_features, N = s.out_features;
  check_dims("linear_gelu_bwd", {M, K, N});
  const device::Guard guard(x.device());
  const at::ScalarType dt = x.scalar_type();

  at::Tensor grad_x = empty_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_w = empty_output(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_b = empty_output({N}, weight.options());

  const at::Tensor x2 = as_rows(x, M, K);
  const at::Tensor w = last_dim_contiguous(weight);
  const at::Tensor go = as_rows(grad_out, M, N);
  const at::Tensor pre2 = as_rows(pre, M, N);
  const at::Tensor gx = grad_x.view({M, K});

  // grad_pre = grad_out * gelu'(pre): the one temporary, [M, N].
  const at::Tensor grad_pre = at::empty({M, N}, x.options());
  dgelu_pass(go, pre2, grad_pre, approx);
  // dx [M, K] = grad_pre [M, N] W [N, K]: A kInnerK, B = W as [K'=N, N'=K] kInnerMN.
  Gemm(g::MlpGemmKind::kDgrad, g::MlpAct::kNone, grad_pre, w, M, K, N, gx).run(dt);
  // dW [N, K] = grad_pre^T x: A = grad_pre as [K'=M, M'=N], B = x as [K'=M, N'=K]; db = row sums of A.
  if (K > 0) {
    Gemm(g::MlpGemmKind::kWgrad, g::MlpAct::kNone, grad_pre, x2, N, K, M, grad_w).rowsum(grad_b).run(dt);
  } else {
    bias_grad_without_gemm(grad_pre, grad_b);
  }
  return {grad_x, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor> fused_mlp_cuda(const at::Tensor& x, const at::Tensor& w1,
                                                  const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                  const c10::optional<at::Tensor>& b2, c10::string_view approximate,
                                                  bool save_pre) {
  TFKERNELS_WARN_UNVERIFIED_CUDA("fused_mlp");
  const LinearShape s1 = check_linear_args(x, "x", w1, "w1", b1, "b1");
  check_mlp_second_layer(x, w2, b2, s1.out_features);
  const GeluApprox approx = parse_gelu_approximate(approximate);
  check_cuda_dtype(x, "x");
  const int64_t M = s1.rows, K = s1.in_features, F = s1.out_features, N = w2.size(0);
  check_dims("fused_mlp", {M, K, F, N});
  const device::Guard guard(x.device());
  const at::ScalarType dt = x.scalar_type();

  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = empty_output(with_last(x, N), opts);
  at::Tensor pre = save_pre ? empty_output(with_last(x, F), opts) : empty_output({0}, opts);
  if (M == 0) return {out, pre};  // (N == 0 still runs the up GEMM: pre is an output)

  const at::Tensor x2 = as_rows(x, M, K);
  const at::Tensor w1c = last_dim_contiguous(w1);
  const at::Tensor w2c = last_dim_contiguous(w2);
  at::Tensor b1c, b2c;
  // h = gelu(x W1^T + b1) [M, F]: the temporary the down GEMM reads; pre alongside.
  const at::Tensor h = at::empty({M, F}, x.options());
  Gemm up(g::MlpGemmKind::kForward, gelu_act(approx), x2, w1c, M, F, K, h);
  up.bias(bias_ptr(b1, b1c));
  if (save_pre) up.pre_out(pre.view({M, F}));
  up.run(dt);
  // out [M, N] = h W2^T + b2.
  Gemm(g::MlpGemmKind::kForward, g::MlpAct::kNone, h, w2c, M, N, F, out.view({M, N})).bias(bias_ptr(b2, b2c)).run(dt);
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_mlp_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pre, c10::string_view approximate) {
  const LinearShape s1 = check_linear_args(x, "x", w1, "w1", c10::nullopt, "b1");
  check_mlp_second_layer(x, w2, c10::nullopt, s1.out_features);
  const int64_t M = s1.rows, K = s1.in_features, F = s1.out_features, N = w2.size(0);
  check_rows_like(grad_out, "grad_out", x, "x", N);
  check_rows_like(pre, "pre", x, "x", F);
  const GeluApprox approx = parse_gelu_approximate(approximate);
  check_cuda_dtype(x, "x");
  check_dims("fused_mlp_bwd", {M, K, F, N});
  const device::Guard guard(x.device());
  const at::ScalarType dt = x.scalar_type();

  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor grad_x = empty_output(x.sizes(), x.options().memory_format(contiguous));
  at::Tensor grad_w1 = empty_output(w1.sizes(), w1.options().memory_format(contiguous));
  at::Tensor grad_b1 = empty_output({F}, w1.options());
  at::Tensor grad_w2 = empty_output(w2.sizes(), w2.options().memory_format(contiguous));
  at::Tensor grad_b2 = empty_output({N}, w2.options());

  const at::Tensor x2 = as_rows(x, M, K);
  const at::Tensor w1c = last_dim_contiguous(w1);
  const at::Tensor w2c = last_dim_contiguous(w2);
  const at::Tensor go = as_rows(grad_out, M, N);
  const at::Tensor pre2 = as_rows(pre, M, F);
  const at::Tensor gx = grad_x.view({M, K});

  // 1. grad_pre [M, F] = (grad_out [M, N] W2 [N, F]) * gelu'(pre), h = gelu(pre).
  //    A = grad_out kInnerK, B = W2 as [K'=N, N'=F] kInnerMN.
  const at::Tensor grad_pre = at::empty({M, F}, x.options());
  at::Tensor h = at::empty({M, F}, x.options());
  Gemm(g::MlpGemmKind::kDgradDGelu, gelu_act(approx), go, w2c, M, F, N, grad_pre).dgelu(pre2, h).run(dt);
  // 2. dW2 [N, F] = grad_out^T h: A = grad_out as [K'=M, M'=N], B = h as [K'=M, N'=F];
  //    db2 = row sums of A (column sums of grad_out).
  if (F > 0) {
    Gemm(g::MlpGemmKind::kWgrad, g::MlpAct::kNone, go, h, N, F, M, grad_w2).rowsum(grad_b2).run(dt);
  } else {
    bias_grad_without_gemm(go, grad_b2);
  }
  h.reset();  // stream-ordered: the allocator hands the block out again only behind dW2
  // 3. dW1 [F, K] = grad_pre^T x, db1 = column sums of grad_pre.
  if (K > 0) {
    Gemm(g::MlpGemmKind::kWgrad, g::MlpAct::kNone, grad_pre, x2, F, K, M, grad_w1).rowsum(grad_b1).run(dt);
  } else {
    bias_grad_without_gemm(grad_pre, grad_b1);
  }
  // 4. dx [M, K] = grad_pre [M, F] W1 [F, K]: B = W1 as [K'=F, N'=K] kInnerMN.
  Gemm(g::MlpGemmKind::kDgrad, g::MlpAct::kNone, grad_pre, w1c, M, K, F, gx).run(dt);
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace

TFKERNELS_CUDA_LIBRARY_IMPL(m) {
  m.impl("linear_gelu", &linear_gelu_cuda);
  m.impl("linear_gelu_bwd", &linear_gelu_bwd_cuda);
  m.impl("fused_mlp", &fused_mlp_cuda);
  m.impl("fused_mlp_bwd", &fused_mlp_bwd_cuda);
}

}  // namespace tfkernels
