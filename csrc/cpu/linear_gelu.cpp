// linear_gelu / linear_gelu_bwd on the CPU.
//
// Forward: the output [M, N] is cut into tiles of kRowTile x kColTile; each task
// runs a single-threaded GEMM for its tile (into `pre`, or into `out` itself when
// pre is not saved) and then the bias + GELU pass over the tile while it is still
// in cache (L2-sized tiles). 16-bit types run the GEMM gemm16.h chooses: on oneDNN
// one whole GEMM through ATen on every thread, bias fused (fp32 accumulation, one
// rounding), then a parallel GELU pass over the rounded value, as eager (per-tile
// oneDNN calls each repacked their columns of W: 8 times all of W at M2048 K1024
// N4096 bf16, 11.2-11.4 ms against 8.2-9.4 whole on 2 AMX Xeon cores, fwd+bwd 38.7
// against 35.5; eager 17-21 / 60); or MKL into an fp32 tile whose GELU epilogue
// rounds pre and out once each; bf16 on AVX512-BF16 without AMX runs the latter
// structure on bf16_dot's tiles with W^T packed once (forward_on_bf16_tiles:
// M2048 K1024 N4096, alternating calls on a 2-core Zen 4, 50.5 ms against 57.1 on
// per-tile oneDNN calls, eager 68.6).
// Tiles are ordered row-block major so consecutive tiles of a thread reuse the
// same rows of x.
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
#include "cpu/warm_buffers.h"

namespace tfkernels::cpu {
namespace {

// Tuned on a 2-core AVX-512 machine (M=2048, K=1024, N=4096): a 128 x 256 fp32 tile
// is 128 KiB, which stays in L2 between the GEMM and the GELU pass.
constexpr int64_t kRowTile = 128;
constexpr int64_t kColTile = 256;
// Tiles whose GEMM is a BLAS call (fp32 where f32_dot's packed kernels do not run
// the whole GEMMs, i.e. MKL on Intel) are larger: BLAS packs the tile's rows of x
// and columns of W on every call, and 256 x 512 (512 KiB, in a 2 MiB L2) amortises
// that: M2048 K1024 N4096 fp32 tanh forward on 2 AMX Xeon cores, medians of 20
// interleaved calls in two runs, 55.3 / 57.0 ms at 128 x 256 against 51.3 / 53.2
// (512 x 512 and 256 x 1024 alike; F.linear alone 52.7 / 54.9).
constexpr int64_t kRowTileBlas = 256;
constexpr int64_t kColTileBlas = 512;

std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t features) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = features;
  return sizes;
}

template <typename scalar_t>
void linear_gelu_fwd_kernel(const scalar_t* x, const scalar_t* w, const acc_type<scalar_t>* bias, scalar_t* pre,
                            scalar_t* out, int64_t m, int64_t n, int64_t k, GeluApprox approx,
                            const at::Tensor& bias16, Gemm16 backend) {
  const bool tiles = forward_on_bf16_tiles<scalar_t>(k);
  if constexpr (is_16bit<scalar_t>) {
    if (backend == Gemm16::kOneDnn && !tiles) return linear_gelu_onednn(x, m, k, w, n, bias16, pre, out, approx);
  }
  // W^T, packed once for all tiles where the GEMMs run on our kernels (blas.h).
  const SharedB<scalar_t> wt = share_b(true, w, k, k, n, tiles);
  const bool fp32_blas = std::is_same_v<scalar_t, float> && wt.packed.empty();
  const int64_t mb = balanced_block(m, fp32_blas ? kRowTileBlas : kRowTile);
  const int64_t nb = balanced_block(n, fp32_blas ? kColTileBlas : kColTile);
  const int64_t tiles_m = ceil_div(m, mb), tiles_n = ceil_div(n, nb);
  at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(is_16bit<scalar_t> ? static_cast<size_t>(mb * nb) : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = (t / tiles_n) * mb, c0 = (t % tiles_n) * nb;
      const int64_t rows = std::min(mb, m - r0), cols = std::min(nb, n - c0);
      const auto* b = bias != nullptr ? bias + c0 : nullptr;
      if constexpr (is_16bit<scalar_t>) {
        gemm_rm_shared<scalar_t, float>(false, rows, cols, k, 1.0f, x + r0 * k, k, wt, 0, c0, 0.0f, acc.data(), cols);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t off = (r0 + i) * n + c0;
          gelu_fwd(acc.data() + i * cols, b, pre != nullptr ? pre + off : nullptr, out + off, cols, approx);
        }
      } else {
        scalar_t* dst = pre != nullptr ? pre : out;
        gemm_rm_shared(false, rows, cols, k, scalar_t(1), x + r0 * k, k, wt, 0, c0, scalar_t(0), dst + r0 * n + c0, n);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t off = (r0 + i) * n + c0;
          // In place: pre gets the bias added (when there is one), out the GELU.
          gelu_fwd(dst + off, b, (pre != nullptr && b != nullptr) ? pre + off : nullptr, out + off, cols, approx);
        }
      }
    }
  });
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
