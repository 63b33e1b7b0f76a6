// CPU flash attention, forward and backward (FlashAttention-2 tiling).
//
// Forward: one task per (batch, head, query block) under at::parallel_for. A task
// keeps its query block's output accumulator, running max m and running sum l,
// and walks the key/value tiles: S = Q K^T (GEMM into a bq x bk tile), online
// softmax on the tile (vectorised exp2), acc = alpha * acc + P V (GEMM). Each row
// sees one band of keys (flash_attention_band.h: seqlens_k, causal, window); the
// tiles of a block start at the first key its first row sees and stop after the
// last key its last row sees, so a sliding window costs O(S * W), not O(S^2), and
// within a tile each row only exponentiates its band. Nothing of size Sq x Sk is
// ever allocated. lse = ln(sum exp) is saved in float32.
//
// Variants (README, Semantics): the softcap maps the tile's scores through
// c * tanh(s / c) before the softmax; a sink starts a row's running max and sum
// as if it were one more key with no value; dropout zeroes P after the row sum
// has taken it (lse is pre-dropout) with decisions from csrc/dropout_rng.h, which
// the backward regenerates instead of storing.
//
// Backward: recomputes P from the saved lse. One task per (batch, query head, key
// chunk); a task walks its key blocks (outer) and the query blocks that see them
// (inner) and accumulates dK, dV of its key rows and dQ of its head (FA2 order).
// Tasks never write the same memory: dK/dV are per query head (summed over the
// GQA group afterwards) and each key chunk has its own dQ partial (summed over
// chunks afterwards), both reductions in a fixed order, so the result is bitwise
// deterministic; so is d sink (a fixed-order sum over rows). Key chunks exist only
// to keep both cores busy when B * H is small (e.g. B = H = 1); their number
// depends on the shape, not on the threads.
//
// Compute: float for float/bf16/half inputs, double for double. Inputs are read in
// place through their strides (only the last dim must be contiguous); 16-bit
// inputs are widened tile by tile inside the tasks (a separate conversion pass
// costs an extra parallel region and memory traffic), outputs rounded once. GEMMs
// go to BLAS (blas.h); the exp runs in flash_attention_softmax.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "alloc.h"
#include "args.h"
#include "cpu/blas.h"
#include "cpu/flash_attention_band.h"
#include "cpu/flash_attention_softmax.h"
#include "dropout_rng.h"

namespace tfkernels::cpu {
namespace {

using fa::SoftmaxDomain;


// Block sizes. Forward: the query block is the GEMM's M for both products, the key
// block their N (S = Q K^T) and K (P V). Larger blocks amortise the per-tile
// softmax bookkeeping and make MKL faster; bq * bk floats stay in L2 (512 KiB).
// Measured on 2 AVX-512 cores (B1 H8 S2048 D64, float32, against SDPA in the same
// process): bq in {64, 128, 256, 512} x bk in {256, 512, 1024} all landed within
// 0.93-1.02x of SDPA, i.e. within the noise of a shared machine; 256 x 512 is also
// SDPA's own split. Backward: 128 x 256 was ahead of 64/128/256 x 64/128 by ~5-10%
// (same noise caveat).
struct FwdBlocks {
  int64_t bq, bk;
};
FwdBlocks fwd_blocks(int64_t seqlen_q, int64_t seqlen_k) {
  const int64_t bq = seqlen_q >= 768 ? 256 : seqlen_q >= 192 ? 64 : 32;
  const int64_t bk = 512;
  return {std::max<int64_t>(1, std::min(bq, seqlen_q)), std::max<int64_t>(1, std::min(bk, seqlen_k))};
}

// Backward: five GEMMs per (query block, key block) tile (see above).
constexpr int64_t kBwdBlockQ = 128;
constexpr int64_t kBwdBlockK = 256;
// Minimum number of backward tasks aimed for when B * H is small (key chunks).
constexpr int64_t kBwdTargetTasks = 8;

// at::parallel_for hands each thread a contiguous range of tasks. Under a causal
// mask the cost of a query block grows with its index (and that of a key chunk
// shrinks), so blocks are visited in the order 0, n-1, 1, n-2, ...: every
// contiguous range then mixes cheap and expensive blocks, also when B * H = 1.
inline int64_t zigzag(int64_t j, int64_t n) { return j % 2 == 0 ? j / 2 : n - 1 - j / 2; }

// The score and probability transforms beyond plain softmax, resolved once per call.
struct Variants {
  double softcap = 0;              // 0 = off
  const float* sinks = nullptr;    // [H] logits, or nullptr
  bool dropout = false;
  dropout::DropoutRng rng{};
  double keep_scale = 1;           // 1 / (1 - p)
};

// The softmax domain's multiplier of a raw score (Q K^T): scale, or 1 after softcap_row
// has already taken the scores into the domain.
template <typename T>
T score_mult(const Variants& var, double scale) {
  return var.softcap > 0 ? T(1) : SoftmaxDomain<T>::score_mult(static_cast<T>(scale));
}

// Softcap on a row's visible raw scores: s <- c tanh(s * scale / c), in the domain.
template <typename T>
void softcap_scores(const Variants& var, double scale, T* s, int64_t n, T* t) {
  fa::softcap_row(s, n, static_cast<T>(scale / var.softcap), SoftmaxDomain<T>::score_mult(static_cast<T>(var.softcap)),
                  t);
}

// Dropout's keep decisions for keys [j, j + n) of row i of slice bh into `keep`
// (scratch of n + 8 bytes); returns where key j's decision is.
inline const uint8_t* keep_of(const Variants& var, int64_t bh, int64_t i, int64_t j, int64_t n, uint8_t* keep) {
  const int64_t g0 = j >> 2, g1 = (j + n + 3) >> 2;
  fa::dropout_keep(keep, var.rng, static_cast<uint32_t>(bh), static_cast<uint32_t>(i), g0, g1 - g0);
  return keep + (j & 3);
}

// A sink in the softmax domain (a NaN or +inf sink gives NaN rows, as the reference).
template <typename T>
T sink_dom(const Variants& var, int64_t h) {
  return var.sinks ? SoftmaxDomain<T>::from_lse(var.sinks[h]) : -std::numeric_limits<T>::infinity();
}

// A [B, H, S, D] tensor read in place: row (b, h, i) starts at p + b*sb + h*sh + i*ss.
template <typename In>
struct View {
  const In* p;
  int64_t sb, sh, ss;
  const In* row(int64_t b, int64_t h, int64_t i) const { return p + b * sb + h * sh + i * ss; }
};

// Rows of a tile in the compute type T: in place when the input already is T (ld =
// the tensor's row stride), else widened into `buf` (ld = D).
template <typename T, typename In>
inline const T* tile_rows(const View<In>& t, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t D, T* buf,
                          int64_t& ld) {
  if constexpr (std::is_same_v<T, In>) {
    ld = t.ss;
    return t.row(b, h, i0);
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const In* src = t.row(b, h, i0 + r);
      T* dst = buf + r * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]);
    }
    ld = D;
    return buf;
  }
}

template <typename OutT, typename T>
inline void store_scaled(OutT* dst, const T* src, int64_t n, T a) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<OutT>(src[j] * a);
}

// Per-thread tile scratch, 64-byte aligned: MKL may pick a different code path
// (and so a different rounding) for differently aligned buffers, and std::vector
// gives whatever alignment malloc returns, which can change from run to run.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) {
    if (n > 0) {
      const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
      p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(p_ != nullptr, "tfkernels: flash attention could not allocate ", bytes, " bytes of scratch");
    }
  }
  ~Scratch() { std::free(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() { return p_; }
  T& operator[](int64_t i) { return p_[i]; }

 private:
  T* p_ = nullptr;
};

template <typename T>
inline void fill_zero(T* p, int64_t n) {
  std::fill(p, p + n, T(0));
}

// Whether every element of a rows x cols block (row stride ld) is finite.
template <typename T>
bool all_finite(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      if (!std::isfinite(p[r * ld + j])) return false;
    }
  }
  return true;
}

// Keys a row cannot see must not reach it, not even as 0 x Inf = NaN. A tile GEMM
// multiplies the zeroed P (or dS) entries of such keys with their values, which
// is exact while those values are finite. When a tile holds hidden pairs and
// non-finite operands, the callers below fall back to one product per row over
// that row's visible keys (rare: only tiles on the edges of the band carry hidden
// pairs, since tiles outside every row's band are skipped).

// ------------------------------------------------------------------------ forward

template <typename T, typename OutT>
void attention_fwd(const AttentionShape& s, double scale, const Band& band, const Variants& var, View<OutT> q,
                   View<OutT> k, View<OutT> v, OutT* out, float* lse) {
  using Dom = SoftmaxDomain<T>;
  const int64_t B = s.batch, H = s.heads, Hkv = s.kv_heads, G = H / Hkv, Sq = s.seqlen_q, Sk = s.seqlen_k,
                D = s.head_dim;
  const auto [bq, bk] = fwd_blocks(Sq, Sk);
  const int64_t nqb = (Sq + bq - 1) / bq;
  const T c = score_mult<T>(var, scale);
  const T keep_scale = static_cast<T>(var.keep_scale);
  const T neg_inf = -std::numeric_limits<T>::infinity();

  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    constexpr bool widen = !std::is_same_v<T, OutT>;
    Scratch<T> sbuf(bq * bk), acc(bq * D), mrow(bq), lrow(bq);
    Scratch<T> qbuf(widen ? bq * D : 0), kbuf(widen ? bk * D : 0), vbuf(widen ? bk * D : 0);
    Scratch<uint8_t> keep(var.dropout ? bk + 8 : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = zigzag(task % nqb, nqb), bh = task / nqb, h = bh % H, b = bh / H, hk = h / G;
      const int64_t i0 = qb * bq, m = std::min(bq, Sq - i0);
      const int64_t len = band.len(b), off = band.offset(len);
      int64_t ldq, ldk, ldv;
      const T* Q = tile_rows<T>(q, b, h, i0, m, D, qbuf.data(), ldq);
      const Span keys = band.keys_of_rows(i0, i0 + m, len, off);

      // A sink is a key of score sink[h] and no value: the running max and sum start from it.
      const T sink = sink_dom<T>(var, h);
      fill_zero(acc.data(), m * D);
      std::fill(mrow.data(), mrow.data() + bq, sink);
      std::fill(lrow.data(), lrow.data() + bq, sink == neg_inf ? T(0) : Dom::exp(sink - sink));
      for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += bk) {
        const int64_t n = std::min(bk, keys.hi - j0);
        T* S = sbuf.data();
        const T* K = tile_rows<T>(k, b, hk, j0, n, D, kbuf.data(), ldk);
        gemm_rm<T>(false, true, m, n, D, T(1), Q, ldq, K, ldk, T(0), S, bk);
        bool hidden_pairs = false;
        for (int64_t r = 0; r < m; ++r) {
          T* row = S + r * bk;
          const Span vis = band.visible(i0 + r, len, off, j0, n);
          const int64_t nv = vis.size();
          hidden_pairs |= nv < n;
          if (nv > 0) {
            T* x = row + vis.lo;
            if (var.softcap > 0) softcap_scores<T>(var, scale, x, nv, nullptr);
            // The max may drop a NaN score; the sum keeps it (exp(NaN) = NaN), so
            // l and with it the row's output and lse become NaN all the same.
            const T m_new = std::max(mrow[r], Dom::max(x, nv, c));
            // While every visible score so far is -inf, exponentiate against 0:
            // exp(-inf - 0) = 0 keeps l = 0, where exp(-inf + inf) would be NaN
            // and poison the later tiles. +inf and NaN maxima stay: they must give NaN.
            const T m_use = m_new == neg_inf ? T(0) : m_new;
            const T alpha = Dom::exp(mrow[r] - m_use);  // 0 on the row's first visible tile (without a sink)
            const T sum = Dom::exp_sum(x, nv, c, m_use);
            lrow[r] = lrow[r] * alpha + sum;
            mrow[r] = m_new;
            if (alpha != T(1)) fa::scale_row(acc.data() + r * D, D, alpha);
            if (var.dropout) fa::apply_keep(x, keep_of(var, bh, i0 + r, j0 + vis.lo, nv, keep.data()), nv, keep_scale);
            fill_zero(row, vis.lo);
            fill_zero(row + vis.hi, n - vis.hi);
          } else {
            fill_zero(row, n);
          }
        }
        const T* V = tile_rows<T>(v, b, hk, j0, n, D, vbuf.data(), ldv);
        if (!hidden_pairs || all_finite(V, n, D, ldv)) {
          gemm_rm<T>(false, false, m, D, n, T(1), S, bk, V, ldv, T(1), acc.data(), D);
        } else {
          for (int64_t r = 0; r < m; ++r) {
            const Span vis = band.visible(i0 + r, len, off, j0, n);
            if (vis.size() > 0)
              gemm_rm<T>(false, false, 1, D, vis.size(), T(1), S + r * bk + vis.lo, bk, V + vis.lo * ldv, ldv, T(1),
                         acc.data() + r * D, D);
          }
        }
      }
      for (int64_t r = 0; r < m; ++r) {
        OutT* dst = out + (bh * Sq + i0 + r) * D;
        if (band.empty_row(i0 + r, len, off)) {  // the row sees no key: only the sink, if any
          std::fill(dst, dst + D, static_cast<OutT>(0));
          lse[bh * Sq + i0 + r] = var.sinks ? var.sinks[h] : -std::numeric_limits<float>::infinity();
        } else {
          // l >= 1 when the scores are finite (the max contributes exp(0) = 1). l is
          // NaN after a NaN or +inf score, and 0 when all visible scores are -inf
          // (and there is no sink): then 0 * (1 / 0) makes the output NaN, and the lse is NaN too.
          store_scaled(dst, acc.data() + r * D, D, T(1) / lrow[r]);
          lse[bh * Sq + i0 + r] =
              lrow[r] > T(0) ? Dom::to_lse(mrow[r], lrow[r]) : std::numeric_limits<float>::quiet_NaN();
        }
      }
    }
  });
}

// ----------------------------------------------------------------------- backward

// The saved lse is float32 (the schema's), too coarse for a float64 backward: P =
// exp(s - lse) would carry its ~1e-7 relative error into every gradient. For
// double, refine it once per row, lse += log(sum_j exp(s_ij - lse) + exp(sink - lse)),
// which costs one extra Q K^T pass on the correctness path only.
template <typename T>
void refine_lse(const AttentionShape& s, double scale, const Band& band, const Variants& var, View<T> q, View<T> k,
                T* lse_dom) {
  using Dom = SoftmaxDomain<T>;
  const int64_t B = s.batch, H = s.heads, G = H / s.kv_heads, Sq = s.seqlen_q, Sk = s.seqlen_k, D = s.head_dim;
  const auto [bq, bk] = fwd_blocks(Sq, Sk);
  const int64_t nqb = (Sq + bq - 1) / bq;
  const T c = score_mult<T>(var, scale);
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sbuf(bq * bk), sums(bq);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nqb, bh = task / nqb, h = bh % H, b = bh / H;
      const int64_t i0 = qb * bq, m = std::min(bq, Sq - i0);
      const int64_t len = band.len(b), off = band.offset(len);
      T* L = lse_dom + bh * Sq + i0;
      const Span keys = band.keys_of_rows(i0, i0 + m, len, off);
      const T sink = sink_dom<T>(var, h);
      for (int64_t r = 0; r < m; ++r)
        sums[r] = sink == -std::numeric_limits<T>::infinity() || std::isinf(L[r]) ? T(0) : Dom::exp(sink - L[r]);
      for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += bk) {
        const int64_t n = std::min(bk, keys.hi - j0);
        gemm_rm<T>(false, true, m, n, D, T(1), q.row(b, h, i0), q.ss, k.row(b, h / G, j0), k.ss, T(0), sbuf.data(),
                   bk);
        for (int64_t r = 0; r < m; ++r) {
          const Span vis = band.visible(i0 + r, len, off, j0, n);
          if (vis.size() == 0 || std::isinf(L[r])) continue;
          T* x = sbuf.data() + r * bk + vis.lo;
          if (var.softcap > 0) softcap_scores<T>(var, scale, x, vis.size(), nullptr);
          sums[r] += Dom::exp_sum(x, vis.size(), c, L[r]);
        }
      }
      for (int64_t r = 0; r < m; ++r)
        if (sums[r] > T(0)) L[r] += std::log(sums[r]);
    }
  });
}

// d sink[h] = -sum over (b, i) of P_sink(b, h, i) * Delta(b, h, i), P_sink = exp(sink[h] - lse):
// in double, in a fixed order.
template <typename T>
void sink_grad(const AttentionShape& s, const Variants& var, const T* lse_dom, const T* delta, float* grad_sinks) {
  using Dom = SoftmaxDomain<T>;
  const int64_t B = s.batch, H = s.heads, Sq = s.seqlen_q;
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      const T sink = sink_dom<T>(var, h);
      double acc = 0;
      if (sink != -std::numeric_limits<T>::infinity()) {
        for (int64_t b = 0; b < B; ++b) {
          const int64_t row0 = (b * H + h) * Sq;
          for (int64_t i = 0; i < Sq; ++i)
            acc -= static_cast<double>(Dom::exp(sink - lse_dom[row0 + i])) * static_cast<double>(delta[row0 + i]);
        }
      }
      grad_sinks[h] = static_cast<float>(acc);
    }
  });
}

template <typename T, typename OutT>
void attention_bwd(const AttentionShape& s, double scale_d, const Band& band, const Variants& var, View<OutT> q,
                   View<OutT> k, View<OutT> v, View<OutT> o, View<OutT> go, const float* lse, const float* glse,
                   OutT* gq, OutT* gk, OutT* gv, float* grad_sinks) {
  using Dom = SoftmaxDomain<T>;
  constexpr bool widen = !std::is_same_v<T, OutT>;
  const int64_t B = s.batch, H = s.heads, Hkv = s.kv_heads, G = H / Hkv, Sq = s.seqlen_q, Sk = s.seqlen_k,
                D = s.head_dim;
  const T c = score_mult<T>(var, scale_d);
  const T scale = static_cast<T>(scale_d);
  const T keep_scale = static_cast<T>(var.keep_scale);
  const int64_t bq = std::max<int64_t>(1, std::min(kBwdBlockQ, Sq));
  const int64_t bk = std::max<int64_t>(1, std::min(kBwdBlockK, Sk));
  const int64_t nkb = (Sk + bk - 1) / bk;
  const int64_t chunks = std::max<int64_t>(1, std::min(nkb, (kBwdTargetTasks + B * H - 1) / std::max<int64_t>(1, B * H)));
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);

  // Q and dO in the compute type, read by every key block: widened once (16-bit
  // inputs) in the same pass that computes Delta, else read in place.
  at::Tensor q_wide, go_wide;
  if constexpr (widen) {
    q_wide = at::empty({B * H * Sq * D}, opts);
    go_wide = at::empty({B * H * Sq * D}, opts);
  }
  // Delta_i = rowsum(dO_i * O_i) - grad_lse_i, and lse in the softmax domain.
  std::vector<T> delta(B * H * Sq), lse_dom(B * H * Sq);
  at::parallel_for(0, B * H * Sq, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % Sq, bh = row / Sq, h = bh % H, b = bh / H;
      const OutT* a = go.row(b, h, i);
      const OutT* x = o.row(b, h, i);
      // In double even for float: Delta is subtracted from dP ~ |dO||V| to leave a
      // small dS, so its rounding error would be amplified into dQ and dK.
      double acc = 0;
      for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(a[d]) * static_cast<double>(x[d]);
      delta[row] = static_cast<T>(acc - (glse ? static_cast<double>(glse[row]) : 0.0));
      lse_dom[row] = Dom::from_lse(lse[row]);
      if constexpr (widen) {
        const OutT* qr = q.row(b, h, i);
        T* qd = q_wide.data_ptr<T>() + row * D;
        T* gd = go_wide.data_ptr<T>() + row * D;
        for (int64_t d = 0; d < D; ++d) {
          qd[d] = static_cast<T>(qr[d]);
          gd[d] = static_cast<T>(a[d]);
        }
      }
    }
  });
  View<T> qv, gov;
  if constexpr (widen) {
    qv = View<T>{q_wide.data_ptr<T>(), H * Sq * D, Sq * D, D};
    gov = View<T>{go_wide.data_ptr<T>(), H * Sq * D, Sq * D, D};
  } else {
    qv = q;
    gov = go;
  }
  if constexpr (std::is_same_v<T, double>) refine_lse<T>(s, scale_d, band, var, qv, k, lse_dom.data());
  if (var.sinks) sink_grad<T>(s, var, lse_dom.data(), delta.data(), grad_sinks);

  // Accumulators: straight into the outputs when no reduction or cast is needed.
  at::Tensor dq_buf, dk_buf, dv_buf;
  T* dq_acc = nullptr;
  T* dk_acc = nullptr;
  T* dv_acc = nullptr;
  if (!widen && chunks == 1) {
    dq_acc = reinterpret_cast<T*>(gq);
  } else {
    dq_buf = at::empty({chunks, B * H * Sq * D}, opts);
    dq_acc = dq_buf.data_ptr<T>();
  }
  if (!widen && G == 1) {
    dk_acc = reinterpret_cast<T*>(gk);
    dv_acc = reinterpret_cast<T*>(gv);
  } else {
    dk_buf = at::empty({B * H * Sk * D}, opts);
    dv_buf = at::empty({B * H * Sk * D}, opts);
    dk_acc = dk_buf.data_ptr<T>();
    dv_acc = dv_buf.data_ptr<T>();
  }

  at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> pbuf(bq * bk), dsbuf(bq * bk), tbuf(var.softcap > 0 ? bq * bk : 0);
    Scratch<T> kbuf(widen ? bk * D : 0), vbuf(widen ? bk * D : 0);
    Scratch<uint8_t> keep(var.dropout ? bk + 8 : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ch = zigzag(task % chunks, chunks), bh = task / chunks, h = bh % H, b = bh / H, hk = h / G;
      const int64_t kv0 = std::min(Sk, ch * nkb / chunks * bk), kv1 = std::min(Sk, (ch + 1) * nkb / chunks * bk);
      const int64_t len = band.len(b), off = band.offset(len);
      const T* Lrow = lse_dom.data() + bh * Sq;
      const T* Drow = delta.data() + bh * Sq;
      const float* lse_row = lse + bh * Sq;
      T* dQ = dq_acc + (ch * B * H + bh) * Sq * D;
      T* dK = dk_acc + bh * Sk * D;
      T* dV = dv_acc + bh * Sk * D;
      fill_zero(dQ, Sq * D);
      fill_zero(dK + kv0 * D, (kv1 - kv0) * D);
      fill_zero(dV + kv0 * D, (kv1 - kv0) * D);
      if (Sq == 0) continue;
      const int64_t kend_max = band.kend(Sq - 1, len, off);
      for (int64_t j0 = kv0; j0 < std::min(kv1, kend_max); j0 += bk) {
        const int64_t n = std::min({bk, kv1 - j0, kend_max - j0});
        const Span rows = band.rows_of_keys(j0, j0 + n, off);  // skip the key block when no row sees it
        if (rows.size() == 0) continue;
        int64_t ldk, ldv;
        const T* K = tile_rows<T>(k, b, hk, j0, n, D, kbuf.data(), ldk);
        const T* V = tile_rows<T>(v, b, hk, j0, n, D, vbuf.data(), ldv);
        for (int64_t i0 = rows.lo; i0 < rows.hi; i0 += bq) {
          const int64_t m = std::min(bq, rows.hi - i0);
          const T* Q = qv.row(b, h, i0);
          const T* dO = gov.row(b, h, i0);
          T* P = pbuf.data();
          T* dS = dsbuf.data();
          gemm_rm<T>(false, true, m, n, D, T(1), Q, qv.ss, K, ldk, T(0), P, bk);
          gemm_rm<T>(false, true, m, n, D, T(1), dO, gov.ss, V, ldv, T(0), dS, bk);
          // Keys [j0 + lo, j0 + hi) of the tile are the ones row i0 + r sees.
          auto visible = [&](int64_t r) {
            // lse = -inf: a row that sees no key (or a float64 lse below float32's range).
            return std::isinf(lse_row[i0 + r]) ? Span{0, 0} : band.visible(i0 + r, len, off, j0, n);
          };
          bool hidden_pairs = false;
          for (int64_t r = 0; r < m; ++r) {
            const int64_t i = i0 + r;
            const Span vis = visible(r);
            const int64_t nv = vis.size();
            hidden_pairs |= nv < n;
            T* prow = P + r * bk;
            T* dsrow = dS + r * bk;
            if (nv > 0) {
              T* p = prow + vis.lo;
              T* ds = dsrow + vis.lo;
              T* t = var.softcap > 0 ? tbuf.data() + r * bk + vis.lo : nullptr;
              if (t) softcap_scores<T>(var, scale_d, p, nv, t);
              Dom::exp_rows(p, nv, c, Lrow[i]);
              // With dropout Z = keep / (1 - p): dP <- dP * Z, dS = P (dP - Delta), then P <- P * Z for dV.
              const uint8_t* kp = var.dropout ? keep_of(var, bh, i, j0 + vis.lo, nv, keep.data()) : nullptr;
              if (kp) fa::apply_keep(ds, kp, nv, keep_scale);
              fa::softmax_grad(ds, p, nv, Drow[i]);
              if (t) fa::tanh_grad(ds, t, nv);
              if (kp) fa::apply_keep(p, kp, nv, keep_scale);
              fill_zero(prow, vis.lo);
              fill_zero(dsrow, vis.lo);
              fill_zero(prow + vis.hi, n - vis.hi);
              fill_zero(dsrow + vis.hi, n - vis.hi);
            } else {
              fill_zero(prow, n);
              fill_zero(dsrow, n);
            }
          }
          // dV += P^T dO;  dK += scale dS^T Q;  dQ += scale dS K. Hidden pairs have
          // P = dS = 0 and multiply dO and Q rows and K rows (see all_finite).
          if (!hidden_pairs || (all_finite(Q, m, D, qv.ss) && all_finite(dO, m, D, gov.ss) && all_finite(K, n, D, ldk))) {
            gemm_rm<T>(true, false, n, D, m, T(1), P, bk, dO, gov.ss, T(1), dV + j0 * D, D);
            gemm_rm<T>(true, false, n, D, m, scale, dS, bk, Q, qv.ss, T(1), dK + j0 * D, D);
            gemm_rm<T>(false, false, m, D, n, scale, dS, bk, K, ldk, T(1), dQ + i0 * D, D);
          } else {
            for (int64_t r = 0; r < m; ++r) {
              const Span vis = visible(r);
              const int64_t nv = vis.size();
              if (nv == 0) continue;
              const int64_t lo = vis.lo;
              gemm_rm<T>(true, false, nv, D, 1, T(1), P + r * bk + lo, bk, dO + r * gov.ss, gov.ss, T(1),
                         dV + (j0 + lo) * D, D);
              gemm_rm<T>(true, false, nv, D, 1, scale, dS + r * bk + lo, bk, Q + r * qv.ss, qv.ss, T(1),
                         dK + (j0 + lo) * D, D);
              gemm_rm<T>(false, false, 1, D, nv, scale, dS + r * bk + lo, bk, K + lo * ldk, ldk, T(1),
                         dQ + (i0 + r) * D, D);
            }
          }
        }
      }
    }
  });


  // Fixed-order reductions (and the cast to the output dtype).
  if (dq_buf.defined()) {
    const int64_t total = B * H * Sq * D;
    at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T acc = dq_acc[i];
        for (int64_t ch = 1; ch < chunks; ++ch) acc += dq_acc[ch * total + i];
        gq[i] = static_cast<OutT>(acc);
      }
    });
  }
  if (dk_buf.defined()) {
    const int64_t row = Sk * D;  // one head's [Sk, D]
    at::parallel_for(0, B * Hkv * row, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bhk = i / row, e = i % row;
        const int64_t first = (bhk * G) * row + e;  // query head bhk*G in [B*H] order (b*H + hk*G)
        T ak = 0, av = 0;
        for (int64_t g = 0; g < G; ++g) {
          ak += dk_acc[first + g * row];
          av += dv_acc[first + g * row];
        }
        gk[i] = static_cast<OutT>(ak);
        gv[i] = static_cast<OutT>(av);
      }
    });
  }
}

// ------------------------------------------------------------------------ dispatch

// Row stride >= D lets BLAS read rows in place; anything else (a broadcast or
// overlapping sequence dim) is copied once.
at::Tensor readable(const at::Tensor& t) {
  const int64_t D = t.size(3);
  const bool ok = t.size(2) <= 1 || t.stride(2) >= std::max<int64_t>(D, 1);
  return ok && (D <= 1 || t.stride(3) == 1) ? t : t.contiguous();
}

template <typename In>
View<In> view_of(const at::Tensor& t) {
  const int64_t D = t.size(3);
  // Size-1 dims may carry any stride; give them the contiguous one (BLAS checks ld >= D).
  const int64_t ss = t.size(2) > 1 ? t.stride(2) : D;
  return View<In>{t.data_ptr<In>(), t.stride(0), t.stride(1), std::max<int64_t>(ss, std::max<int64_t>(D, 1))};
}

// The softmax scale in double. AttentionShape.scale holds it as float, which is
// enough for float/bf16/half but would cost float64 results their precision;
// resolved exactly as check_attention_args does.
double resolve_scale(const AttentionShape& s, c10::optional<double> scale) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(s.head_dim));
}

Band make_band(const AttentionShape& s, const c10::optional<at::Tensor>& seqlens_k, at::Tensor& lens_holder) {
  const int64_t* lens = nullptr;
  if (s.has_seqlens_k) {
    lens_holder = seqlens_k->to(at::kLong).contiguous();
    lens = lens_holder.data_ptr<int64_t>();
  }
  return Band::make(s.seqlen_q, s.seqlen_k, s.causal, s.bottom_right, s.window_left, s.window_right, lens);
}

Variants make_variants(double softcap, const c10::optional<at::Tensor>& sinks, double dropout_p,
                       const c10::optional<at::Tensor>& rng_state) {
  Variants var;
  var.softcap = softcap;
  if (sinks.has_value() && sinks->defined()) var.sinks = sinks->data_ptr<float>();
  if (dropout_p > 0) {
    const int64_t* state = rng_state->data_ptr<int64_t>();
    var.dropout = true;
    var.rng = dropout::DropoutRng::make(static_cast<uint64_t>(state[0]), static_cast<uint64_t>(state[1]),
                                        static_cast<float>(dropout_p));
    var.keep_scale = 1.0 / (1.0 - dropout_p);
  }
  return var;
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool is_causal, c10::string_view causal_alignment,
    c10::optional<double> scale, const c10::optional<at::Tensor>& seqlens_k, bool /*deterministic*/,
    int64_t window_left, int64_t window_right, double softcap, const c10::optional<at::Tensor>& sinks,
    double dropout_p, const c10::optional<at::Tensor>& rng_state) {
  const AttentionShape s = check_attention_args(q, k, v, is_causal, causal_alignment, scale, seqlens_k, window_left,
                                                window_right, softcap, sinks, dropout_p, rng_state);
  at::Tensor out = empty_output({s.batch, s.heads, s.seqlen_q, s.head_dim}, q.options());
  at::Tensor lse = empty_output({s.batch, s.heads, s.seqlen_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  at::Tensor lens_holder;
  const Band band = make_band(s, seqlens_k, lens_holder);
  const Variants var = make_variants(softcap, sinks, dropout_p, rng_state);
  const at::Tensor qr = readable(q), kr = readable(k), vr = readable(v);
  float* lse_p = lse.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "flash_attention_fwd_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    attention_fwd<T, scalar_t>(s, resolve_scale(s, scale), band, var, view_of<scalar_t>(qr), view_of<scalar_t>(kr),
                               view_of<scalar_t>(vr), out.data_ptr<scalar_t>(), lse_p);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool is_causal,
    c10::string_view causal_alignment, c10::optional<double> scale, const c10::optional<at::Tensor>& seqlens_k,
    bool /*deterministic: the CPU backward always is*/, int64_t window_left, int64_t window_right, double softcap,
    const c10::optional<at::Tensor>& sinks, double dropout_p, const c10::optional<at::Tensor>& rng_state) {
  const AttentionShape s = check_attention_args(q, k, v, is_causal, causal_alignment, scale, seqlens_k, window_left,
                                                window_right, softcap, sinks, dropout_p, rng_state);
  check_attention_grad_args(s, q, grad_out, grad_lse, out, lse);
  at::Tensor gq = empty_output_like(q);
  at::Tensor gk = empty_output_like(k);
  at::Tensor gv = empty_output_like(v);
  at::Tensor gsinks = s.has_sinks ? empty_output({s.heads}, q.options().dtype(at::kFloat))
                                  : at::empty({0}, q.options().dtype(at::kFloat));
  if (gq.numel() == 0 || s.seqlen_k == 0) {  // no query or no key: nothing flows through q, k, v
    gq.zero_();
    gk.zero_();
    gv.zero_();
    // Without keys every row's lse is its sink: d sink = sum of grad_lse over the rows.
    if (s.has_sinks) {
      const bool flows = s.seqlen_k == 0 && grad_lse.has_value() && grad_lse->defined() && gq.numel() > 0;
      if (flows) gsinks.copy_(grad_lse->sum({0, 2}));
      else gsinks.zero_();
    }
    return {gq, gk, gv, gsinks};
  }
  at::Tensor lens_holder;
  const Band band = make_band(s, seqlens_k, lens_holder);
  const Variants var = make_variants(softcap, sinks, dropout_p, rng_state);
  const at::Tensor qr = readable(q), kr = readable(k), vr = readable(v), outr = readable(out),
                   gor = readable(grad_out);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor glse_c;
  if (grad_lse.has_value() && grad_lse->defined()) glse_c = grad_lse->contiguous();
  const float* glse_p = glse_c.defined() ? glse_c.data_ptr<float>() : nullptr;
  float* gsinks_p = s.has_sinks ? gsinks.data_ptr<float>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "flash_attention_bwd_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    attention_bwd<T, scalar_t>(s, resolve_scale(s, scale), band, var, view_of<scalar_t>(qr), view_of<scalar_t>(kr),
                               view_of<scalar_t>(vr), view_of<scalar_t>(outr), view_of<scalar_t>(gor),
                               lse_c.data_ptr<float>(), glse_p, gq.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(),
                               gv.data_ptr<scalar_t>(), gsinks_p);
  });
  return {gq, gk, gv, gsinks};
}

}  // namespace
}  // namespace tfkernels::cpu

TORCH_LIBRARY_IMPL(tfkernels, CPU, m) {
  m.impl("flash_attention_fwd", &tfkernels::cpu::flash_attention_fwd_cpu);
  m.impl("flash_attention_bwd", &tfkernels::cpu::flash_attention_bwd_cpu);
}
