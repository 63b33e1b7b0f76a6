// The CPU linear_gelu forward, shared with fused_mlp's bf16 forward on bf16_dot's tiles.
//
// The output [M, N] is cut into tiles of kRowTile x kColTile; each task
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
#pragma once

#include <ATen/Parallel.h>

#include <vector>

#include "cpu/blas.h"
#include "cpu/gelu_rows.h"
#include "cpu/gemm16.h"

namespace tfkernels::cpu {

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

// out = gelu(x W^T + bias) for x [m, k], W [n, k]; pre (when not null) = x W^T + bias.
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

}  // namespace tfkernels::cpu
