// CPU flash attention, forward and backward (FlashAttention-2 tiling), for the
// padded op and the packed variable-length op alike: both describe their
// sequences (flash_attention_layout.h) and the kernels below see only
// "sequence b has len_q query rows starting at flat row q_start(b), len_k keys
// starting at k_start(b)". The ops' entry points are in flash_attention_ops.cpp.
//
// Forward: one task per (sequence, head, query block). A task keeps its query
// block's output accumulator, running max m and running sum l, and walks the
// key/value tiles: S = Q K^T (GEMM into a bq x bk tile), online softmax on the
// tile (vectorised exp2), acc = alpha * acc + P V (GEMM). Each row sees one band
// of keys (flash_attention_band.h: key length, causal, window, per sequence); the
// tiles of a block start at the first key its first row sees and stop after the
// last key its last row sees, so a sliding window costs O(S * W), not O(S^2), and
// within a tile each row only exponentiates its band. Nothing of size Sq x Sk is
// ever allocated. lse = ln(sum exp) is saved in float32.
//
// Variants (README, Semantics): the softcap maps the tile's scores through
// c * tanh(s / c) before the softmax; a sink starts a row's running max and sum
// as if it were one more key with no value; dropout zeroes P after the row sum
// has taken it (lse is pre-dropout) with decisions from csrc/dropout_rng.h
// (counter slice b * H + h, row and key within the sequence), which the backward
// regenerates instead of storing.
//
// Backward: recomputes P from the saved lse. One task per (sequence, query head,
// key chunk); a task walks its key blocks (outer) and the query blocks that see
// them (inner) and accumulates dK, dV of its key rows and dQ of its head (FA2
// order). Tasks never write the same memory: dK/dV are per query head (summed
// over the GQA group afterwards) and each key chunk beyond the first has its own
// dQ partial (summed afterwards), both reductions in a fixed order, so the result
// is bitwise deterministic; so is d sink (a fixed-order sum over rows). Key
// chunks exist only to split a sequence whose share of the work is large (e.g.
// B = H = 1, or one long sequence among short ones); their number depends on the
// shape, not on the threads.
//
// Scheduling: the tasks of a pass are numbered costliest first (an estimate from
// the band: visible query x key pairs) and handed out by a TaskQueue, so threads
// finish together whatever the mix of sequence lengths.
//
// Compute: float for float/bf16/half inputs, double for double. Inputs are read in
// place through their strides (only the last dim must be contiguous); 16-bit
// inputs are widened tile by tile inside the tasks (a separate conversion pass
// costs an extra parallel region and memory traffic), outputs rounded once. Our
// copies space their rows an odd number of cache lines apart, and the fp32 tile
// kernels also copy the operands they read down their rows when the input's rows
// crowd a few L1 sets (row_ld, tile_rows: D = 128, or [B,S,H,D] views). The
// fp32 tile products run on our AVX-512 kernels (f32_dot.h: K^T transposed once
// per call in the forward, widened first for 16-bit inputs, K^T and V^T per key block
// in the backward; no per-tile library call) where the CPU has AVX-512, else on
// BLAS (blas.h); the exp runs in flash_attention_softmax.cpp. On bf16 inputs,
// where the CPU has AVX512-BF16, forward and backward instead multiply the bf16
// tiles directly (bf16_dot.h: K, V, Q, dO packed per tile, P and dS rounded to bf16
// for the products that take them, as on the GPU), at up to twice the widened path's rate.
#include "cpu/flash_attention_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/amx_dot.h"
#include "cpu/bf16_dot.h"
#include "cpu/blas.h"
#include "cpu/f32_dot.h"
#include "cpu/flash_attention_softmax.h"
#include "cpu/tile_utils.h"

namespace tfkernels::cpu {
namespace {

using fa::SoftmaxDomain;
using tile::Scratch;
using tile::all_finite;

// Block sizes. Forward: the query block is the GEMM's M for both products, the key
// block their N (S = Q K^T) and K (P V). Larger blocks amortise the per-tile
// softmax bookkeeping and make MKL faster; bq * bk floats stay in L2 (512 KiB).
// Measured on 2 AVX-512 cores (B1 H8 S2048 D64, float32, against SDPA in the same
// process): bq in {64, 128, 256, 512} x bk in {256, 512, 1024} all landed within
// 0.93-1.02x of SDPA, i.e. within the noise of a shared machine; 256 x 512 is also
// SDPA's own split. Backward: 128 x 256 was ahead of 64/128/256 x 64/128 by ~5-10%
// (same noise caveat). Both are chosen per sequence, from its own lengths. The bf16
// and fp32 tile kernels (bf16_dot, f32_dot) pack K (and V) per tile, so they take
// more query rows from 192 on: bf16 B1 H8 S512 D64 ran 4.0 ms at 64 rows, 2.9 at 128,
// 2.7 at 256 (128 keeps one-head causal calls balanced over the threads; fp32 through
// sgemm at 256 rows ran ~10% slower); fp32 on f32_dot 4.2 ms at 64 rows, 3.7 at 128.
// At S2048 D128 fp32 on Zen 3 (AVX2 tiles, 512 KiB L2, alternating calls against 256 x
// 512): 256 x 256 within noise, 128 x 256 and 128 x 512 8-12% slower, 64 x 256 and
// 64 x 512 22-25%: every query block re-reads K^T and copies V.
struct FwdBlocks {
  int64_t bq, bk;
};
// Query rows of a mid-length sequence (192 to 767 queries) through BLAS; our tile
// kernels take more (mid_query_rows).
constexpr int64_t kBlasMidRows = 64;
// mid_rows: the query rows for sequences of 192 to 767 queries.
FwdBlocks fwd_blocks(int64_t seqlen_q, int64_t seqlen_k, int64_t mid_rows = kBlasMidRows) {
  const int64_t bq = seqlen_q >= 768 ? 256 : seqlen_q >= 192 ? mid_rows : 32;
  const int64_t bk = 512;
  return {std::max<int64_t>(1, std::min(bq, seqlen_q)), std::max<int64_t>(1, std::min(bk, seqlen_k))};
}

// Backward: five GEMMs per (query block, key block) tile (see above).
constexpr int64_t kBwdBlockQ = 128;
constexpr int64_t kBwdBlockK = 256;
// The backward aims for this many tasks of at most equal cost: a sequence whose
// share of the work is larger than 1 / kBwdTargetTasks is split into key chunks.
constexpr int64_t kBwdTargetTasks = 8;

struct BwdBlocks {
  int64_t bq, bk, nkb;  // nkb = number of key blocks
};
BwdBlocks bwd_blocks(int64_t len_q, int64_t k_rows) {
  const int64_t bq = std::max<int64_t>(1, std::min(kBwdBlockQ, len_q));
  const int64_t bk = std::max<int64_t>(1, std::min(kBwdBlockK, k_rows));
  return {bq, bk, (k_rows + bk - 1) / bk};
}

// The threads a pass of `tasks` tasks runs on (at::parallel_for gives each one index).
int64_t workers(int64_t tasks) { return std::min<int64_t>(tasks, at::get_num_threads()); }

// The forward's query rows for mid-length sequences (fwd_blocks): 64 through BLAS, 128
// on our tile kernels (see above), and 256 on the fp32 tiles where every row sees
// every key and 256-row blocks still give each thread 4 tasks or more: B1 H8 S512 fp32
// on 2 AVX-512 Xeon cores, 12 rounds in shuffled order: D128 3.32 -> 3.18 ms, D64
// 1.71 -> 1.69. Not under a causal mask or window (the diagonal blocks' hidden pairs:
// causal S512 6% slower at 256) nor on the bf16 products (within 1%).
int64_t mid_query_rows(const AttentionCall& call, bool dot, bool fast) {
  if (!dot && !fast) return kBlasMidRows;
  const bool full_band = call.band.left < 0 && call.band.right < 0;
  if (dot || !full_band) return 128;
  int64_t tasks = 0;
  for (int64_t b = 0; b < call.seqs.count(); ++b) tasks += (call.seqs.q_len(b) + 255) / 256 * call.heads;
  return tasks >= 4 * at::get_num_threads() ? 256 : 128;
}

// `units` reordered by decreasing cost (ties keep their order).
template <typename Unit>
std::vector<Unit> costliest_first(const std::vector<Unit>& units, const std::vector<int64_t>& cost) {
  std::vector<int64_t> order(units.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::vector<Unit> sorted;
  sorted.reserve(units.size());
  for (int64_t i : order) sorted.push_back(units[i]);
  return sorted;
}

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

// Dropout's keep decisions for keys [j, j + n) of row i of slice bh (= b * H + h,
// rows and keys counted within sequence b) into `keep` (scratch of n + 8 bytes);
// returns where key j's decision is.
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

// Rows of our own copies of Q, K, V and dO are row_ld(D) apart: an odd number of
// cache lines (f32dot::spread_ld), as the tile loop wants of the operands it reads
// down their rows (V in P V; dO, Q and K in dV, dK and dQ).
inline int64_t row_ld(int64_t D) { return f32dot::spread_ld(D); }

// Whether tile_rows(..., spread) copies rows ld apart (so needs its buffer); the
// backward's Q and dO follow the same rule.
template <typename T, typename In>
bool copies_rows(int64_t ld, bool spread) {
  return !std::is_same_v<T, In> || (spread && f32dot::crowds_l1_sets(ld));
}

// dst[d] = src[d] in the compute type, for d < D.
template <typename T, typename In>
inline void copy_row(const In* src, T* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]);
}

// `rows` consecutive rows (first at `first`, leading dim ld_in) in the compute type
// T: in place when the input already is T (ld = ld_in), else widened into `buf` (ld =
// row_ld(D)). With `spread` (an operand of our tile loop's B side), rows in place
// that crowd a few L1 sets (f32dot::crowds_l1_sets) are copied into `buf` as well.
template <typename T, typename In>
inline const T* tile_rows(const In* first, int64_t ld_in, int64_t rows, int64_t D, T* buf, int64_t& ld,
                          bool spread = false) {
  if constexpr (std::is_same_v<T, In>) {
    if (!copies_rows<T, In>(ld_in, spread)) {
      ld = ld_in;
      return first;
    }
  }
  ld = row_ld(D);
  for (int64_t r = 0; r < rows; ++r) copy_row(first + r * ld_in, buf + r * ld, D);
  return buf;
}

template <typename OutT, typename T>
inline void store_scaled(OutT* dst, const T* src, int64_t n, T a) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<OutT>(src[j] * a);
}

// The forward's output row dst = src * a. Vectorised where the types allow (the
// portable loop compiles to SSE2; it took 6% of the B1 H8 S512 D128 bf16 forward on
// AMX): fp32 by the softmax's multiversioned loops, bf16 on the dot path
// through AVX512-BF16's rounding.
template <typename OutT, typename T>
inline void store_output_row(OutT* dst, const T* src, int64_t n, T a, bool dot) {
  if constexpr (std::is_same_v<OutT, T>) {
    return fa::scaled_copy(dst, src, n, a);
  } else if constexpr (std::is_same_v<OutT, c10::BFloat16> && std::is_same_v<T, float>) {
    if (dot) return bf16dot::scale_round_row(src, n, a, dst);
  }
  store_scaled(dst, src, n, a);
}

template <typename T>
inline void fill_zero(T* p, int64_t n) {
  std::fill(p, p + n, T(0));
}

// Zeroes `rows` rows of D elements, ld apart.
template <typename T>
inline void fill_zero_rows(T* p, int64_t rows, int64_t D, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) fill_zero(p + r * ld, D);
}


template <typename T>
RowView<T> view(const Rows& rows) {
  return RowView<T>{rows.t.data_ptr<std::remove_const_t<T>>(), rows.layout};
}

// The fp32 tile products (fp32 inputs, and 16-bit ones widened to fp32) run on
// f32_dot.h's AVX-512 kernels where the CPU has them (`fast`), else on BLAS. On the
// fast path, a product with a transposed B (S = Q K^T, dP = dO V^T) reads B^T packed
// once per key tile by `transpose_tile`; every other operand is read in place.
template <typename T>
bool fast_products() {
  if constexpr (std::is_same_v<T, float>) {
    return f32dot::available();
  } else {
    return false;
  }
}

// bt (D x ldbt) = B^T for the n x D rows of B; only on the fast path.
template <typename T>
void transpose_tile(const T* b, int64_t ldb, int64_t n, int64_t D, T* bt, int64_t ldbt) {
  if constexpr (std::is_same_v<T, float>) f32dot::pack_transposed(b, ldb, n, D, bt, ldbt);
}

// S (m x n) = A B^T for the rows of A (m x D) and B (n x D): from bt, B^T as
// transpose_tile packed it, when fast; from B itself through BLAS otherwise.
template <typename T>
void tile_abt(bool fast, int64_t m, int64_t n, int64_t D, const T* a, int64_t lda, const T* b, int64_t ldb,
              const T* bt, int64_t ldbt, T* s, int64_t lds) {
  if constexpr (std::is_same_v<T, float>) {
    if (fast) return f32dot::gemm(m, n, D, a, lda, 1, bt, ldbt, 1.0f, s, lds, false);
  }
  gemm_rm<T>(false, true, m, n, D, T(1), a, lda, b, ldb, T(0), s, lds);
}

// C (m x n) += alpha op(A) B, op(A) = A (m x k rows) or, with trans_a, the transpose
// of A's k x m rows; B is k x n rows. Without `accumulate`, C = alpha op(A) B (what C
// held is ignored, NaN included).
template <typename T>
void tile_ab_acc(bool fast, bool trans_a, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                 const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate = true) {
  if constexpr (std::is_same_v<T, float>) {
    if (fast) return f32dot::gemm(m, n, k, a, trans_a ? 1 : lda, trans_a ? lda : 1, b, ldb, alpha, c, ldc, accumulate);
  }
  gemm_rm<T>(trans_a, false, m, n, k, alpha, a, lda, b, ldb, T(accumulate ? 1 : 0), c, ldc);
}

// Keys a row cannot see must not reach it, not even as 0 x Inf = NaN. A tile GEMM
// multiplies the zeroed P (or dS) entries of such keys with their values, which
// is exact while those values are finite. When a tile holds hidden pairs and
// non-finite operands, the callers below fall back to one product per row over
// that row's visible keys (rare: only tiles on the edges of the band carry hidden
// pairs, since tiles outside every row's band are skipped).

// ------------------------------------------------------------------------ forward

// p[j] = bf16(2^(x[j] c - m)) and their sum, on the bf16 products' path (T = float
// there; the forward never asks for it with double).
template <typename T>
T exp_to_bf16(const T* x, int64_t n, T c, T m, c10::BFloat16* p) {
  if constexpr (std::is_same_v<T, float>) {
    return bf16dot::exp2_round_row(x, n, c, m, p);
  } else {
    TORCH_CHECK(false, "exp_to_bf16: only on float scores");
  }
}

// K^T of every (sequence, kv head) for the forward's fast fp32 path, packed once
// before the tasks: every query block of a sequence reads the same keys, and
// transposing them per task cost 12% of the S512 D128 forward (perf). In f32dot's
// panels of 64 key columns x D steps, contiguous: as one [D][keys] matrix, each step
// of the micro-kernel read its row segment from another page (an 8 KiB stride at
// S2048), and Q K^T ran 18% slower than P V on 2 AVX-512 Xeon cores. A sequence's
// keys start on a panel, kv head hk's at column hk * head_cols.
struct KeysTransposed {
  f32dot::PackedB panels;
  std::vector<int64_t> col0;  // the first column of each sequence within a head
  int64_t head_cols = 0;
  bool ready() const { return !panels.empty(); }
  int64_t column(int64_t b, int64_t hk, int64_t j) const { return hk * head_cols + col0[b] + j; }
};

// S (m x n) = Q K^T for keys [j0, j0 + n) of sequence b, kv head hk, with each row's
// max from the product's registers where row_max is given (T = float: K^T is packed
// only on the fp32 tiles).
template <typename T>
void scores_from_panels(const KeysTransposed& kt, int64_t m, int64_t n, int64_t D, const T* q, int64_t ldq,
                        int64_t b, int64_t hk, int64_t j0, T* s, int64_t lds, T* row_max) {
  if constexpr (std::is_same_v<T, float>) {
    const int64_t c0 = kt.column(b, hk, j0);
    if (row_max) return f32dot::gemm_row_max(m, n, D, q, ldq, kt.panels, c0, s, lds, row_max);
    f32dot::gemm_prepacked(false, m, n, D, 1.0f, q, ldq, kt.panels, 0, c0, s, lds, false);
  } else {
    TORCH_CHECK(false, "scores_from_panels: only on float scores");
  }
}

// 16-bit inputs are widened first, a block of rows at a time (per key tile instead,
// as before, was 1-3% slower at S512 D64/D128 bf16 and 6% at S512 D128 fp16 on Zen 3;
// within noise at S2048).
template <typename T, typename OutT>
KeysTransposed transpose_keys(const AttentionCall& call, RowView<const OutT> k, bool fast) {
  KeysTransposed kt;
  if constexpr (std::is_same_v<T, float>) {
    if (!fast) return kt;
    const Sequences& seqs = call.seqs;
    const int64_t Hkv = call.kv_heads, D = call.head_dim, B = seqs.count();
    constexpr int64_t kCols = f32dot::PackedB::kCols;
    constexpr int64_t kRows = 4 * kCols;  // key rows per task of the transposing pass
    kt.col0.resize(B);
    std::vector<std::pair<int64_t, int64_t>> blocks;  // (sequence, first key row)
    for (int64_t b = 0; b < B; ++b) {
      kt.col0[b] = kt.head_cols;
      kt.head_cols += (seqs.k_rows(b) + kCols - 1) / kCols * kCols;
      for (int64_t j = 0; j < seqs.k_rows(b); j += kRows) blocks.emplace_back(b, j);
    }
    kt.panels = f32dot::PackedB(D, std::max<int64_t>(1, Hkv * kt.head_cols));
    const auto n_blocks = static_cast<int64_t>(blocks.size());
    at::parallel_for(0, Hkv * n_blocks, 1, [&](int64_t begin, int64_t end) {
      Scratch<float> widened(std::is_same_v<OutT, float> ? 0 : kRows * row_ld(D));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t hk = t / n_blocks;
        const auto [b, j] = blocks[t % n_blocks];
        const int64_t rows = std::min(kRows, seqs.k_rows(b) - j);
        int64_t ld;
        const float* src = tile_rows<float>(k.at(seqs.k_start(b) + j, hk), k.ld(), rows, D, widened.data(), ld);
        for (int64_t r = 0; r < rows; r += kCols) {
          f32dot::pack_transposed(src + r * ld, ld, std::min(kCols, rows - r), D,
                                  kt.panels.panel(kt.column(b, hk, j + r) / kCols), kCols);
        }
      }
    });
  }
  return kt;
}

// The bf16 products' K (as K^T pairs, keys as columns) and V (pairs of keys as rows)
// of every (sequence, kv head), packed once before the tasks where the products run on
// AMX: per tile, every query block packed them again (8% of the S2048 D128 forward's
// samples). Each sequence's keys start at a multiple of 16, so its pairs line up with
// key 0; a tile that starts on an odd key, or a sequence with a non-finite V (whose
// tiles need the per-tile check), packs its own as before.
struct PackedKV {
  at::Tensor kt, v;  // 32-bit words: per kv head [D/2][ld], and [cols/2][vp_ld]
  std::vector<int64_t> col0;  // the first column of each sequence
  std::vector<uint8_t> v_finite;  // per (sequence, kv head)
  int64_t ld = 0, cols = 0, vp_ld = 0, D = 0, B = 0;
  bool ready() const { return kt.defined(); }
  const uint32_t* kt_of(int64_t b, int64_t hk) const {
    return reinterpret_cast<const uint32_t*>(kt.const_data_ptr<int32_t>()) + hk * (D / 2) * ld + col0[b];
  }
  const uint32_t* v_of(int64_t b, int64_t hk) const {
    return reinterpret_cast<const uint32_t*>(v.const_data_ptr<int32_t>()) + (hk * (cols / 2) + col0[b] / 2) * vp_ld;
  }
  bool v_all_finite(int64_t b, int64_t hk) const { return v_finite[hk * B + b] != 0; }
};

template <typename OutT>
PackedKV pack_keys_values(const AttentionCall& call, RowView<const OutT> k, RowView<const OutT> v, bool amx_products) {
  PackedKV kv;
  if constexpr (std::is_same_v<OutT, c10::BFloat16>) {
    // K rows as 32-bit words for f32dot's transpose (bf16dot::pack_transposed zeroes
    // to the end of each packed row, which here holds the other sequences).
    if (!amx_products || k.ld() % 2 != 0) return kv;
    const Sequences& seqs = call.seqs;
    const int64_t Hkv = call.kv_heads, D = call.head_dim, B = seqs.count();
    constexpr int64_t kRows = 256;  // keys per task of the packing pass (even)
    kv.col0.resize(B);
    std::vector<std::pair<int64_t, int64_t>> blocks;  // (sequence, first key)
    for (int64_t b = 0; b < B; ++b) {
      kv.col0[b] = kv.cols;
      kv.cols += bf16dot::packed_ld(seqs.k_rows(b));
      for (int64_t j = 0; j < seqs.k_rows(b); j += kRows) blocks.emplace_back(b, j);
    }
    // A tile's last 16 columns may reach 15 past the last sequence's. Columns past a
    // sequence's keys are read only into sums that are dropped (amx::gemm's edge tiles).
    kv.ld = f32dot::spread_ld(kv.cols + 16);
    kv.vp_ld = bf16dot::packed_ld(D);
    kv.D = D;
    kv.B = B;
    const auto words = at::TensorOptions().dtype(at::kInt);
    kv.kt = at::empty({std::max<int64_t>(1, Hkv * (D / 2) * kv.ld)}, words);
    kv.v = at::empty({std::max<int64_t>(1, Hkv * (kv.cols / 2) * kv.vp_ld)}, words);
    auto* kt = reinterpret_cast<uint32_t*>(kv.kt.mutable_data_ptr<int32_t>());
    auto* vp = reinterpret_cast<uint32_t*>(kv.v.mutable_data_ptr<int32_t>());
    const auto n_blocks = static_cast<int64_t>(blocks.size());
    std::vector<uint8_t> block_finite(Hkv * n_blocks);
    at::parallel_for(0, Hkv * n_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t hk = t / n_blocks;
        const auto [b, j] = blocks[t % n_blocks];
        const int64_t rows = std::min(kRows, seqs.k_rows(b) - j), key = seqs.k_start(b) + j;
        f32dot::pack_transposed(reinterpret_cast<const float*>(k.at(key, hk)), k.ld() / 2, rows, D / 2,
                                reinterpret_cast<float*>(kt + hk * (D / 2) * kv.ld + kv.col0[b] + j), kv.ld);
        block_finite[t] = bf16dot::pack_row_pairs(v.at(key, hk), v.ld(), rows, D,
                                                  vp + (hk * (kv.cols / 2) + (kv.col0[b] + j) / 2) * kv.vp_ld, kv.vp_ld);
      }
    });
    kv.v_finite.assign(Hkv * B, 1);
    for (int64_t t = 0; t < Hkv * n_blocks; ++t) {
      if (!block_finite[t]) kv.v_finite[(t / n_blocks) * B + blocks[t % n_blocks].first] = 0;
    }
  }
  return kv;
}

// A block of query rows of one sequence: the forward's unit of work, once per head.
struct QueryBlock {
  int64_t seq, i0;
};

// Every sequence's query blocks, costliest first (rows x keys they see, + 1 per
// row for the output).
std::vector<QueryBlock> query_blocks(const AttentionCall& call, int64_t mid_rows) {
  const Sequences& seqs = call.seqs;
  std::vector<QueryBlock> blocks;
  std::vector<int64_t> cost;
  for (int64_t b = 0; b < seqs.count(); ++b) {
    const int64_t len_q = seqs.q_len(b);
    const int64_t bq = fwd_blocks(len_q, seqs.k_rows(b), mid_rows).bq;
    const SeqBand band = call.band.of(len_q, seqs.k_len(b));
    for (int64_t i0 = 0; i0 < len_q; i0 += bq) {
      const int64_t m = std::min(bq, len_q - i0);
      blocks.push_back({b, i0});
      cost.push_back(m * (band.keys_of_rows(i0, i0 + m).size() + 1));
    }
  }
  return costliest_first(blocks, cost);
}

template <typename T, typename OutT>
void attention_fwd(const AttentionCall& call, RowView<const OutT> q, RowView<const OutT> k, RowView<const OutT> v,
                   RowView<OutT> out, RowView<float> lse) {
  using Dom = SoftmaxDomain<T>;
  const Sequences& seqs = call.seqs;
  const Variants& var = call.var;
  const int64_t H = call.heads, G = H / call.kv_heads, D = call.head_dim;
  // bf16 inputs on a CPU with AVX512-BF16: both products on bf16 operands (bf16_dot.h),
  // P rounded to bf16 for P V as the GPU kernels do; otherwise tiles widened to T.
  const bool dot = std::is_same_v<OutT, c10::BFloat16> && D % 2 == 0 && bf16dot::available();
  const bool fast = !dot && fast_products<T>();
  // The exponentials on f32_dot's vector kernels wherever they run (also under the bf16
  // products: B1 H8 S2048 D64 bf16 forward on 2 AMX Xeon cores 566 -> 599 GFLOP/s).
  const bool vector_exp = std::is_same_v<T, float> && f32dot::available();
  const int64_t mid_rows = mid_query_rows(call, dot, fast);
  const std::vector<QueryBlock> blocks = query_blocks(call, mid_rows);
  const auto [bq_max, bk_max] = fwd_blocks(seqs.max_q_len(), seqs.max_k_rows(), mid_rows);
  const T c = score_mult<T>(var, call.scale);
  const T keep_scale = static_cast<T>(var.keep_scale);
  const T neg_inf = -std::numeric_limits<T>::infinity();

  const int64_t kp_ld = bf16dot::packed_ld(bk_max), vp_ld = bf16dot::packed_ld(D);
  const int64_t p_ld = dot ? 2 * f32dot::spread_ld((bk_max + 1) / 2) : bk_max + (bk_max & 1);
  const KeysTransposed keys_t = transpose_keys<T, OutT>(call, k, fast);
  // Each row's max score straight from the product's registers, a pass over S less
  // (B1 H8 fp32 forward on Zen 3: D64 2.5-7% faster at S2048, 2% at S512; D80 2%;
  // S2048 D128 within the noise, where the pass was 1.4% of the time), where the max
  // of the raw scores times c is that of the scaled ones: no softcap between them,
  // and c > 0 (rounding is monotonic, so the two agree bit for bit).
  // So do the AMX products (amx::gemm's row_max).
  const bool amx_products = dot && amx::available();
  const bool max_in_product = (fast || amx_products) && var.softcap <= 0 && c > T(0);

  const PackedKV packed_kv = pack_keys_values<OutT>(call, k, v, amx_products);

  const int64_t tasks = static_cast<int64_t>(blocks.size()) * H;
  TaskQueue queue(tasks);
  at::parallel_for(0, workers(tasks), 1, [&](int64_t, int64_t) {
    constexpr bool widen = !std::is_same_v<T, OutT>;
    Scratch<T> sbuf(bq_max * (dot ? f32dot::spread_ld(bk_max) : bk_max)), acc(bq_max * D), mrow(bq_max), lrow(bq_max);
    Scratch<T> smax(max_in_product ? bq_max : 0);
    const int64_t ld_own = row_ld(D);
    Scratch<T> qbuf(widen && !dot ? bq_max * ld_own : 0), kbuf(widen && !dot && !keys_t.ready() ? bk_max * ld_own : 0);
    Scratch<T> vbuf(copies_rows<T, OutT>(v.ld(), fast) ? bk_max * ld_own : 0);
    Scratch<uint32_t> kpack(dot ? D / 2 * kp_ld : 0), vpack(dot ? (bk_max + 1) / 2 * vp_ld : 0);
    Scratch<c10::BFloat16> pbuf(dot ? bq_max * p_ld : 0);
    Scratch<uint8_t> keep(var.dropout ? bk_max + 8 : 0);
    for (int64_t task; queue.next(task);) {
      const QueryBlock blk = blocks[task / H];
      const int64_t h = task % H, b = blk.seq, hk = h / G, bh = b * H + h;
      const int64_t len_q = seqs.q_len(b), q0 = seqs.q_start(b), k0 = seqs.k_start(b);
      const auto [bq, bk] = fwd_blocks(len_q, seqs.k_rows(b), mid_rows);
      const int64_t i0 = blk.i0, m = std::min(bq, len_q - i0);
      // On the bf16 products, S and P rows an odd number of cache lines apart (spread_ld):
      // a 1-2 KiB stride crowded the AMX tiles' rows into a few L1 sets (B1 H8 bf16
      // forward, 2 AMX Xeon cores, alternating calls: S512 D128 1.42 -> 1.32 ms, S2048
      // D64 12.0 -> 10.9). The fp32 tiles showed no difference (same machine, S512 and
      // S2048, D64 and D128, 16 rounds in shuffled order: within 2%).
      const int64_t lds = dot ? f32dot::spread_ld(bk) : bk;  // S's row stride
      const SeqBand band = call.band.of(len_q, seqs.k_len(b));
      int64_t ldq = 0, ldk = 0, ldv;
      const T* Q = dot ? nullptr : tile_rows<T>(q.at(q0 + i0, h), q.ld(), m, D, qbuf.data(), ldq);
      const Span keys = band.keys_of_rows(i0, i0 + m);

      // A sink is a key of score sink[h] and no value: the running max and sum start from it.
      const T sink = sink_dom<T>(var, h);
      // Whether acc holds sums yet: the block's first P V product overwrites it instead
      // of adding to zeros, and there is nothing to rescale before it (the fill and the
      // scaling were 1.5% of the B1 H8 S512 D128 bf16 forward on AMX).
      bool acc_live = false;
      std::fill(mrow.data(), mrow.data() + m, sink);
      std::fill(lrow.data(), lrow.data() + m, sink == neg_inf ? T(0) : Dom::exp(sink - sink));
      for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += bk) {
        const int64_t n = std::min(bk, keys.hi - j0);
        T* S = sbuf.data();
        if constexpr (std::is_same_v<OutT, c10::BFloat16>) {
          if (dot) {
            if (packed_kv.ready()) {
              amx::gemm(m, n, D / 2, q.at(q0 + i0, h), q.ld(), packed_kv.kt_of(b, hk) + j0, packed_kv.ld, S, lds,
                        false, max_in_product ? smax.data() : nullptr);
            } else if (amx_products) {
              bf16dot::pack_transposed(k.at(k0 + j0, hk), k.ld(), n, D / 2, kpack.data(), kp_ld);
              amx::gemm(m, n, D / 2, q.at(q0 + i0, h), q.ld(), kpack.data(), kp_ld, S, lds, false,
                        max_in_product ? smax.data() : nullptr);
            } else {
              bf16dot::pack_transposed(k.at(k0 + j0, hk), k.ld(), n, D / 2, kpack.data(), kp_ld);
              bf16dot::gemm(m, n, D / 2, q.at(q0 + i0, h), q.ld(), 2, kpack.data(), kp_ld, S, lds, false);
            }
          }
        }
        if (!dot) {
          if (keys_t.ready()) {  // the fast path: K^T's panels
            scores_from_panels<T>(keys_t, m, n, D, Q, ldq, b, hk, j0, S, lds, max_in_product ? smax.data() : nullptr);
          } else {  // K's rows through BLAS
            const T* K = tile_rows<T>(k.at(k0 + j0, hk), k.ld(), n, D, kbuf.data(), ldk);
            tile_abt<T>(false, m, n, D, Q, ldq, K, ldk, nullptr, 0, S, lds);
          }
        }
        // bf16 products: V packed first, since whether it is finite decides how P is made.
        bool v_finite = false;
        const uint32_t* vp = vpack.data();
        if constexpr (std::is_same_v<OutT, c10::BFloat16>) {
          if (packed_kv.ready() && j0 % 2 == 0 && packed_kv.v_all_finite(b, hk)) {
            vp = packed_kv.v_of(b, hk) + j0 / 2 * vp_ld;
            v_finite = true;
          } else if (dot) {
            v_finite = bf16dot::pack_row_pairs(v.at(k0 + j0, hk), v.ld(), n, D, vpack.data(), vp_ld);
          }
        }
        // Without dropout (which zeroes P after the sum has taken it), the exponentials
        // write P in bf16 for P V themselves (exp_to_bf16), a pass over the tile less. A
        // V that is not finite keeps P in S for the per-row products below.
        const bool p_direct = dot && v_finite && !var.dropout;
        const int64_t n_even = n + (n & 1);  // P's rows are whole pairs
        bool hidden_pairs = false;
        for (int64_t r = 0; r < m; ++r) {
          T* row = S + r * lds;
          c10::BFloat16* prow = p_direct ? pbuf.data() + r * p_ld : nullptr;
          const Span vis = band.visible(i0 + r, j0, n);
          const int64_t nv = vis.size();
          hidden_pairs |= nv < n;
          if (nv > 0) {
            T* x = row + vis.lo;
            if (var.softcap > 0) softcap_scores<T>(var, call.scale, x, nv, nullptr);
            // The max may drop a NaN score; the sum keeps it (exp(NaN) = NaN), so
            // l and with it the row's output and lse become NaN all the same.
            const T tile_max = max_in_product && nv == n ? smax[r] * c : Dom::max(x, nv, c);
            const T m_new = std::max(mrow[r], tile_max);
            // While every visible score so far is -inf, exponentiate against 0:
            // exp(-inf - 0) = 0 keeps l = 0, where exp(-inf + inf) would be NaN
            // and poison the later tiles. +inf and NaN maxima stay: they must give NaN.
            const T m_use = m_new == neg_inf ? T(0) : m_new;
            const T alpha = Dom::exp(mrow[r] - m_use);  // 0 on the row's first visible tile (without a sink)
            const T sum = p_direct ? exp_to_bf16(x, nv, c, m_use, prow + vis.lo)
                                   : Dom::exp_sum(x, nv, c, m_use, vector_exp);
            lrow[r] = lrow[r] * alpha + sum;
            mrow[r] = m_new;
            if (acc_live && alpha != T(1)) fa::scale_row(acc.data() + r * D, D, alpha);
            if (var.dropout) fa::apply_keep(x, keep_of(var, bh, i0 + r, j0 + vis.lo, nv, keep.data()), nv, keep_scale);
            if (p_direct) {
              std::fill(prow, prow + vis.lo, c10::BFloat16(0.0f));
              std::fill(prow + vis.hi, prow + n_even, c10::BFloat16(0.0f));
            } else {
              fill_zero(row, vis.lo);
              fill_zero(row + vis.hi, n - vis.hi);
            }
          } else if (p_direct) {
            std::fill(prow, prow + n_even, c10::BFloat16(0.0f));
          } else {
            fill_zero(row, n);
          }
        }
        if constexpr (std::is_same_v<OutT, c10::BFloat16>) {
          if (dot && (v_finite || !hidden_pairs)) {
            if (!p_direct) bf16dot::round_rows(S, lds, m, n, pbuf.data(), p_ld);
            bf16dot::gemm(m, D, (n + 1) / 2, pbuf.data(), p_ld, 2, vp, vp_ld, acc.data(), D, acc_live);
            acc_live = true;
            continue;
          }
        }
        // In place unless widened, or rows that crowd the L1 (a copy per tile costs less
        // than it saves: B1 H8 S2048 D128 [B,S,H,D] fp32 125.8 -> 109.5 ms, [B,H,S,D]
        // 107.9 -> 106.1 on Zen 3). Per tile, not once per call: the copy just made is
        // in L2 for P V, and one spaced copy of V before the tasks ran 1-2% slower
        // (Zen 3, S2048 D128, 3 x 31 alternating rounds).
        const T* V = tile_rows<T>(v.at(k0 + j0, hk), v.ld(), n, D, vbuf.data(), ldv, fast);
        if (!hidden_pairs || all_finite(V, n, D, ldv)) {
          tile_ab_acc(fast, false, m, D, n, T(1), S, lds, V, ldv, acc.data(), D, acc_live);
        } else {
          if (!acc_live) fill_zero(acc.data(), m * D);
          for (int64_t r = 0; r < m; ++r) {
            const Span vis = band.visible(i0 + r, j0, n);
            if (vis.size() > 0)
              gemm_rm<T>(false, false, 1, D, vis.size(), T(1), S + r * lds + vis.lo, lds, V + vis.lo * ldv, ldv, T(1),
                         acc.data() + r * D, D);
          }
        }
        acc_live = true;
      }
      if (!acc_live) fill_zero(acc.data(), m * D);  // no key tile: every row is empty (written as 0 below)
      for (int64_t r = 0; r < m; ++r) {
        const int64_t g = q0 + i0 + r;
        OutT* dst = out.at(g, h);
        float* lse_out = lse.at(g, h);
        if (band.empty_row(i0 + r)) {  // the row sees no key: only the sink, if any
          std::fill(dst, dst + D, static_cast<OutT>(0));
          *lse_out = var.sinks ? var.sinks[h] : -std::numeric_limits<float>::infinity();
        } else {
          // l >= 1 when the scores are finite (the max contributes exp(0) = 1). l is
          // NaN after a NaN or +inf score, and 0 when all visible scores are -inf
          // (and there is no sink): then 0 * (1 / 0) makes the output NaN, and the lse is NaN too.
          store_output_row(dst, acc.data() + r * D, D, T(1) / lrow[r], dot);
          *lse_out = lrow[r] > T(0) ? Dom::to_lse(mrow[r], lrow[r]) : std::numeric_limits<float>::quiet_NaN();
        }
      }
    }
  });
}

// ----------------------------------------------------------------------- backward

// Per-(row, head) values of the backward, [H][flat query rows].
template <typename T>
struct RowValues {
  T* p;
  int64_t rows;  // flat query rows of the call
  T* of(int64_t h, int64_t g) const { return p + h * rows + g; }
};

// The saved lse is float32 (the schema's), too coarse for a float64 backward: P =
// exp(s - lse) would carry its ~1e-7 relative error into every gradient. For
// double, refine it once per row, lse += log(sum_j exp(s_ij - lse) + exp(sink - lse)),
// which costs one extra Q K^T pass on the correctness path only.
template <typename T>
void refine_lse(const AttentionCall& call, RowView<const T> q, RowView<const T> k, RowValues<T> lse_dom) {
  using Dom = SoftmaxDomain<T>;
  const Sequences& seqs = call.seqs;
  const Variants& var = call.var;
  const int64_t H = call.heads, G = H / call.kv_heads, D = call.head_dim;
  const std::vector<QueryBlock> blocks = query_blocks(call, kBlasMidRows);
  const auto [bq_max, bk_max] = fwd_blocks(seqs.max_q_len(), seqs.max_k_rows());
  const T c = score_mult<T>(var, call.scale);
  const int64_t tasks = static_cast<int64_t>(blocks.size()) * H;
  TaskQueue queue(tasks);
  at::parallel_for(0, workers(tasks), 1, [&](int64_t, int64_t) {
    Scratch<T> sbuf(bq_max * bk_max), sums(bq_max);
    for (int64_t task; queue.next(task);) {
      const QueryBlock blk = blocks[task / H];
      const int64_t h = task % H, b = blk.seq;
      const int64_t len_q = seqs.q_len(b), q0 = seqs.q_start(b), k0 = seqs.k_start(b);
      const auto [bq, bk] = fwd_blocks(len_q, seqs.k_rows(b));
      const int64_t i0 = blk.i0, m = std::min(bq, len_q - i0);
      const SeqBand band = call.band.of(len_q, seqs.k_len(b));
      T* L = lse_dom.of(h, q0 + i0);
      const Span keys = band.keys_of_rows(i0, i0 + m);
      const T sink = sink_dom<T>(var, h);
      for (int64_t r = 0; r < m; ++r)
        sums[r] = sink == -std::numeric_limits<T>::infinity() || std::isinf(L[r]) ? T(0) : Dom::exp(sink - L[r]);
      for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += bk) {
        const int64_t n = std::min(bk, keys.hi - j0);
        gemm_rm<T>(false, true, m, n, D, T(1), q.at(q0 + i0, h), q.ld(), k.at(k0 + j0, h / G), k.ld(), T(0),
                   sbuf.data(), bk);
        for (int64_t r = 0; r < m; ++r) {
          const Span vis = band.visible(i0 + r, j0, n);
          if (vis.size() == 0 || std::isinf(L[r])) continue;
          T* x = sbuf.data() + r * bk + vis.lo;
          if (var.softcap > 0) softcap_scores<T>(var, call.scale, x, vis.size(), nullptr);
          sums[r] += Dom::exp_sum(x, vis.size(), c, L[r], false);  // double only
        }
      }
      for (int64_t r = 0; r < m; ++r)
        if (sums[r] > T(0)) L[r] += std::log(sums[r]);
    }
  });
}

// d sink[h] = -sum over all rows of P_sink(h, row) * Delta(h, row), P_sink = exp(sink[h] - lse):
// in double, in a fixed order (flat rows: sequence by sequence).
template <typename T>
void sink_grad(const AttentionCall& call, RowValues<T> lse_dom, RowValues<T> delta, float* grad_sinks) {
  using Dom = SoftmaxDomain<T>;
  const int64_t rows = lse_dom.rows;
  at::parallel_for(0, call.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      const T sink = sink_dom<T>(call.var, h);
      const T* L = lse_dom.of(h, 0);
      const T* Dl = delta.of(h, 0);
      double acc = 0;
      if (sink != -std::numeric_limits<T>::infinity()) {
        for (int64_t g = 0; g < rows; ++g)
          acc -= static_cast<double>(Dom::exp(sink - L[g])) * static_cast<double>(Dl[g]);
      }
      grad_sinks[h] = static_cast<float>(acc);
    }
  });
}

// A key chunk of one sequence: the backward's unit of work, once per query head.
struct KeyChunk {
  int64_t seq, chunk;
};

// How the backward splits its work: key chunks per sequence, where the dQ partials
// of chunks >= 1 live, and the units costliest first.
struct BwdPlan {
  std::vector<int64_t> chunks;      // per sequence, >= 1
  std::vector<int64_t> extra_off;   // per sequence: its chunks' dQ partials [chunk - 1][H][len_q][D]
  int64_t extra_size = 0;
  std::vector<KeyChunk> units;
};

// Key rows [lo, hi) of chunk ch of a sequence: whole key blocks, split evenly.
Span key_chunk(int64_t k_rows, const BwdBlocks& blk, int64_t ch, int64_t chunks) {
  return Span{std::min(k_rows, ch * blk.nkb / chunks * blk.bk), std::min(k_rows, (ch + 1) * blk.nkb / chunks * blk.bk)};
}

BwdPlan backward_plan(const AttentionCall& call) {
  const Sequences& seqs = call.seqs;
  const int64_t B = seqs.count(), H = call.heads, D = call.head_dim;
  BwdPlan plan;
  plan.chunks.assign(B, 1);
  plan.extra_off.assign(B, 0);
  // A sequence's share of the work, len_q * k_rows, against the whole call's: chunks =
  // ceil(kBwdTargetTasks * share / H) (exact in 128-bit integers), at most one per key block.
  __int128 total = 0;
  for (int64_t b = 0; b < B; ++b) total += static_cast<__int128>(seqs.q_len(b)) * seqs.k_rows(b);
  std::vector<KeyChunk> units;
  std::vector<int64_t> cost;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len_q = seqs.q_len(b), k_rows = seqs.k_rows(b);
    const BwdBlocks blk = bwd_blocks(len_q, k_rows);
    if (total > 0 && blk.nkb > 0) {
      const __int128 num = static_cast<__int128>(kBwdTargetTasks) * len_q * k_rows, den = total * H;
      plan.chunks[b] = std::clamp<int64_t>(static_cast<int64_t>((num + den - 1) / den), 1, blk.nkb);
    }
    plan.extra_off[b] = plan.extra_size;
    plan.extra_size += (plan.chunks[b] - 1) * H * len_q * D;
    const SeqBand band = call.band.of(len_q, seqs.k_len(b));
    const int64_t kend_max = len_q > 0 ? band.kend(len_q - 1) : 0;
    for (int64_t ch = 0; ch < plan.chunks[b]; ++ch) {
      const Span kv = key_chunk(k_rows, blk, ch, plan.chunks[b]);
      int64_t c = len_q + kv.size();  // zeroing its dQ, dK, dV rows
      for (int64_t j0 = kv.lo; j0 < std::min(kv.hi, kend_max); j0 += blk.bk) {
        const int64_t n = std::min({blk.bk, kv.hi - j0, kend_max - j0});
        c += band.rows_of_keys(j0, j0 + n).size() * n;
      }
      units.push_back({b, ch});
      cost.push_back(c);
    }
  }
  plan.units = costliest_first(units, cost);
  return plan;
}

template <typename T, typename OutT>
void attention_bwd(const AttentionCall& call, RowView<const OutT> q, RowView<const OutT> k, RowView<const OutT> v,
                   RowView<const OutT> o, RowView<const OutT> go, RowView<const float> lse,
                   const RowView<const float>* glse, RowView<OutT> gq, RowView<OutT> gk, RowView<OutT> gv,
                   float* grad_sinks) {
  using Dom = SoftmaxDomain<T>;
  constexpr bool widen = !std::is_same_v<T, OutT>;
  const Sequences& seqs = call.seqs;
  const Variants& var = call.var;
  const int64_t H = call.heads, Hkv = call.kv_heads, G = H / Hkv, D = call.head_dim;
  const int64_t Rq = seqs.q_rows_total(), Rk = seqs.k_rows_total();
  const T c = score_mult<T>(var, call.scale);
  const T scale = static_cast<T>(call.scale);
  const T keep_scale = static_cast<T>(var.keep_scale);
  const BwdPlan plan = backward_plan(call);
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // Our own [H][rows][row_ld(D)] buffers, addressed by flat row like the tensors.
  auto own_rows = [&](at::Tensor& buf, int64_t rows) {
    const int64_t ld = row_ld(D);
    buf = at::empty({H * rows * ld}, opts);
    return RowView<T>{buf.data_ptr<T>(), RowLayout::packed(rows * ld, ld)};
  };

  // bf16 inputs on a CPU with AVX512-BF16: the five products on bf16 operands
  // (bf16_dot.h), P and dS rounded to bf16 as the GPU kernels do. Per key block K and V
  // are packed for S and dP (keys as columns) and K for dQ (keys as pairs); per query
  // block Q and dO as pairs for dK and dV. The widened Q, dO and K stay for the
  // per-row fallback of tiles with hidden pairs and non-finite operands.
  const bool dot = std::is_same_v<OutT, c10::BFloat16> && D % 2 == 0 && bf16dot::available();
  const bool fast = !dot && fast_products<T>();  // K^T and V^T transposed per key block
  // On AMX, whose A tiles are rows of pairs, dV += P^T dO and dK += dS^T Q take P^T and
  // dS^T as such rows: the packed pairs transposed word by word (B1 H8 S2048 D128 bf16
  // forward + backward on 2 AMX Xeon cores: 136 -> 74 ms, SDPA 102-105 ms).
  const bool amx_products = dot && amx::available();

  // Q and dO in the compute type, read by every key block: copied once in the same
  // pass that computes Delta when widened (16-bit inputs) or when their rows crowd
  // the L1 (dK and dV read them down their rows, as tile_rows), else read in place.
  at::Tensor q_own_buf, go_own_buf;
  const bool q_copied = copies_rows<T, OutT>(q.ld(), fast), go_copied = copies_rows<T, OutT>(go.ld(), fast);
  const RowView<T> q_own = q_copied ? own_rows(q_own_buf, Rq) : RowView<T>{};
  const RowView<T> go_own = go_copied ? own_rows(go_own_buf, Rq) : RowView<T>{};
  // Delta = rowsum(dO * O) - grad_lse, and lse in the softmax domain, per (head, row).
  std::vector<T> delta_buf(H * Rq), lse_dom_buf(H * Rq);
  const RowValues<T> delta{delta_buf.data(), Rq}, lse_dom{lse_dom_buf.data(), Rq};
  at::parallel_for(0, H * Rq, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row / Rq, g = row % Rq;
      const OutT* a = go.at(g, h);
      const OutT* x = o.at(g, h);
      // In double even for float: Delta is subtracted from dP ~ |dO||V| to leave a
      // small dS, so its rounding error would be amplified into dQ and dK.
      double acc = 0;
      for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(a[d]) * static_cast<double>(x[d]);
      *delta.of(h, g) = static_cast<T>(acc - (glse ? static_cast<double>(*glse->at(g, h)) : 0.0));
      *lse_dom.of(h, g) = Dom::from_lse(*lse.at(g, h));
      if (q_copied) copy_row(q.at(g, h), q_own.at(g, h), D);
      if (go_copied) copy_row(a, go_own.at(g, h), D);
    }
  });
  // The copy where there is one (always, for widened inputs), else the input.
  auto in_compute_type = [](RowView<const OutT> in, const RowView<T>& own, bool copied) -> RowView<const T> {
    if (copied) return {own.p, own.layout};
    if constexpr (std::is_same_v<T, OutT>) return in;
    return {};
  };
  const RowView<const T> qv = in_compute_type(q, q_own, q_copied);
  const RowView<const T> gov = in_compute_type(go, go_own, go_copied);
  if constexpr (std::is_same_v<T, double>) refine_lse<T>(call, qv, k, lse_dom);
  if (var.sinks) sink_grad<T>(call, lse_dom, delta, grad_sinks);

  // Accumulators: straight into the outputs when no reduction or cast is needed.
  // dQ of chunk 0 goes to dq_main (the output itself unless widening), the other
  // chunks' to their partials; dK, dV per query head unless G == 1 and no widening.
  at::Tensor dq_buf, dq_extra_buf, dk_buf, dv_buf;
  RowView<T> dq_main = widen ? own_rows(dq_buf, Rq) : RowView<T>{reinterpret_cast<T*>(gq.p), gq.layout};
  T* dq_extra = nullptr;
  if (plan.extra_size > 0) {
    dq_extra_buf = at::empty({plan.extra_size}, opts);
    dq_extra = dq_extra_buf.data_ptr<T>();
  }
  const bool kv_direct = !widen && G == 1;
  RowView<T> dk_acc = kv_direct ? RowView<T>{reinterpret_cast<T*>(gk.p), gk.layout} : own_rows(dk_buf, Rk);
  RowView<T> dv_acc = kv_direct ? RowView<T>{reinterpret_cast<T*>(gv.p), gv.layout} : own_rows(dv_buf, Rk);

  const int64_t tasks = static_cast<int64_t>(plan.units.size()) * H;
  const auto [bq_max, bk_max, nkb_unused] = bwd_blocks(seqs.max_q_len(), seqs.max_k_rows());
  const int64_t kt_ld = bf16dot::packed_ld(bk_max), d_ld = bf16dot::packed_ld(D);
  const int64_t ft_ld = f32dot::spread_ld(f32dot::packed_ld(bk_max));
  const int64_t ds_ld = bk_max + (bk_max & 1);
  TaskQueue queue(tasks);
  at::parallel_for(0, workers(tasks), 1, [&](int64_t, int64_t) {
    const int64_t tile_max = bq_max * f32dot::spread_ld(bk_max);
    Scratch<T> pbuf(tile_max), dsbuf(tile_max), tbuf(var.softcap > 0 ? tile_max : 0);
    Scratch<T> kbuf(copies_rows<T, OutT>(k.ld(), fast) ? bk_max * row_ld(D) : 0);
    Scratch<T> vbuf(widen && !dot ? bk_max * row_ld(D) : 0);
    Scratch<uint32_t> ktpack(dot ? D / 2 * kt_ld : 0), vtpack(dot ? D / 2 * kt_ld : 0);
    Scratch<uint32_t> kpack(dot ? (bk_max + 1) / 2 * d_ld : 0), qpack(dot ? (bq_max + 1) / 2 * d_ld : 0),
        opack(dot ? (bq_max + 1) / 2 * d_ld : 0);
    Scratch<uint32_t> row_pairs(dot ? (bq_max + 1) / 2 * kt_ld : 0);
    const int64_t pt_ld = f32dot::packed_ld((bq_max + 1) / 2);  // words per row of the transposed pairs
    Scratch<uint32_t> pairs_t(amx_products ? bk_max * pt_ld : 0);
    Scratch<c10::BFloat16> ds16(dot ? bq_max * ds_ld : 0);
    Scratch<T> ktbuf(fast ? D * ft_ld : 0), vtbuf(fast ? D * ft_ld : 0);
    Scratch<uint8_t> keep(var.dropout ? bk_max + 8 : 0);
    for (int64_t task; queue.next(task);) {
      const KeyChunk unit = plan.units[task / H];
      const int64_t h = task % H, b = unit.seq, ch = unit.chunk, hk = h / G, bh = b * H + h;
      const int64_t len_q = seqs.q_len(b), k_rows = seqs.k_rows(b), q0 = seqs.q_start(b), k0 = seqs.k_start(b);
      const BwdBlocks blk = bwd_blocks(len_q, k_rows);
      const int64_t bq = blk.bq, bk = blk.bk;
      // P and dS rows an odd number of cache lines apart: dV and dK read them down
      // their columns (P^T, dS^T), where a 1 KiB stride (bk = 256) put every step in
      // 4 of the L1's 64 sets (that product ran at 75 GFLOP/s a core on Zen 3, 87 with
      // the padding; Q K^T runs at 93).
      const int64_t ldp = f32dot::spread_ld(bk);
      const Span kv = key_chunk(k_rows, blk, ch, plan.chunks[b]);
      const SeqBand band = call.band.of(len_q, seqs.k_len(b));
      const T* Lrow = lse_dom.of(h, q0);
      const T* Drow = delta.of(h, q0);
      const float* lse_row = lse.at(q0, h);
      const int64_t lse_ld = lse.ld();
      T* dQ = ch == 0 ? dq_main.at(q0, h) : dq_extra + plan.extra_off[b] + ((ch - 1) * H + h) * len_q * D;
      const int64_t ldq_acc = ch == 0 ? dq_main.ld() : D;
      T* dK = dk_acc.at(k0, h);
      T* dV = dv_acc.at(k0, h);
      const int64_t ldk_acc = dk_acc.ld(), ldv_acc = dv_acc.ld();
      fill_zero_rows(dQ, len_q, D, ldq_acc);
      fill_zero_rows(dK + kv.lo * ldk_acc, kv.size(), D, ldk_acc);
      fill_zero_rows(dV + kv.lo * ldv_acc, kv.size(), D, ldv_acc);
      if (len_q == 0) continue;
      const int64_t kend_max = band.kend(len_q - 1);
      for (int64_t j0 = kv.lo; j0 < std::min(kv.hi, kend_max); j0 += bk) {
        const int64_t n = std::min({bk, kv.hi - j0, kend_max - j0});
        const Span rows = band.rows_of_keys(j0, j0 + n);  // skip the key block when no row sees it
        if (rows.size() == 0) continue;
        int64_t ldk, ldv = 0;
        const T* K = tile_rows<T>(k.at(k0 + j0, hk), k.ld(), n, D, kbuf.data(), ldk, fast);  // dQ's B
        const T* V = dot ? nullptr : tile_rows<T>(v.at(k0 + j0, hk), v.ld(), n, D, vbuf.data(), ldv);
        if (fast) {
          transpose_tile(K, ldk, n, D, ktbuf.data(), ft_ld);
          transpose_tile(V, ldv, n, D, vtbuf.data(), ft_ld);
        }
        bool k_finite = true;
        if constexpr (std::is_same_v<OutT, c10::BFloat16>) {
          if (dot) {
            bf16dot::pack_transposed(k.at(k0 + j0, hk), k.ld(), n, D / 2, ktpack.data(), kt_ld);
            bf16dot::pack_transposed(v.at(k0 + j0, hk), v.ld(), n, D / 2, vtpack.data(), kt_ld);
            k_finite = bf16dot::pack_row_pairs(k.at(k0 + j0, hk), k.ld(), n, D, kpack.data(), d_ld);
          }
        }
        for (int64_t i0 = rows.lo; i0 < rows.hi; i0 += bq) {
          const int64_t m = std::min(bq, rows.hi - i0);
          const T* Q = qv.at(q0 + i0, h);
          const T* dO = gov.at(q0 + i0, h);
          const int64_t ldq = qv.ld(), ldo = gov.ld();
          T* P = pbuf.data();
          T* dS = dsbuf.data();
          if constexpr (std::is_same_v<OutT, c10::BFloat16>) {
            if (dot) {
              bf16dot::gemm(m, n, D / 2, q.at(q0 + i0, h), q.ld(), 2, ktpack.data(), kt_ld, P, ldp, false);
              bf16dot::gemm(m, n, D / 2, go.at(q0 + i0, h), go.ld(), 2, vtpack.data(), kt_ld, dS, ldp, false);
            }
          }
          if (!dot) {
            tile_abt(fast, m, n, D, Q, ldq, K, ldk, ktbuf.data(), ft_ld, P, ldp);
            tile_abt(fast, m, n, D, dO, ldo, V, ldv, vtbuf.data(), ft_ld, dS, ldp);
          }
          // Keys [j0 + lo, j0 + hi) of the tile are the ones row i0 + r sees.
          auto visible = [&](int64_t r) {
            // lse = -inf: a row that sees no key (or a float64 lse below float32's range).
            return std::isinf(lse_row[(i0 + r) * lse_ld]) ? Span{0, 0} : band.visible(i0 + r, j0, n);
          };
          bool hidden_pairs = false;
          for (int64_t r = 0; r < m; ++r) {
            const int64_t i = i0 + r;
            const Span vis = visible(r);
            const int64_t nv = vis.size();
            hidden_pairs |= nv < n;
            T* prow = P + r * ldp;
            T* dsrow = dS + r * ldp;
            if (nv > 0) {
              T* p = prow + vis.lo;
              T* ds = dsrow + vis.lo;
              T* t = var.softcap > 0 ? tbuf.data() + r * ldp + vis.lo : nullptr;
              if (t) softcap_scores<T>(var, call.scale, p, nv, t);
              Dom::exp_rows(p, nv, c, Lrow[i], fast);
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
          const bool whole_tile =
              !hidden_pairs || (all_finite(Q, m, D, ldq) && all_finite(dO, m, D, ldo) && k_finite &&
                                (dot || all_finite(K, n, D, ldk)));
          if constexpr (std::is_same_v<OutT, c10::BFloat16>) {
            if (dot && whole_tile) {
              // P^T and dS^T: P and dS packed in pairs of rows (row_pairs), read transposed,
              // or on AMX transposed into rows of pairs first (pairs_t).
              const int64_t pairs = (m + 1) / 2;
              auto add_transposed_times = [&](const uint32_t* b, T* dst, int64_t ld_dst) {
                if (amx_products) {
                  f32dot::pack_transposed(reinterpret_cast<const float*>(row_pairs.data()), kt_ld, pairs, n,
                                          reinterpret_cast<float*>(pairs_t.data()), pt_ld);
                  amx::gemm(n, D, pairs, reinterpret_cast<const c10::BFloat16*>(pairs_t.data()), 2 * pt_ld, b, d_ld,
                            dst, ld_dst, true);
                } else {
                  bf16dot::gemm(n, D, pairs, reinterpret_cast<const c10::BFloat16*>(row_pairs.data()), 2, 2 * kt_ld, b,
                                d_ld, dst, ld_dst, true);
                }
              };
              bf16dot::round_row_pairs(P, ldp, m, n, row_pairs.data(), kt_ld);
              bf16dot::pack_row_pairs(go.at(q0 + i0, h), go.ld(), m, D, opack.data(), d_ld);
              add_transposed_times(opack.data(), dV + j0 * ldv_acc, ldv_acc);
              for (int64_t r = 0; r < m; ++r) fa::scale_row(dS + r * ldp, n, scale);
              bf16dot::round_row_pairs(dS, ldp, m, n, row_pairs.data(), kt_ld);
              bf16dot::pack_row_pairs(q.at(q0 + i0, h), q.ld(), m, D, qpack.data(), d_ld);
              add_transposed_times(qpack.data(), dK + j0 * ldk_acc, ldk_acc);
              bf16dot::round_rows(dS, ldp, m, n, ds16.data(), ds_ld);
              bf16dot::gemm(m, D, (n + 1) / 2, ds16.data(), ds_ld, 2, kpack.data(), d_ld, dQ + i0 * ldq_acc, ldq_acc,
                            true);
              continue;
            }
          }
          if (whole_tile) {
            tile_ab_acc(fast, true, n, D, m, T(1), P, ldp, dO, ldo, dV + j0 * ldv_acc, ldv_acc);
            tile_ab_acc(fast, true, n, D, m, scale, dS, ldp, Q, ldq, dK + j0 * ldk_acc, ldk_acc);
            tile_ab_acc(fast, false, m, D, n, scale, dS, ldp, K, ldk, dQ + i0 * ldq_acc, ldq_acc);
          } else {
            for (int64_t r = 0; r < m; ++r) {
              const Span vis = visible(r);
              const int64_t nv = vis.size();
              if (nv == 0) continue;
              const int64_t lo = vis.lo;
              gemm_rm<T>(true, false, nv, D, 1, T(1), P + r * ldp + lo, ldp, dO + r * ldo, ldo, T(1),
                         dV + (j0 + lo) * ldv_acc, ldv_acc);
              gemm_rm<T>(true, false, nv, D, 1, scale, dS + r * ldp + lo, ldp, Q + r * ldq, ldq, T(1),
                         dK + (j0 + lo) * ldk_acc, ldk_acc);
              gemm_rm<T>(false, false, 1, D, nv, scale, dS + r * ldp + lo, ldp, K + lo * ldk, ldk, T(1),
                         dQ + (i0 + r) * ldq_acc, ldq_acc);
            }
          }
        }
      }
    }
  });

  // Fixed-order reductions (and the cast to the output dtype): dQ = chunk 0 + chunk 1 + ...
  if (widen || plan.extra_size > 0) {
    at::parallel_for(0, H * Rq, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t h = row / Rq, g = row % Rq, b = seqs.seq_of_q_row(g);
        const int64_t len_q = seqs.q_len(b), i = g - seqs.q_start(b);
        const int64_t chunks = plan.chunks[b];
        const T* main = dq_main.at(g, h);
        const T* extra = chunks > 1 ? dq_extra + plan.extra_off[b] + h * len_q * D + i * D : nullptr;
        const int64_t extra_step = H * len_q * D;  // from one chunk's partial to the next
        OutT* dst = gq.at(g, h);
        for (int64_t d = 0; d < D; ++d) {
          T acc = main[d];
          for (int64_t ch = 1; ch < chunks; ++ch) acc += extra[(ch - 1) * extra_step + d];
          dst[d] = static_cast<OutT>(acc);
        }
      }
    });
  }
  if (!kv_direct) {  // dK, dV of kv head hk = the sum over its query heads hk * G .. hk * G + G - 1
    at::parallel_for(0, Hkv * Rk, 64, [&](int64_t begin, int64_t end) {
      std::vector<T> ak(D), av(D);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t hk = row / Rk, g = row % Rk;
        std::fill(ak.begin(), ak.end(), T(0));
        std::fill(av.begin(), av.end(), T(0));
        for (int64_t j = 0; j < G; ++j) {  // 0 + head 0 + head 1 + ..., per element
          const T* a = dk_acc.at(g, hk * G + j);
          const T* x = dv_acc.at(g, hk * G + j);
          for (int64_t d = 0; d < D; ++d) {
            ak[d] += a[d];
            av[d] += x[d];
          }
        }
        OutT* dk = gk.at(g, hk);
        OutT* dv = gv.at(g, hk);
        for (int64_t d = 0; d < D; ++d) {
          dk[d] = static_cast<OutT>(ak[d]);
          dv[d] = static_cast<OutT>(av[d]);
        }
      }
    });
  }
}

// The compute type: double for double, float for float, bf16 and half.
template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace

void flash_forward(const AttentionCall& call, const Rows& q, const Rows& k, const Rows& v, const Rows& out,
                   const Rows& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.t.scalar_type(), "flash_attention_fwd_cpu", [&] {
    attention_fwd<compute_t<scalar_t>, scalar_t>(call, view<const scalar_t>(q), view<const scalar_t>(k),
                                                 view<const scalar_t>(v), view<scalar_t>(out), view<float>(lse));
  });
}

void flash_backward(const AttentionCall& call, const Rows& q, const Rows& k, const Rows& v, const Rows& out,
                    const Rows& grad_out, const Rows& lse, const Rows* grad_lse, const Rows& grad_q,
                    const Rows& grad_k, const Rows& grad_v, float* grad_sinks) {
  const Sequences& seqs = call.seqs;
  if (seqs.q_rows_total() == 0 || seqs.k_rows_total() == 0 || call.heads == 0) {
    // No query or no key: nothing flows through q, k, v. Without keys every row's
    // lse is its sink: d sink = the sum of grad_lse over the rows.
    for (const Rows* g : {&grad_q, &grad_k, &grad_v}) g->t.zero_();
    if (grad_sinks) {
      for (int64_t h = 0; h < call.heads; ++h) {
        double acc = 0;
        if (grad_lse) {
          const RowView<const float> gl = view<const float>(*grad_lse);
          for (int64_t g = 0; g < seqs.q_rows_total(); ++g) acc += *gl.at(g, h);
        }
        grad_sinks[h] = static_cast<float>(acc);
      }
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.t.scalar_type(), "flash_attention_bwd_cpu", [&] {
    const RowView<const float> glse = grad_lse ? view<const float>(*grad_lse) : RowView<const float>{};
    attention_bwd<compute_t<scalar_t>, scalar_t>(
        call, view<const scalar_t>(q), view<const scalar_t>(k), view<const scalar_t>(v), view<const scalar_t>(out),
        view<const scalar_t>(grad_out), view<const float>(lse), grad_lse ? &glse : nullptr, view<scalar_t>(grad_q),
        view<scalar_t>(grad_k), view<scalar_t>(grad_v), grad_sinks);
  });
}

}  // namespace tfkernels::cpu
