// fused_mlp / fused_mlp_bwd on the CPU: out = gelu(x W1^T + b1) W2^T + b2.
//
// Forward, per block of rows (one task each, single-threaded GEMMs):
//   out_block = b2
//   for each block of hidden units f:
//     pre_tile = x_block W1[f]^T + b1[f]          (into `pre` when it is saved)
//     h_tile   = gelu(pre_tile)                   (thread-local, L2-sized)
//     out_block += h_tile W2[:, f]^T
// so the hidden activation h is never stored in full. 16-bit types on the oneDNN
// backend (gemm16.h: CPUs with native 16-bit dot products) instead run the two
// whole oneDNN GEMMs (x W1^T + b1, then h W2^T + b2, each on every thread) with the
// GELU pass between them and h in memory kept between calls (warm_buffers.h):
// oneDNN has no fp32 output for 16-bit inputs through ATen, and accumulating per
// hidden block in the dtype would round too often. bf16 on AVX512-BF16 without AMX
// runs the same two whole GEMMs on bf16_dot's tiles (fused_mlp_fwd_kernel_16bit). On
// the BLAS backend they take the loop above with MKL's fp32-output GEMM (the pre
// tile and the output accumulator in fp32).
//
// Backward:
//   dpre = (grad_out W2) * gelu'(pre), tile by tile (GEMM, then the dGELU pass
//          while the tile is in cache), with gb1 and gb2 reduced in the same pass;
//   gw2  = grad_out^T gelu(pre), one task per block of hidden units, h
//          recomputed tile by tile from pre;
//   gw1  = dpre^T x, gx = dpre W1 (multithreaded GEMMs).
// dpre is the only full-size temporary (eager keeps h and the gradient of h too).
// 16-bit types on the oneDNN backend run the two tile GEMMs as whole oneDNN GEMMs
// instead, as eager does: dh = grad_out W2 into dpre (rounded once, then the dGELU
// pass in place) and gw2 = grad_out^T h with h = gelu(pre) stored in full; MKL's bf16
// GEMM that the tiles call runs at half oneDNN's rate on a CPU with AVX512-BF16.
// Bias gradients: per row-block partial sums reduced in a fixed order.
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

constexpr int64_t kFwdRows = 512;     // rows per forward task (W1, W2 are re-read once per task)
// Hidden units per tile. On a 2-core Zen 3 (M2048 d1024 ff4096, fp32, interleaved
// runs against eager and torch.compile): 512 x 256 ran 0.9-1.0x compile, 512 x 512
// and 512 x 1024 1.10-1.13x, 128-256 rows 1.0-1.09x: fewer, longer rank updates of
// the output block (the second GEMM's K) beat keeping the tile in L2.
constexpr int64_t kHidden = 512;
// Rows per dpre tile: each tile packs its hidden columns of W2 again, so taller tiles
// pack less (a 256 x 512 fp32 tile is 512 KiB, in L2 for the gelu' pass). On a 2-core
// Zen 4 (fp32 backward, M2048 d1024 ff4096, alternating calls, 10 each): 128 rows
// 392 / 412 ms (min / median), 256 rows 385 / 409, 512 rows 384 / 402.
constexpr int64_t kBwdRows = 256;
constexpr int64_t kGw2Rows = 512;     // rows per gw2 GEMM (K of that GEMM)

struct MlpShape {
  int64_t rows, in_features, hidden, out_features;
};

std::vector<int64_t> with_last(const at::Tensor& x, int64_t features) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = features;
  return sizes;
}

// 16-bit types on the oneDNN backend: pre = x W1^T + b1, h = gelu(pre) and out =
// h W2^T + b2 as two whole GEMMs (each on every thread), h in warm memory between them.
// The first is linear_gelu's forward (linear_gelu_fwd.h): one oneDNN GEMM through
// ATen (fp32 accumulation, bias in fp32, one rounding, as eager) and a parallel GELU
// pass, or, for bf16 where bf16_dot's tiles take it (gemm16.h's forward_on_bf16_tiles),
// the tiles with the GELU in their epilogue from the fp32 sum; the second likewise
// through ATen or on the tiles (linear_bf16_tiles, W2^T packed once). Whole GEMMs, not
// one pair per block of rows: oneDNN packs its B (all of W1, all of W2) on every call,
// which 256-row blocks repeated 8 times at M2048 (d1024 ff4096 bf16 on 2 AMX Xeon
// cores, medians of 12 interleaved calls in two runs: 25.3 / 25.5 ms in 256-row
// blocks, 22.6 / 22.8 in 512, 16.1 / 16.7 whole; eager 27.1 / 29.5). On the tiles
// against oneDNN (M2048 d1024 ff4096 tanh, 2 Zen 4 cores, medians of 12 shuffled calls
// in each of 3 processes): 80.1-81.2 ms against 86.8-88.1 (eager 102-108); oneDNN's
// GEMMs also swing from process to process.
template <typename scalar_t>
void fused_mlp_fwd_kernel_16bit(const MlpShape& s, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                const at::Tensor& b1_16, const at::Tensor& w2, const at::Tensor& b2,
                                const at::Tensor& b2_16, scalar_t* pre, at::Tensor& out, GeluApprox approx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t m = s.rows, d = s.in_features, f = s.hidden, n = s.out_features;
  const at::Tensor h = warm::empty({m, f}, x.options());
  linear_gelu_fwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), w1.const_data_ptr<scalar_t>(),
                                   b1.defined() ? b1.const_data_ptr<acc_t>() : nullptr, pre,
                                   h.mutable_data_ptr<scalar_t>(), m, f, d, approx, b1_16, Gemm16::kOneDnn);
  at::Tensor out2d = out.view({m, n});
  if (n > 0 && forward_on_bf16_tiles<scalar_t>(f)) {
    linear_bf16_tiles(out2d, h, w2, b2.defined() ? b2.const_data_ptr<acc_t>() : nullptr);
  } else {
    linear_tile_aten(h.const_data_ptr<scalar_t>(), m, f, f, w2.const_data_ptr<scalar_t>(), n, f, b2_16,
                     out2d.mutable_data_ptr<scalar_t>(), n);
  }
}

template <typename scalar_t>
void fused_mlp_fwd_kernel(const MlpShape& s, const scalar_t* x, const scalar_t* w1, const acc_type<scalar_t>* b1,
                          const scalar_t* w2, const acc_type<scalar_t>* b2, scalar_t* pre, scalar_t* out,
                          GeluApprox approx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t m = s.rows, d = s.in_features, f = s.hidden, n = s.out_features;
  const int64_t mb = rows_per_task(m, kFwdRows, at::get_num_threads());
  const int64_t fb = std::min(kHidden, std::max<int64_t>(f, 1));
  // W1^T and W2^T, packed once for all tasks where fp32 runs on f32_dot (blas.h).
  const SharedB<scalar_t> w1t = share_b(true, w1, d, d, f);
  const SharedB<scalar_t> w2t = share_b(true, w2, f, f, n);
  at::parallel_for(0, ceil_div(m, mb), 1, [&](int64_t begin, int64_t end) {
    // acc: pre tile (fp32 scratch for 16-bit types); h: the GELU tile, in the dtype.
    std::vector<float> acc16(is_16bit<scalar_t> ? static_cast<size_t>(mb * fb) : 0);
    std::vector<scalar_t> h(static_cast<size_t>(mb * fb));
    std::vector<float> out16(is_16bit<scalar_t> ? static_cast<size_t>(mb * n) : 0);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * mb, rows = std::min(mb, m - r0);
      const scalar_t* xb = x + r0 * d;
      // The output accumulator starts as b2 (or 0).
      auto* oacc = [&] {
        if constexpr (is_16bit<scalar_t>) return out16.data();
        else return out + r0 * n;
      }();
      const int64_t ldo = n;
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < n; ++j) oacc[i * ldo + j] = b2 != nullptr ? b2[j] : acc_t(0);
      }
      for (int64_t f0 = 0; f0 < f; f0 += fb) {
        const int64_t fc = std::min(fb, f - f0);
        const acc_t* bb = b1 != nullptr ? b1 + f0 : nullptr;
        if constexpr (is_16bit<scalar_t>) {
          gemm_rm_shared(false, rows, fc, d, 1.0f, xb, d, w1t, 0, f0, 0.0f, acc16.data(), fc);
          for (int64_t i = 0; i < rows; ++i) {
            gelu_fwd(acc16.data() + i * fc, bb, pre != nullptr ? pre + (r0 + i) * f + f0 : nullptr, h.data() + i * fc,
                     fc, approx);
          }
        } else {
          // GEMM straight into pre when it is saved, else into h; GELU in place.
          scalar_t* dst = pre != nullptr ? pre + r0 * f + f0 : h.data();
          const int64_t ldd = pre != nullptr ? f : fc;
          gemm_rm_shared(false, rows, fc, d, scalar_t(1), xb, d, w1t, 0, f0, scalar_t(0), dst, ldd);
          for (int64_t i = 0; i < rows; ++i) {
            scalar_t* prow = dst + i * ldd;
            gelu_fwd(prow, bb, (pre != nullptr && bb != nullptr) ? prow : nullptr, h.data() + i * fc, fc, approx);
          }
        }
        gemm_rm_shared(false, rows, n, fc, acc_t(1), h.data(), fc, w2t, f0, 0, acc_t(1), oacc, ldo);
      }
      if constexpr (is_16bit<scalar_t>) {
        for (int64_t i = 0; i < rows; ++i) store_row(out16.data() + i * n, out + (r0 + i) * n, n);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fused_mlp_cpu(const at::Tensor& x_, const at::Tensor& w1_,
                                                 const c10::optional<at::Tensor>& b1_, const at::Tensor& w2_,
                                                 const c10::optional<at::Tensor>& b2_, c10::string_view approximate,
                                                 bool save_pre) {
  // ATen calls below work on plain buffers: keep them out of autograd.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const LinearShape s1 = check_linear_args(x_, "x", w1_, "w1", b1_, "b1");
  check_mlp_second_layer(x_, w2_, b2_, s1.out_features);
  const GeluApprox approx = parse_gelu_approximate(approximate);
  const MlpShape s{s1.rows, s1.in_features, s1.out_features, w2_.size(0)};
  const at::Tensor x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  at::Tensor out = empty_output(with_last(x, s.out_features), x.options());
  at::Tensor pre = save_pre ? empty_output(with_last(x, s.hidden), x.options()) : empty_output({0}, x.options());
  if (s.rows == 0) return {out, pre};
  const at::Tensor b1 = bias_in_acc_type(b1_, x.scalar_type());
  const at::Tensor b2 = bias_in_acc_type(b2_, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_mlp", [&] {
    using acc_t = acc_type<scalar_t>;
    if constexpr (is_16bit<scalar_t>) {
      // Not as fused_mlp_fwd_kernel on bf16_dot's tiles: its hidden blocks accumulate into an
      // fp32 output block, which measured 0.96x the two whole oneDNN GEMMs (2-core Zen
      // 4, M2048 d1024 ff4096, alternating calls; row blocks of 128-512 and hidden
      // blocks of 512-2048 all within noise of it).
      if (gemm16_backend(x.scalar_type()) == Gemm16::kOneDnn) {
        // Detached: parallel_for workers do not inherit the autograd exclusion above.
        const at::Tensor b1d = b1_.has_value() && b1_->defined() ? b1_->detach().contiguous() : at::Tensor();
        const at::Tensor b2d = b2_.has_value() && b2_->defined() ? b2_->detach().contiguous() : at::Tensor();
        fused_mlp_fwd_kernel_16bit<scalar_t>(s, x.view({s.rows, s.in_features}), w1, b1, b1d, w2, b2, b2d,
                                             save_pre ? pre.mutable_data_ptr<scalar_t>() : nullptr, out, approx);
        return;
      }
    }
    fused_mlp_fwd_kernel<scalar_t>(s, x.const_data_ptr<scalar_t>(), w1.const_data_ptr<scalar_t>(),
                                   b1.defined() ? b1.const_data_ptr<acc_t>() : nullptr, w2.const_data_ptr<scalar_t>(),
                                   b2.defined() ? b2.const_data_ptr<acc_t>() : nullptr,
                                   save_pre ? pre.mutable_data_ptr<scalar_t>() : nullptr,
                                   out.mutable_data_ptr<scalar_t>(), approx);
  });
  return {out, pre};
}

// 1. dpre = (grad_out W2) * gelu'(pre) by (row block, hidden block) tiles; gb1 and
//    gb2 partial sums per row block. With dh_in_dpre, dpre already holds grad_out W2
//    (the oneDNN backend) and the tiles only apply gelu'.
template <typename scalar_t>
void mlp_dpre_and_bias_grads(const MlpShape& s, const scalar_t* go, const scalar_t* w2, const scalar_t* pre,
                             scalar_t* dpre, scalar_t* gb1, scalar_t* gb2, GeluApprox approx, bool dh_in_dpre) {
  using acc_t = acc_type<scalar_t>;
  const int64_t m = s.rows, f = s.hidden, n = s.out_features;
  const acc_t* no_bias = nullptr;
  const int64_t mb = balanced_block(m, kBwdRows);
  const int64_t fb = balanced_block(f, kHidden);
  const int64_t tiles_m = ceil_div(m, mb), tiles_f = ceil_div(f, fb);
  // At least one task per row block even without hidden units (d_ff = 0): the
  // first task of each row block also sums gb2, which does not depend on f.
  const int64_t tasks_f = std::max<int64_t>(tiles_f, 1);
  std::vector<double> part1(static_cast<size_t>(tiles_m * f), 0.0);
  std::vector<double> part2(static_cast<size_t>(tiles_m * n), 0.0);
  // W2 for dh = grad_out W2, packed once for all tiles where fp32 runs on f32_dot (blas.h).
  const SharedB<scalar_t> w2s = share_b(false, w2, f, dh_in_dpre ? 0 : n, f);
  at::parallel_for(0, tiles_m * tasks_f, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(is_16bit<scalar_t> ? static_cast<size_t>(mb * fb) : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t tm = t / tasks_f, tf = t % tasks_f;
      const int64_t r0 = tm * mb, f0 = tf * fb;
      const int64_t rows = std::min(mb, m - r0), fc = std::min(fb, f - f0);
      double* p1 = part1.data() + tm * f + f0;
      if (tf == 0) {
        sum_rows_blocked<acc_t>(0, rows, n, part2.data() + tm * n,
                                [&](int64_t i, acc_t* acc) { add_rows(go + (r0 + i) * n, 1, n, n, acc); });
      }
      if (tf >= tiles_f) continue;
      if (!dh_in_dpre) {
        if constexpr (is_16bit<scalar_t>) {
          // dh in an fp32 tile, rounded only once, as dpre.
          gemm_rm_shared(false, rows, fc, n, 1.0f, go + r0 * n, n, w2s, 0, f0, 0.0f, scratch.data(), fc);
          sum_rows_blocked<acc_t>(0, rows, fc, p1, [&](int64_t i, acc_t* acc) {
            const int64_t off = (r0 + i) * f + f0;
            gelu_bwd(scratch.data() + i * fc, pre + off, no_bias, dpre + off, acc, fc, approx);
          });
          continue;
        } else {
          gemm_rm_shared(false, rows, fc, n, scalar_t(1), go + r0 * n, n, w2s, 0, f0, scalar_t(0), dpre + r0 * f + f0,
                         f);
        }
      }
      // dh is in dpre: apply gelu' in place.
      sum_rows_blocked<acc_t>(0, rows, fc, p1, [&](int64_t i, acc_t* acc) {
        const int64_t off = (r0 + i) * f + f0;
        gelu_bwd(dpre + off, pre + off, no_bias, dpre + off, acc, fc, approx);
      });
    }
  });
  reduce_partials(part1.data(), tiles_m, f, gb1);
  reduce_partials(part2.data(), tiles_m, n, gb2);
}

// 2. gw2 = grad_out^T gelu(pre): one task per block of hidden units, h recomputed
//    per (row block, hidden block) tile; accumulation over row blocks in order.
template <typename scalar_t>
void mlp_grad_w2_tiles(const MlpShape& s, const scalar_t* go, const scalar_t* pre, scalar_t* gw2, GeluApprox approx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t m = s.rows, f = s.hidden, n = s.out_features;
  const acc_t* no_bias = nullptr;
  const int64_t threads = at::get_num_threads();
  const int64_t fb = balanced_block(f, std::max<int64_t>(16, std::min(kHidden, ceil_div(f, threads))));
  const int64_t mb = balanced_block(m, kGw2Rows);
  at::parallel_for(0, ceil_div(f, fb), 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> h(static_cast<size_t>(mb * fb));
    std::vector<float> acc16(is_16bit<scalar_t> ? static_cast<size_t>(n * fb) : 0);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t f0 = blk * fb, fc = std::min(fb, f - f0);
      auto* acc = [&] {
        if constexpr (is_16bit<scalar_t>) return acc16.data();
        else return gw2 + f0;
      }();
      const int64_t lda = is_16bit<scalar_t> ? fc : f;
      if (m == 0) {
        for (int64_t i = 0; i < n; ++i) std::fill(acc + i * lda, acc + i * lda + fc, 0);
      }
      for (int64_t r0 = 0; r0 < m; r0 += mb) {
        const int64_t rows = std::min(mb, m - r0);
        for (int64_t i = 0; i < rows; ++i) {
          gelu_fwd(pre + (r0 + i) * f + f0, no_bias, static_cast<scalar_t*>(nullptr), h.data() + i * fc, fc, approx);
        }
        gemm_rm(true, false, n, fc, rows, acc_t(1), go + r0 * n, n, h.data(), fc, acc_t(r0 == 0 ? 0 : 1), acc, lda);
      }
      if constexpr (is_16bit<scalar_t>) {
        for (int64_t i = 0; i < n; ++i) store_row(acc16.data() + i * fc, gw2 + i * f + f0, fc);
      }
    }
  });
}

// h = gelu(pre) in full ([rows, hidden], pre's dtype), rows in parallel.
template <typename scalar_t>
at::Tensor gelu_of(const MlpShape& s, const at::Tensor& pre, GeluApprox approx) {
  using acc_t = acc_type<scalar_t>;
  at::Tensor h = warm::empty({s.rows, s.hidden}, pre.options());
  const scalar_t* in = pre.const_data_ptr<scalar_t>();
  scalar_t* out = h.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, s.rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      gelu_fwd(in + r * s.hidden, static_cast<const acc_t*>(nullptr), static_cast<scalar_t*>(nullptr),
               out + r * s.hidden, s.hidden, approx);
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_mlp_bwd_cpu(
    const at::Tensor& grad_out_, const at::Tensor& x_, const at::Tensor& w1_, const at::Tensor& w2_,
    const at::Tensor& pre_, c10::string_view approximate) {
  // ATen calls below work on plain buffers: keep them out of autograd.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const LinearShape s1 = check_linear_args(x_, "x", w1_, "w1", c10::nullopt, "b1");
  check_mlp_second_layer(x_, w2_, c10::nullopt, s1.out_features);
  const MlpShape s{s1.rows, s1.in_features, s1.out_features, w2_.size(0)};
  check_rows_like(grad_out_, "grad_out", x_, "x", s.out_features);
  check_rows_like(pre_, "pre", x_, "x", s.hidden);
  const GeluApprox approx = parse_gelu_approximate(approximate);
  const at::Tensor x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  const at::Tensor grad_out = grad_out_.contiguous(), pre = pre_.contiguous();

  at::Tensor gx = empty_output_like(x);
  at::Tensor gw1 = empty_output_like(w1);
  at::Tensor gb1 = empty_output({s.hidden}, w1.options());
  at::Tensor gw2 = empty_output_like(w2);
  at::Tensor gb2 = empty_output({s.out_features}, w2.options());
  at::Tensor dpre = warm::empty({s.rows, s.hidden}, x.options());
  const at::Tensor go2d = grad_out.view({s.rows, s.out_features});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_mlp_bwd", [&] {
    const bool onednn = gemms_on_onednn<scalar_t>();
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* pre_p = pre.const_data_ptr<scalar_t>();
    if (onednn) mm_out_cpu(dpre, go2d, w2);
    mlp_dpre_and_bias_grads<scalar_t>(s, go, w2.const_data_ptr<scalar_t>(), pre_p, dpre.mutable_data_ptr<scalar_t>(),
                                      gb1.mutable_data_ptr<scalar_t>(), gb2.mutable_data_ptr<scalar_t>(), approx,
                                      onednn);
    if (onednn) {
      mm_out_cpu(gw2, go2d.t(), gelu_of<scalar_t>(s, pre, approx));
    } else {
      mlp_grad_w2_tiles<scalar_t>(s, go, pre_p, gw2.mutable_data_ptr<scalar_t>(), approx);
    }
  });
  const at::Tensor x2d = x.view({s.rows, s.in_features});
  mm_out_cpu(gw1, dpre.t(), x2d);
  at::Tensor gx2d = gx.view({s.rows, s.in_features});
  mm_out_cpu(gx2d, dpre, w1);
  return {gx, gw1, gb1, gw2, gb2};
}

}  // namespace

TORCH_LIBRARY_IMPL(tfkernels, CPU, m) {
  m.impl("fused_mlp", &fused_mlp_cpu);
  m.impl("fused_mlp_bwd", &fused_mlp_bwd_cpu);
}

}  // namespace tfkernels::cpu
