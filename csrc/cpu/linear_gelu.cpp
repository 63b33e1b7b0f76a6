// linear_gelu / linear_gelu_bwd on the CPU.
//
// Forward: linear_gelu_fwd.h's tiles (fused_mlp's bf16 forward runs them too).
//
// Backward: dpre = grad_out * gelu'(pre) in one pass with the bias gradient
// fused in (deterministic per-row-chunk partial sums), then dx = dpre @ W and
// dW = dpre^T @ x as two multithreaded GEMMs (fp32 accumulation for 16-bit types,
// on gemm16.h's backend).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "alloc.h"
#include "args.h"
#include "cpu/blas.h"
#include "cpu/gelu_rows.h"
#include "cpu/gemm16.h"
#include "cpu/linear_gelu_fwd.h"
#include "cpu/warm_buffers.h"

namespace tfkernels::cpu {
namespace {

std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t features) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = features;
  return sizes;
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_cpu(const at::Tensor& x_, const at::Tensor& weight_,
                                                   const c10::optional<at::Tensor>& bias_,
                                                   c10::string_view approximate, bool save_pre) {
  // ATen calls below work on plain buffers: keep them out of autograd.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const LinearShape s = check_linear_args(x_, "x", weight_, "weight", bias_, "bias");
  const GeluApprox approx = parse_gelu_approximate(approximate);
  const at::Tensor x = x_.contiguous();
  const at::Tensor w = weight_.contiguous();
  const auto sizes = out_sizes(x, s.out_features);
  at::Tensor out = empty_output(sizes, x.options());
  at::Tensor pre = save_pre ? empty_output(sizes, x.options()) : empty_output({0}, x.options());
  if (s.rows == 0 || s.out_features == 0) return {out, pre};
  const at::Tensor bias = bias_in_acc_type(bias_, x.scalar_type());
  const bool reduced = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  // Detached: parallel_for workers do not inherit the autograd exclusion above.
  const at::Tensor bias16 = reduced && bias.defined() ? bias_->detach().contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "linear_gelu", [&] {
    using acc_t = acc_type<scalar_t>;
    linear_gelu_fwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                     bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
                                     save_pre ? pre.mutable_data_ptr<scalar_t>() : nullptr,
                                     out.mutable_data_ptr<scalar_t>(), s.rows, s.out_features, s.in_features, approx,
                                     bias16, gemm16_backend(x.scalar_type()));
  });
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd_cpu(const at::Tensor& grad_out_, const at::Tensor& x_,
                                                                   const at::Tensor& weight_, const at::Tensor& pre_,
                                                                   c10::string_view approximate) {
  // ATen calls below work on plain buffers: keep them out of autograd.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const LinearShape s = check_linear_args(x_, "x", weight_, "weight", c10::nullopt, "bias");
  check_rows_like(grad_out_, "grad_out", x_, "x", s.out_features);
  check_rows_like(pre_, "pre", x_, "x", s.out_features);
  const GeluApprox approx = parse_gelu_approximate(approximate);
  const at::Tensor x = x_.contiguous();
  const at::Tensor w = weight_.contiguous();
  const at::Tensor grad_out = grad_out_.contiguous();
  const at::Tensor pre = pre_.contiguous();
  const int64_t m = s.rows, n = s.out_features, k = s.in_features;

  at::Tensor grad_x = empty_output_like(x);
  at::Tensor grad_w = empty_output_like(w);
  at::Tensor grad_b = empty_output({n}, w.options());
  // dpre is the one full-size temporary (eager keeps the same gradient of the GEMM output).
  at::Tensor dpre = warm::empty({m, n}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "linear_gelu_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t chunk = reduction_rows_per_chunk(m, n);
    const int64_t chunks = m == 0 ? 0 : ceil_div(m, chunk);
    std::vector<double> partials(static_cast<size_t>(chunks * n), 0.0);
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* pp = pre.const_data_ptr<scalar_t>();
    scalar_t* dp = dpre.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        sum_rows_blocked<acc_t>(c * chunk, std::min(m, (c + 1) * chunk), n, partials.data() + c * n,
                                [&](int64_t r, acc_t* acc) {
                                  gelu_bwd(gp + r * n, pp + r * n, static_cast<const acc_t*>(nullptr), dp + r * n, acc,
                                           n, approx);
                                });
      }
    });
    reduce_partials(partials.data(), chunks, n, grad_b.mutable_data_ptr<scalar_t>());
  });
  at::Tensor grad_x2d = grad_x.view({m, k});
  mm_out_cpu(grad_x2d, dpre, w);
  mm_out_cpu(grad_w, dpre.t(), x.view({m, k}));
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(tfkernels, CPU, m) {
  m.impl("linear_gelu", &linear_gelu_cpu);
  m.impl("linear_gelu_bwd", &linear_gelu_bwd_cpu);
}

}  // namespace tfkernels::cpu
