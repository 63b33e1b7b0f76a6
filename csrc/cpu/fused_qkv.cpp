// fused_qkv / fused_qkv_bwd on the CPU.
//
// Forward: for each (batch, block of rows, group of heads) task, one
// single-threaded GEMM x[b, rows] (Sc x E) @ W_heads^T (E x heads*D) into an
// L2-sized scratch started from the bias, whose head columns are then copied to
// the head layout (q [B,H,S,D], k/v [B,Hkv,S,D]): no [B,S,(H+2Hkv)D]
// intermediate. 16-bit types on the oneDNN backend (gemm16.h) instead run one
// oneDNN GEMM per block of rows over all heads, bias fused, into a scratch in the
// dtype that is then copied to the layout, except bf16 where the first structure runs
// on bf16_dot's tiles with W^T packed once (gemm16.h's forward_on_bf16_tiles; B1
// S2048 E1024 H16, alternating calls on a 2-core Zen 4: 35.5 ms against 39.0 on
// oneDNN, eager 42.4), each head's rows written straight to the layout with the bias
// added and the rounding done in registers (no fp32 scratch: 3% faster than through
// it); fp32 on f32_dot's tiles likewise accumulates straight into the layout. Both:
// accumulation in fp32 (fp64 for fp64), one rounding. fp32 and fp64 on MKL instead run
// whole GEMMs, on every thread, over chunks of rows into warm scratch that a parallel
// pass copies to the layout (fused_qkv_fwd_whole says why).
// BLAS tasks are ordered (batch, row block, head group) so a thread's consecutive
// GEMMs reuse the same rows of x from cache.
//
// Backward:
//   dx[b, rows] = sum over heads of grad_head[b, rows] (Sc x D) @ W_head (D x E),
//     read in the head layout, one task per (batch, row block) whose Sc x E
//     accumulator (fp32 for 16-bit types) stays in cache while the heads add up;
//   dW_head[:, cols] = sum_b grad_head[b]^T (D x S) @ x[b][:, cols], one task per
//     (head, block of E columns); db_head = column sums, in the same task.
// 16-bit types on the oneDNN backend, and fp32, instead gather the head gradients
// into one [B*S, (H+2Hkv)D] matrix (one copy) and run the two GEMMs of a linear
// layer's backward, dx = G W and dW = G^T x, on mm_out_cpu (gemm16.h), each rounded
// once as eager's are: per-head GEMMs with K or N = D are where oneDNN is slowest,
// MKL's bf16 GEMM runs at half oneDNN's rate on a CPU with AVX512-BF16, and with
// fp32 the per-head tasks repack x for every head (dW at ~150 GFLOP/s against ~185
// for the whole GEMM on a 2-core Zen 4; on MKL on a 2-core Zen 3, B1 S2048 E1024
// H16 fwd+bwd 220.7 ms gathered against 229.8 per head, eager 218.9).
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

// Whether the bf16 forward runs head by head on W^T packed once (fused_qkv_fwd_blas's
// tile branch) on bf16_dot's AVX512-BF16 tiles (see above) rather than on oneDNN. Not
// on AMX: there oneDNN's column blocks ran 2-9% faster than our AMX tiles head by
// head (B1 S2048 E1024 H16 D64, 2 Xeon cores: 5.06-5.15 ms against 5.5-5.7 in a row;
// bench/run.py 2.16-2.31 against 1.90-2.21 TFLOP/s).
template <typename scalar_t>
bool forward_on_packed_bf16(const QkvShape& s) {
  return forward_on_bf16_tiles<scalar_t>(s.embed);
}

constexpr int64_t kFwdRows = 256;        // rows of x per forward GEMM of the BLAS path
constexpr int64_t kFwdCols = 256;        // output columns (heads x D) per forward GEMM
constexpr int64_t kFwdOneDnnRows = 2048;  // rows of x per forward GEMM on oneDNN, at most
constexpr int64_t kFwdWholeBytes = int64_t{64} << 20;  // scratch of a whole-GEMM chunk of rows, at most
constexpr int64_t kDxTileBytes = 1 << 20;  // dx accumulator per backward task
constexpr int64_t kDwCols = 1024;        // columns of E per weight-gradient task

// Pointers to head j of the q/k/v tensors at batch b (heads ordered q, k, v).
template <typename T>
struct HeadLayout {
  T* q;
  T* k;
  T* v;
  int64_t heads, kv_heads, seqlen, head_dim;
  T* at(int64_t b, int64_t j) const {
    const int64_t block = seqlen * head_dim;
    if (j < heads) return q + (b * heads + j) * block;
    j -= heads;
    if (j < kv_heads) return k + (b * kv_heads + j) * block;
    return v + (b * kv_heads + (j - kv_heads)) * block;
  }
  // Flat token rows [r0, r0 + rows) (row b * seqlen + s) of heads [j0, j0 + heads),
  // from a row-major block in the dtype: row i at src + i * ld, head j0 + jj's D
  // values from column jj * D.
  void store_rows(const T* src, int64_t ld, int64_t r0, int64_t rows, int64_t j0, int64_t heads) const {
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t b = (r0 + i) / seqlen, pos = (r0 + i) % seqlen;
      const T* row = src + i * ld;
      for (int64_t jj = 0; jj < heads; ++jj) {
        std::copy(row + jj * head_dim, row + (jj + 1) * head_dim, at(b, j0 + jj) + pos * head_dim);
      }
    }
  }
};

// Tile path (fp32 on f32_dot's packed tiles, bf16 on bf16_dot's, 16-bit on the BLAS
// backend; fp32 on MKL and fp64 take fused_qkv_fwd_whole): a task computes a block of
// rows for a group of consecutive heads in one GEMM (their weight rows are
// contiguous), N = heads x D of about kFwdCols, into a scratch in the accumulation
// type started from the bias, then copies each head's columns to its own rows of
// the head layout (rounding once for 16-bit types). One GEMM per head (N = D = 64)
// ran MKL at ~90% of the single big GEMM's rate.
template <typename scalar_t>
void fused_qkv_fwd_blas(const QkvShape& s, const scalar_t* x, const scalar_t* w, const acc_type<scalar_t>* bias,
                        const HeadLayout<scalar_t>& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t groups = s.heads + 2 * s.kv_heads, e = s.embed, d = s.head_dim, seq = s.seqlen;
  const int64_t sb = balanced_block(seq, kFwdRows);
  const int64_t blocks = ceil_div(seq, sb);
  const int64_t hg = std::max<int64_t>(1, std::min(groups, kFwdCols / std::max<int64_t>(d, 1)));
  const int64_t head_blocks = ceil_div(groups, hg);
  // W^T, packed once for all tasks where the GEMMs run on our kernels (blas.h).
  const SharedB<scalar_t> wt = share_b(true, w, e, e, groups * d, forward_on_packed_bf16<scalar_t>(s));
  at::parallel_for(0, s.batch * blocks * head_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(sb * hg * d));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j0 = (t % head_blocks) * hg, blk = (t / head_blocks) % blocks, b = t / (head_blocks * blocks);
      const int64_t s0 = blk * sb, rows = std::min(sb, seq - s0), heads = std::min(hg, groups - j0);
      const int64_t n = heads * d;
      if (!wt.packed.empty()) {
        // Our tiles (fp32, or bf16 with the bias and the rounding in registers) write
        // each head's rows straight to the layout: no scratch, no copy.
        for (int64_t jj = 0; jj < heads; ++jj) {
          const int64_t j = j0 + jj;
          scalar_t* dst = out.at(b, j) + s0 * d;
          const scalar_t* xb = x + (b * seq + s0) * e;
          if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
            bf16dot::gemm_prepacked_rounded(rows, d, e / 2, xb, e, 2, wt.packed, 0, j * d,
                                            bias != nullptr ? bias + j * d : nullptr, dst, d);
          } else if constexpr (std::is_same_v<scalar_t, float>) {
            if (bias != nullptr) {
              for (int64_t i = 0; i < rows; ++i) std::copy(bias + j * d, bias + (j + 1) * d, dst + i * d);
            }
            gemm_rm_shared<float, float>(false, rows, d, e, 1.0f, xb, e, wt, 0, j * d, bias != nullptr ? 1.0f : 0.0f,
                                         dst, d);
          }
        }
        continue;
      }
      if (bias != nullptr) {
        for (int64_t i = 0; i < rows; ++i) std::copy(bias + j0 * d, bias + j0 * d + n, acc.data() + i * n);
      }
      gemm_rm_shared<scalar_t, acc_t>(false, rows, n, e, acc_t(1), x + (b * seq + s0) * e, e, wt, 0, j0 * d,
                                      acc_t(bias != nullptr ? 1 : 0), acc.data(), n);
      for (int64_t jj = 0; jj < heads; ++jj) {
        scalar_t* dst = out.at(b, j0 + jj) + s0 * d;
        for (int64_t i = 0; i < rows; ++i) store_row(acc.data() + i * n + jj * d, dst + i * d, d);
      }
    }
  });
}

// Whether the forward runs fused_qkv_fwd_whole: fp64, and fp32 where its GEMMs go to
// MKL (not f32_dot's packed tiles: f32dot::whole_gemms_available).
template <typename scalar_t>
bool forward_as_whole_gemms() {
  return std::is_same_v<scalar_t, double> || (std::is_same_v<scalar_t, float> && !f32dot::whole_gemms_available());
}

// MKL path (fp32 and fp64 on MKL): one GEMM x W^T + bias on every thread per chunk of
// rows (all of them unless the scratch would pass kFwdWholeBytes), into warm scratch,
// then a parallel copy of each head's columns to its rows of the layout. MKL packs
// both operands on every call, so the per-task tiles of fused_qkv_fwd_blas packed x's
// rows once per head group and W's once per row block: B1 S2048 E1024 H16 fp32 on 2
// AMX Xeon cores, 22 interleaved calls: 36.1 ms in 256 x 256 tiles, 32.8 whole with
// the copy (2 ms of it), eager 33.2, F.linear alone 30.9; the same sums either way
// (no split of the reduction), bit for bit here.
template <typename scalar_t>
void fused_qkv_fwd_whole(const QkvShape& s, const scalar_t* x, const scalar_t* w, const at::Tensor& bias,
                         const HeadLayout<scalar_t>& out) {
  const int64_t groups = s.heads + 2 * s.kv_heads, e = s.embed, d = s.head_dim, seq = s.seqlen;
  const int64_t m = s.batch * seq, n = groups * d;
  const int64_t chunk = std::clamp<int64_t>(kFwdWholeBytes / static_cast<int64_t>(sizeof(scalar_t) * n), 1, m);
  at::Tensor y = warm::empty({chunk, n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  for (int64_t r0 = 0; r0 < m; r0 += chunk) {
    const int64_t rows = std::min(chunk, m - r0);
    linear_tile_aten(x + r0 * e, rows, e, e, w, n, e, bias, yp, n);  // outside parallel_for: every thread
    // Tasks of (head, block of rows): each writes one contiguous block of the layout.
    const int64_t row_blocks = ceil_div(rows, kFwdRows);
    at::parallel_for(0, groups * row_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t j = t / row_blocks, i0 = (t % row_blocks) * kFwdRows, i1 = std::min(rows, i0 + kFwdRows);
        out.store_rows(yp + i0 * n + j * d, n, r0 + i0, i1 - i0, j, 1);
      }
    });
  }
}

// oneDNN path (16-bit types where the CPU has native 16-bit dot products): a task is
// one oneDNN GEMM of a group of consecutive heads (N = heads x D of about kFwdCols,
// bias fused, fp32 accumulation, one rounding, as eager's F.linear) over a tall block
// of rows, into a scratch in the dtype whose head columns are then copied to the head
// layout. oneDNN packs its B (the group's weight rows) on every call, so tall blocks
// amortise it: 256-row blocks over all heads ran at 1.1 TFLOP/s per AMX Xeon core,
// 2048 x 256 at 1.45 (2048 x 3072, the whole GEMM, at 1.4).
template <typename scalar_t>
void fused_qkv_fwd_onednn(const QkvShape& s, const scalar_t* x, const scalar_t* w, const HeadLayout<scalar_t>& out,
                          const at::Tensor& bias16) {
  const int64_t groups = s.heads + 2 * s.kv_heads, e = s.embed, d = s.head_dim, seq = s.seqlen;
  const int64_t m = s.batch * seq;
  const int64_t hg = std::max<int64_t>(1, std::min(groups, kFwdCols / std::max<int64_t>(d, 1)));
  const int64_t head_blocks = ceil_div(groups, hg);
  // Rows split further only where the head groups alone leave threads idle.
  const int64_t row_blocks =
      std::max(ceil_div(m, kFwdOneDnnRows), std::min(m, ceil_div(at::get_num_threads(), head_blocks)));
  const int64_t mb = balanced_block(m, ceil_div(m, row_blocks)), row_tasks = ceil_div(m, mb);
  at::parallel_for(0, row_tasks * head_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scratch(static_cast<size_t>(mb * hg * d));
    for (int64_t t = begin; t < end; ++t) {
      // Row blocks inner: consecutive tasks of a thread share the group's weight rows.
      const int64_t j0 = (t / row_tasks) * hg, r0 = (t % row_tasks) * mb;
      const int64_t rows = std::min(mb, m - r0), heads = std::min(hg, groups - j0), n = heads * d;
      const at::Tensor bias_cols = bias16.defined() ? bias16.narrow(0, j0 * d, n) : at::Tensor();
      linear_tile_aten(x + r0 * e, rows, e, e, w + j0 * d * e, n, e, bias_cols, scratch.data(), n);
      out.store_rows(scratch.data(), n, r0, rows, j0, heads);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_qkv_cpu(const at::Tensor& x_, const at::Tensor& weight_,
                                                             const c10::optional<at::Tensor>& bias_,
                                                             int64_t num_heads, int64_t num_kv_heads) {
  // ATen calls below work on plain buffers: keep them out of autograd.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const QkvShape s = check_qkv_args(x_, weight_, bias_, num_heads, num_kv_heads);
  const at::Tensor x = x_.contiguous(), w = weight_.contiguous();
  at::Tensor q = empty_output({s.batch, s.heads, s.seqlen, s.head_dim}, x.options());
  at::Tensor k = empty_output({s.batch, s.kv_heads, s.seqlen, s.head_dim}, x.options());
  at::Tensor v = empty_output({s.batch, s.kv_heads, s.seqlen, s.head_dim}, x.options());
  if (s.batch == 0 || s.seqlen == 0) return {q, k, v};
  const at::Tensor bias = bias_in_acc_type(bias_, x.scalar_type());
  const bool reduced = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  // Detached: parallel_for workers do not inherit the autograd exclusion above.
  const at::Tensor bias16 = reduced && bias.defined() ? bias_->detach().contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_qkv", [&] {
    using acc_t = acc_type<scalar_t>;
    const HeadLayout<scalar_t> out{q.mutable_data_ptr<scalar_t>(), k.mutable_data_ptr<scalar_t>(),
                                   v.mutable_data_ptr<scalar_t>(), s.heads, s.kv_heads, s.seqlen, s.head_dim};
    if (forward_as_whole_gemms<scalar_t>()) {
      fused_qkv_fwd_whole<scalar_t>(s, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                    bias.defined() ? bias.detach() : at::Tensor(), out);
    } else if (gemms_on_onednn<scalar_t>() && !forward_on_packed_bf16<scalar_t>(s)) {
      fused_qkv_fwd_onednn<scalar_t>(s, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), out, bias16);
    } else {
      fused_qkv_fwd_blas<scalar_t>(s, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                   bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr, out);
    }
  });
  return {q, k, v};
}

// db of head j: its gradient's column sums over every (batch, row), in double, in a
// fixed order; `bsum` is D doubles of scratch.
template <typename scalar_t>
void head_bias_grad(const QkvShape& s, const HeadLayout<const scalar_t>& grad, int64_t j, double* bsum,
                    scalar_t* gb) {
  using acc_t = acc_type<scalar_t>;
  const int64_t d = s.head_dim;
  std::fill(bsum, bsum + d, 0.0);
  for (int64_t b = 0; b < s.batch; ++b) {
    const scalar_t* g = grad.at(b, j);
    sum_rows_blocked<acc_t>(0, s.seqlen, d, bsum, [&](int64_t r, acc_t* acc) { add_rows(g + r * d, 1, d, d, acc); });
  }
  store_row(bsum, gb + j * d, d);
}

template <typename scalar_t>
void fused_qkv_bwd_kernel(const QkvShape& s, const HeadLayout<const scalar_t>& grad, const scalar_t* x,
                          const scalar_t* w, scalar_t* gx, scalar_t* gw, scalar_t* gb) {
  using acc_t = acc_type<scalar_t>;
  const int64_t groups = s.heads + 2 * s.kv_heads, e = s.embed, d = s.head_dim, seq = s.seqlen;

  // dx: per (batch, row block), accumulate every head into the block.
  {
    const int64_t max_rows = std::max<int64_t>(16, kDxTileBytes / static_cast<int64_t>(sizeof(float) * std::max<int64_t>(e, 1)));
    const int64_t sb = balanced_block(seq, max_rows);
    const int64_t blocks = ceil_div(seq, sb);
    at::parallel_for(0, s.batch * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(is_16bit<scalar_t> ? static_cast<size_t>(sb * e) : 0);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / blocks, s0 = (t % blocks) * sb, rows = std::min(sb, seq - s0);
        auto* acc = [&] {
          if constexpr (is_16bit<scalar_t>) return scratch.data();
          else return gx + (b * seq + s0) * e;
        }();
        for (int64_t j = 0; j < groups; ++j) {
          gemm_rm(false, false, rows, e, d, acc_t(1), grad.at(b, j) + s0 * d, d, w + j * d * e, e,
                  acc_t(j == 0 ? 0 : 1), acc, e);
        }
        if constexpr (is_16bit<scalar_t>) {
          for (int64_t i = 0; i < rows; ++i) store_row(scratch.data() + i * e, gx + (b * seq + s0 + i) * e, e);
        }
      }
    });
  }

  // dW, db: per (head, block of E columns), sum over the batch in order.
  {
    const int64_t eb = balanced_block(e, kDwCols);
    const int64_t col_blocks = ceil_div(e, eb);
    at::parallel_for(0, groups * col_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(is_16bit<scalar_t> ? static_cast<size_t>(d * eb) : 0);
      std::vector<double> bsum(static_cast<size_t>(d));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t j = t / col_blocks, c0 = (t % col_blocks) * eb, cols = std::min(eb, e - c0);
        auto* acc = [&] {
          if constexpr (is_16bit<scalar_t>) return scratch.data();
          else return gw + j * d * e + c0;
        }();
        const int64_t ldc = is_16bit<scalar_t> ? cols : e;
        if (s.batch == 0 || seq == 0) {
          for (int64_t i = 0; i < d; ++i) std::fill(acc + i * ldc, acc + i * ldc + cols, 0);
        }
        for (int64_t b = 0; b < s.batch; ++b) {
          gemm_rm(true, false, d, cols, seq, acc_t(1), grad.at(b, j), d, x + b * seq * e + c0, e,
                  acc_t(b == 0 ? 0 : 1), acc, ldc);
        }
        if constexpr (is_16bit<scalar_t>) {
          for (int64_t i = 0; i < d; ++i) store_row(scratch.data() + i * cols, gw + (j * d + i) * e + c0, cols);
        }
        if (c0 == 0) head_bias_grad(s, grad, j, bsum.data(), gb);
      }
    });
  }
}

// The backward as one linear layer's (see the top of the file).
template <typename scalar_t>
void fused_qkv_bwd_gathered(const QkvShape& s, const HeadLayout<const scalar_t>& grad, const at::Tensor& gq,
                          const at::Tensor& gk, const at::Tensor& gv, const at::Tensor& x, const at::Tensor& w,
                          at::Tensor& gx, at::Tensor& gw, scalar_t* gb) {
  const int64_t groups = s.heads + 2 * s.kv_heads, d = s.head_dim;
  // [B, S, heads, D]: row b * S + s holds every head's gradient for that token, in W's row order.
  at::Tensor g = warm::empty({s.batch, s.seqlen, groups, d}, x.options());
  g.narrow(2, 0, s.heads).copy_(gq.permute({0, 2, 1, 3}));
  g.narrow(2, s.heads, s.kv_heads).copy_(gk.permute({0, 2, 1, 3}));
  g.narrow(2, s.heads + s.kv_heads, s.kv_heads).copy_(gv.permute({0, 2, 1, 3}));
  const at::Tensor g2d = g.view({s.batch * s.seqlen, groups * d});
  at::Tensor gx2d = gx.view({s.batch * s.seqlen, s.embed});
  mm_out_cpu(gx2d, g2d, w);
  mm_out_cpu(gw, g2d.t(), x.view({s.batch * s.seqlen, s.embed}));
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> bsum(static_cast<size_t>(d));
    for (int64_t j = begin; j < end; ++j) head_bias_grad(s, grad, j, bsum.data(), gb);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_qkv_bwd_cpu(const at::Tensor& grad_q_, const at::Tensor& grad_k_,
                                                                 const at::Tensor& grad_v_, const at::Tensor& x_,
                                                                 const at::Tensor& weight_) {
  // ATen calls below work on plain buffers: keep them out of autograd.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  check_rank(grad_q_, "grad_q", 4, "[B, H, S, D]");
  check_rank(grad_k_, "grad_k", 4, "[B, Hkv, S, D]");
  check_rank(grad_v_, "grad_v", 4, "[B, Hkv, S, D]");
  const QkvShape s = check_qkv_args(x_, weight_, c10::nullopt, grad_q_.size(1), grad_k_.size(1));
  check_qkv_grad_args(s, x_, grad_q_, grad_k_, grad_v_);
  const at::Tensor x = x_.contiguous(), w = weight_.contiguous();
  const at::Tensor gq = grad_q_.contiguous(), gk = grad_k_.contiguous(), gv = grad_v_.contiguous();
  at::Tensor grad_x = empty_output_like(x);
  at::Tensor grad_w = empty_output_like(w);
  at::Tensor grad_b = empty_output({w.size(0)}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_qkv_bwd", [&] {
    const HeadLayout<const scalar_t> grad{gq.const_data_ptr<scalar_t>(), gk.const_data_ptr<scalar_t>(),
                                          gv.const_data_ptr<scalar_t>(), s.heads, s.kv_heads, s.seqlen, s.head_dim};
    if (gemms_on_onednn<scalar_t>() || std::is_same_v<scalar_t, float>) {
      fused_qkv_bwd_gathered<scalar_t>(s, grad, gq, gk, gv, x, w, grad_x, grad_w, grad_b.mutable_data_ptr<scalar_t>());
    } else {
      fused_qkv_bwd_kernel<scalar_t>(s, grad, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                     grad_x.mutable_data_ptr<scalar_t>(), grad_w.mutable_data_ptr<scalar_t>(),
                                     grad_b.mutable_data_ptr<scalar_t>());
    }
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(tfkernels, CPU, m) {
  m.impl("fused_qkv", &fused_qkv_cpu);
  m.impl("fused_qkv_bwd", &fused_qkv_bwd_cpu);
}

}  // namespace tfkernels::cpu
