// Torch-facing launcher of the bias-GELU CUDA kernels (compiled by the host
// compiler): argument checks, dtype mapping, allocation, stream, launch check.
// The kernels themselves live in bias_gelu/, which sees no torch header.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "alloc.h"
#include "args.h"
#include "cuda/bias_gelu/bias_gelu_params.h"
#include "cuda/common/device_context.h"
#include "cuda/common/launcher_utils.h"
#include "cuda/unverified.h"

namespace tfkernels {
namespace {

// x [..., N] (CUDA, float32/bf16/fp16) and bias [N] of its dtype and device.
// Returns N. Any strides are accepted: the launcher makes x contiguous.
int64_t check_bias_gelu_args(const at::Tensor& x, const at::Tensor& bias) {
  check_dtype_in(x, "x", {at::kFloat, at::kBFloat16, at::kHalf});
  TORCH_CHECK(x.dim() >= 1, "tfkernels: x must have at least 1 dimension [..., N], got a scalar");
  TORCH_CHECK(bias.defined(), "tfkernels: bias is an undefined tensor");
  check_same_device(bias, "bias", x, "x");
  check_same_dtype(bias, "bias", x, "x");
  const int64_t cols = x.size(-1);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == cols, "tfkernels: bias must be a 1-D tensor [N] with N = x.shape[-1] = ",
              cols, ", got ", bias.dim(), "-D ", bias.sizes());
  return cols;
}

at::Tensor bias_gelu_cuda(const at::Tensor& x, const at::Tensor& bias, c10::string_view approximate) {
  TFKERNELS_WARN_UNVERIFIED_CUDA("bias_gelu");
  const GeluApprox form = parse_gelu_approximate(approximate);
  const int64_t cols = check_bias_gelu_args(x, bias);
  const device::Guard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.contiguous();
  at::Tensor out = empty_output(x.sizes(), xc.options());
  if (out.numel() == 0) return out;

  bias_gelu::BiasGeluParams params{};
  params.x = xc.const_data_ptr();
  params.bias = bc.const_data_ptr();
  params.out = out.mutable_data_ptr();
  params.cols = cols;
  params.rows = xc.numel() / cols;
  params.dtype = cuda::dtype_of(x);
  params.tanh = form == GeluApprox::kTanh;
  TFKERNELS_CHECK_LAUNCH(bias_gelu::launch_bias_gelu(params, device::current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                      const at::Tensor& bias, c10::string_view approximate) {
  const GeluApprox form = parse_gelu_approximate(approximate);
  const int64_t cols = check_bias_gelu_args(x, bias);
  TORCH_CHECK(grad_out.defined(), "tfkernels: grad_out is an undefined tensor");
  check_same_device(grad_out, "grad_out", x, "x");
  check_same_dtype(grad_out, "grad_out", x, "x");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "tfkernels: grad_out must have the shape of x ", x.sizes(), ", got ",
              grad_out.sizes());
  const device::Guard guard(x.device());
  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.contiguous();
  at::Tensor grad_x = empty_output(x.sizes(), xc.options());
  at::Tensor grad_bias = empty_output({cols}, bc.options());
  if (cols == 0) return {grad_x, grad_bias};
  if (x.numel() == 0) {
    grad_bias.zero_();  // the sum over no rows
    return {grad_x, grad_bias};
  }

  bias_gelu::BiasGeluBwdParams params{};
  params.grad_out = gc.const_data_ptr();
  params.x = xc.const_data_ptr();
  params.bias = bc.const_data_ptr();
  params.grad_x = grad_x.mutable_data_ptr();
  params.grad_bias = grad_bias.mutable_data_ptr();
  params.cols = cols;
  params.rows = xc.numel() / cols;
  params.dtype = cuda::dtype_of(x);
  params.tanh = form == GeluApprox::kTanh;
  const int64_t workspace_elems = bias_gelu::bias_gelu_bwd_workspace_elems(params);
  at::Tensor workspace;  // per-row-chunk float partials of grad_bias, stream-ordered allocation
  if (workspace_elems > 0) {
    workspace = at::empty({workspace_elems}, xc.options().dtype(at::kFloat));
    params.workspace = workspace.mutable_data_ptr<float>();
  }
  TFKERNELS_CHECK_LAUNCH(bias_gelu::launch_bias_gelu_bwd(params, device::current_stream()));
  return {grad_x, grad_bias};
}

}  // namespace

TFKERNELS_CUDA_LIBRARY_IMPL(m) {
  m.impl("bias_gelu", &bias_gelu_cuda);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cuda);
}

}  // namespace tfkernels
