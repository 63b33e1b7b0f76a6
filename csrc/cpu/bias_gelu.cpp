// bias_gelu / bias_gelu_bwd on the CPU: one elementwise pass over rows of
// x [..., N], fp32 math for 16-bit types (gelu_rows.h). The bias gradient is
// reduced deterministically: per row-chunk partial sums, then a fixed-order reduce.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "alloc.h"
#include "args.h"
#include "cpu/blas.h"
#include "cpu/gelu_rows.h"

namespace tfkernels::cpu {
namespace {

int64_t check_bias_gelu_args(const at::Tensor& x, const at::Tensor& bias) {
  check_dtype_in(x, "x", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  TORCH_CHECK(x.dim() >= 1, "tfkernels: x must have at least 1 dimension [..., N], got a scalar");
  check_rank(bias, "bias", 1, "[N]");
  check_same_device(bias, "bias", x, "x");
  check_same_dtype(bias, "bias", x, "x");
  const int64_t n = x.size(-1);
  check_dim_size(bias, "bias", 0, n, "N, as the last dim of x");
  return n;
}

// Rows per parallel task for an elementwise pass: about 32k elements.
int64_t elementwise_grain(int64_t n) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(n, 1)); }

at::Tensor bias_gelu_cpu(const at::Tensor& x_, const at::Tensor& bias_, c10::string_view approximate) {
  // ATen calls below work on plain buffers: keep them out of autograd.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t n = check_bias_gelu_args(x_, bias_);
  const GeluApprox approx = parse_gelu_approximate(approximate);
  const at::Tensor x = x_.contiguous();
  at::Tensor out = empty_streamed_output_like(x);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0) return out;
  const at::Tensor bias = bias_in_acc_type(bias_, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_gelu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* bp = bias.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, elementwise_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) gelu_fwd(xp + r * n, bp, static_cast<scalar_t*>(nullptr), op + r * n, n, approx);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& grad_out_, const at::Tensor& x_,
                                                     const at::Tensor& bias_, c10::string_view approximate) {
  // ATen calls below work on plain buffers: keep them out of autograd.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t n = check_bias_gelu_args(x_, bias_);
  check_rows_like(grad_out_, "grad_out", x_, "x", n);
  const GeluApprox approx = parse_gelu_approximate(approximate);
  const at::Tensor x = x_.contiguous();
  const at::Tensor grad_out = grad_out_.contiguous();
  at::Tensor grad_x = empty_streamed_output_like(x);
  at::Tensor grad_bias = empty_output({n}, x.options());
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  const at::Tensor bias = bias_in_acc_type(bias_, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_gelu_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t chunk = reduction_rows_per_chunk(rows, n);
    const int64_t chunks = rows == 0 ? 0 : ceil_div(rows, chunk);
    std::vector<double> partials(static_cast<size_t>(chunks * n), 0.0);
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* bp = bias.const_data_ptr<acc_t>();
    scalar_t* dxp = grad_x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        sum_rows_blocked<acc_t>(c * chunk, std::min(rows, (c + 1) * chunk), n, partials.data() + c * n,
                                [&](int64_t r, acc_t* acc) {
                                  gelu_bwd(gp + r * n, xp + r * n, bp, dxp + r * n, acc, n, approx);
                                });
      }
    });
    reduce_partials(partials.data(), chunks, n, grad_bias.mutable_data_ptr<scalar_t>());
  });
  return {grad_x, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(tfkernels, CPU, m) {
  m.impl("bias_gelu", &bias_gelu_cpu);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cpu);
}

}  // namespace tfkernels::cpu
