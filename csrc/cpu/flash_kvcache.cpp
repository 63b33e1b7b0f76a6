// CPU attention over a KV cache (flash_attention_kvcache, csrc/ops.cpp): inference
// and decode.
//
// 1. Append: the new k, v rows are written into the cache (dense or paged) at
//    cache_seqlens[b] .. + Snew, k rotated first when rotary_cos/sin are given. All
//    values are checked before anything is written, so a bad call leaves the cache as it was.
// 2. Attention: sequence b's query rows attend over its cache_seqlens[b] + Snew keys,
//    causal and window bottom-right aligned (flash_attention_band.h). The work is
//    cut into tasks by kvcache_plan.h: (sequence, kv head, query block, key split);
//    a decode call runs the kv heads of a (sequence, query block, key split) together,
//    key tile by key tile (attention() says why).
//    A task loads the query rows of all G query heads of its kv head (rotated, in the
//    compute type), walks its key range in tiles (S = Q K^T, online softmax, acc +=
//    P V, as csrc/cpu/flash_attention.cpp's forward), and writes either the final
//    rows or an unnormalised partial (acc, running max, running sum). Up to
//    kRowLoopMaxRows rows (decode) the products are the row loops of kvcache_rows.h,
//    which read each cache row once for all rows; more rows go through BLAS GEMMs.
// 3. Merge: the partials of a split item are combined in split order (the sink, if
//    any, joins split 0), which makes the result independent of the threads.
//
// Compute: float for float/bf16/half, double for double. Cache tiles are read in place
// when they are already in the compute type and evenly strided (a dense cache, or a
// tile inside one block); otherwise they are gathered and widened into a per-thread
// buffer, which for 16-bit caches is the conversion the GEMM needs anyway.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <vector>

#include "alloc.h"
#include "kvcache_args.h"
#include "cpu/blas.h"
#include "cpu/f32_dot.h"
#include "cpu/flash_attention_band.h"
#include "cpu/flash_attention_softmax.h"
#include "cpu/kvcache_layout.h"
#include "cpu/kvcache_plan.h"
#include "cpu/kvcache_rows.h"
#include "cpu/tile_utils.h"

namespace tfkernels::cpu {
namespace {

using fa::SoftmaxDomain;
using kvcache::CacheView;
using kvcache::Plan;
using kvcache::Rotary;
using kvcache::RowsView;
using tile::Scratch;

// Keys per tile: S is rows x kKeyTile; a 16-bit K or V tile widened is kKeyTile x D floats.
constexpr int64_t kKeyTile = 256;

template <typename In>
struct Inputs {
  RowsView<In> q, k_new, v_new;
  CacheView<In> k_cache, v_cache;
  Rotary<In> rotary;
  const int32_t* cache_seqlens;
  In* out;       // [B, Sq, H, D] contiguous
  float* lse;    // [B, H, Sq]
};

struct Attrs {
  double scale, softcap;  // softcap 0 = off
  const float* sinks;     // [H] or nullptr
};

// ------------------------------------------------------------------------ append

template <typename T, typename In>
void append_new_rows(const KvcacheShape& s, const Inputs<In>& in) {
  const int64_t Snew = s.seqlen_new, Hkv = s.kv_heads, D = s.head_dim;
  const int64_t rows = s.batch * Snew * Hkv;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(s.rotary_dim > 0 ? D : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t hk = r % Hkv, t = (r / Hkv) % Snew, b = r / (Hkv * Snew);
      const int64_t pos = in.cache_seqlens[b] + t;
      const In* k = in.k_new.row(b, t, hk);
      In* kd = in.k_cache.row(b, pos, hk);
      if (s.rotary_dim > 0) {
        kvcache::rotate_row<T>(k, buf.data(), D, in.rotary, pos);
        for (int64_t d = 0; d < D; ++d) kd[d] = static_cast<In>(buf[d]);
      } else {
        std::copy(k, k + D, kd);
      }
      const In* v = in.v_new.row(b, t, hk);
      std::copy(v, v + D, in.v_cache.row(b, pos, hk));
    }
  });
}

// ---------------------------------------------------------------------- attention

// Rows [j0, j0 + n) of a cache head in the compute type T: in place when possible, else into buf (ld = D).
template <typename T, typename In>
const T* cache_tile(const CacheView<In>& c, int64_t b, int64_t hk, int64_t j0, int64_t n, int64_t D, T* buf,
                    int64_t& ld) {
  if constexpr (std::is_same_v<T, In>) {
    if (n <= 1 || (c.run(j0) >= n && c.s1 >= D)) {
      ld = n > 1 ? c.s1 : D;
      return c.row(b, j0, hk);
    }
  }
  for (int64_t r = 0; r < n; ++r) kvcache::widen_row(c.row(b, j0 + r, hk), buf + r * D, D);
  ld = D;
  return buf;
}

// The running state of a task's rows, and where it goes when the task ends.
template <typename T>
struct RowState {
  T* acc;  // [rows, D], unnormalised
  T* m;    // running max, in the softmax domain
  T* l;    // running sum
};

// Final output and lse of one row from its (acc, m, l). `empty`: the row sees no key.
template <typename T, typename In>
void finish_row(const T* acc, T m, T l, bool empty, const float* sink, int64_t D, In* out, float* lse) {
  if (empty) {  // only the sink, if any
    std::fill(out, out + D, static_cast<In>(0));
    *lse = sink ? *sink : -std::numeric_limits<float>::infinity();
    return;
  }
  // l >= 1 with finite scores; NaN after a NaN or +inf score; 0 when every visible score
  // is -inf without a sink, which makes the row NaN (as flash_attention).
  const T inv = T(1) / l;
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<In>(acc[d] * inv);
  *lse = l > T(0) ? SoftmaxDomain<T>::to_lse(m, l) : std::numeric_limits<float>::quiet_NaN();
}

template <typename T, typename In>
void attention(const KvcacheShape& s, const Attrs& attrs, const Band& band, const int64_t* lens, const Plan& plan,
               const Inputs<In>& in) {
  using Dom = SoftmaxDomain<T>;
  const int64_t H = s.heads, G = s.heads / s.kv_heads, Sq = s.seqlen_q, D = s.head_dim;
  const int64_t max_rows = G * plan.bq;
  const T c = attrs.softcap > 0 ? T(1) : Dom::score_mult(static_cast<T>(attrs.scale));
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const bool vector_exp = std::is_same_v<T, float> && f32dot::available();  // the softmax's exp2 (f32_exp.h)
  // Partials of split items: acc [slot, max_rows, D], m and l [slot, max_rows].
  std::vector<T> part_acc(plan.partials * max_rows * D), part_m(plan.partials * max_rows),
      part_l(plan.partials * max_rows);
  const int64_t n_tasks = static_cast<int64_t>(plan.tasks.size());

  // Decode (every item within the row loops): the tasks of the kv heads of one
  // (sequence, query block, key split) run as one group on one thread, tile by tile with
  // the heads inside, so that each tile's cache rows (one page each in a [B, S, Hkv, D]
  // cache: a head's D of them a page apart) are read by every head while their pages
  // are open and in the TLB, instead of once per head across the whole cache. B8 H32
  // Hkv8 S4096 D128 (256 MiB of cache) on 2 Xeon cores: fp32 12.8-13.3 -> 21.0-22.8
  // GB/s, bf16 14.8-15.4 -> 17.4-17.5 (torch reading the same tensors: 25-28 and 18-20);
  // B1 (in L3) fp32 16-19 -> 30-32, bf16 15 -> 17-18. Prefetching whole rows on the
  // first head's pass instead ran slower (bursts the fill buffers drop). Prefill (GEMM
  // tiles) keeps one task a group. A group has all kv heads unless that leaves threads
  // idle (num_splits = 1 with few sequences); then the largest divisor of Hkv that does
  // not. Results do not depend on it: each task sums the same tiles either way.
  const bool decode = max_rows <= kvcache::kRowLoopMaxRows;
  int64_t group = decode ? s.kv_heads : 1;
  while (group > 1 && (s.kv_heads % group != 0 || n_tasks / group < at::get_num_threads())) --group;
  // Keys per tile in a group: the tile's K rows of all heads in ~256 KiB, V's as many
  // (fp32 Hkv8 D128: 64 keys; with half that budget the B8 call above ran 5-10% slower,
  // with twice it the same).
  const int64_t key_tile =
      decode ? std::clamp<int64_t>(std::bit_floor(static_cast<uint64_t>(std::max<int64_t>(
                                       1, (int64_t{256} << 10) / (s.kv_heads * D * int64_t{sizeof(In)})))),
                                   16, kKeyTile)
             : kKeyTile;

  at::parallel_for(0, n_tasks / group, 1, [&](int64_t begin, int64_t end) {
    constexpr bool widen = !std::is_same_v<T, In>;
    Scratch<T> qbuf(group * max_rows * D), sbuf(max_rows * kKeyTile), own_acc(group * max_rows * D),
        own_m(group * max_rows), own_l(group * max_rows);
    const bool gather = (widen || s.paged) && max_rows > kvcache::kRowLoopMaxRows;
    Scratch<T> kbuf(gather ? kKeyTile * D : 0), vbuf(gather ? kKeyTile * D : 0);
    Scratch<const In*> kptr(kKeyTile + kvcache::kAhead), vptr(kKeyTile + kvcache::kAhead);
    Scratch<int64_t> vis_lo(max_rows), vis_hi(max_rows);
    for (int64_t gi = begin; gi < end; ++gi) {
      const kvcache::Task& first = plan.tasks[gi * group];
      // One task of the group (member `slot`): its item's rows and where their state lives.
      struct Member {
        const kvcache::Task* task;
        const kvcache::Item* item;
        T* Q;
        RowState<T> st;
      };
      auto member = [&](int64_t slot) {
        const kvcache::Task& task = plan.tasks[gi * group + slot];
        const kvcache::Item& item = plan.items[task.item];
        const int64_t part = (item.first_partial + task.split) * max_rows;
        const RowState<T> st = item.splits > 1
                                   ? RowState<T>{part_acc.data() + part * D, part_m.data() + part, part_l.data() + part}
                                   : RowState<T>{own_acc.data() + slot * max_rows * D, own_m.data() + slot * max_rows,
                                                 own_l.data() + slot * max_rows};
        return Member{&task, &item, qbuf.data() + slot * max_rows * D, st};
      };
      const int64_t b = plan.items[first.item].b, i0 = plan.items[first.item].i0, nq = plan.items[first.item].nq;
      const int64_t M = G * nq;
      const SeqBand seq = band.of(Sq, lens[b]);
      const int64_t cached = in.cache_seqlens[b];
      auto pos_of = [&](int64_t r) { return i0 + r % nq; };
      // Row r of an item is query head hk * G + r / nq at position i0 + r % nq.
      for (int64_t slot = 0; slot < group; ++slot) {
        const Member mb = member(slot);
        const int64_t hk = mb.item->hk;
        for (int64_t r = 0; r < M; ++r) {
          const In* src = in.q.row(b, pos_of(r), hk * G + r / nq);
          if (s.rotary_dim > 0) {
            const int64_t pos = s.rotate_q_per_row() ? cached + pos_of(r) : cached;
            kvcache::rotate_row<T>(src, mb.Q + r * D, D, in.rotary, pos);
          } else {
            kvcache::widen_row(src, mb.Q + r * D, D);
          }
        }
        // A sink is a key of score sinks[h] and no value; it joins split 0 only.
        for (int64_t r = 0; r < M; ++r) {
          const T sink =
              attrs.sinks && mb.task->split == 0 ? Dom::from_lse(attrs.sinks[hk * G + r / nq]) : neg_inf;
          mb.st.m[r] = sink;
          mb.st.l[r] = sink == neg_inf ? T(0) : T(1);
        }
        std::fill(mb.st.acc, mb.st.acc + M * D, T(0));
      }

      // Few rows (decode): the row loops stream each cache row once for all of them; else GEMMs.
      const bool row_loops = M <= kvcache::kRowLoopMaxRows;
      for (int64_t j0 = first.kv0; j0 < first.kv1;) {
        // Tiles end on multiples of key_tile (which divides kKeyTile), so a block of a
        // multiple of kKeyTile holds whole tiles.
        const int64_t n = std::min(key_tile - j0 % key_tile, first.kv1 - j0);
        for (int64_t slot = 0; slot < group; ++slot) {
          const Member mb = member(slot);
          const int64_t hk = mb.item->hk;
          const RowState<T>& st = mb.st;
          const T* Q = mb.Q;
          int64_t ldk = 0, ldv = 0;
          T* S = sbuf.data();
          // Row loops: the tile's row pointers, then the rows each loop prefetches past its
          // last (kvcache::kAhead): those that the next loop starts on. Q K^T's point at this
          // tile's first V rows, P V's at the next member's first K rows of the tile (after
          // the last member, the first one's of the next tile), where they used to point at
          // this head's next tile, which comes only after the other members' passes, so that
          // each pass started on kAhead misses. B H32 Hkv8 S4096 D128 on 2 Zen 4 cores,
          // medians of alternating processes: B8 fp32 22.4 -> 24.6 GB/s, bf16 17.4 -> 18.6
          // (B1, in L3: level).
          int64_t k_known = 0, v_known = 0;
          if (row_loops) {
            for (int64_t j = 0; j < n; ++j) {
              kptr[j] = in.k_cache.row(b, j0 + j, hk);
              vptr[j] = in.v_cache.row(b, j0 + j, hk);
            }
            const int64_t v_ahead = std::min(n, kvcache::kAhead);
            std::copy(vptr.data(), vptr.data() + v_ahead, kptr.data() + n);
            k_known = n + v_ahead;
            const bool last_member = slot + 1 == group;
            const int64_t next_j0 = last_member ? j0 + n : j0;
            const int64_t next_hk = member(last_member ? 0 : slot + 1).item->hk;
            const int64_t k_ahead = std::clamp<int64_t>(first.kv1 - next_j0, 0, kvcache::kAhead);
            for (int64_t t = 0; t < k_ahead; ++t) vptr[n + t] = in.k_cache.row(b, next_j0 + t, next_hk);
            v_known = n + k_ahead;
            kvcache::qk_rows(Q, M, D, kptr.data(), n, k_known, S, kKeyTile);
          } else {
            const T* K = cache_tile<T>(in.k_cache, b, hk, j0, n, D, kbuf.data(), ldk);
            gemm_rm<T>(false, true, M, n, D, T(1), Q, D, K, ldk, T(0), S, kKeyTile);
          }
          bool hidden_pairs = false;
          for (int64_t r = 0; r < M; ++r) {
            T* row = S + r * kKeyTile;
            const Span vis = seq.visible(pos_of(r), j0, n);
            const int64_t nv = vis.size();
            vis_lo[r] = vis.lo;
            vis_hi[r] = std::max(vis.lo, vis.hi);
            hidden_pairs |= nv < n;
            if (nv > 0) {
              T* x = row + vis.lo;
              if (attrs.softcap > 0)
                fa::softcap_row(x, nv, static_cast<T>(attrs.scale / attrs.softcap),
                                Dom::score_mult(static_cast<T>(attrs.softcap)), static_cast<T*>(nullptr));
              const T m_new = std::max(st.m[r], Dom::max(x, nv, c));
              // All visible scores -inf so far: exponentiate against 0 (see flash_attention.cpp).
              const T m_use = m_new == neg_inf ? T(0) : m_new;
              const T alpha = Dom::exp(st.m[r] - m_use);
              const T sum = Dom::exp_sum(x, nv, c, m_use, vector_exp);
              st.l[r] = st.l[r] * alpha + sum;
              st.m[r] = m_new;
              if (alpha != T(1)) fa::scale_row(st.acc + r * D, D, alpha);
              std::fill(row, row + vis.lo, T(0));
              std::fill(row + vis.hi, row + n, T(0));
            } else {
              std::fill(row, row + n, T(0));
            }
          }
          if (row_loops) {
            kvcache::pv_rows(S, kKeyTile, M, n, v_known, vptr.data(), D, vis_lo.data(), vis_hi.data(), st.acc);
            continue;
          }
          const T* V = cache_tile<T>(in.v_cache, b, hk, j0, n, D, vbuf.data(), ldv);
          if (!hidden_pairs || tile::all_finite(V, n, D, ldv)) {
            gemm_rm<T>(false, false, M, D, n, T(1), S, kKeyTile, V, ldv, T(1), st.acc, D);
          } else {  // hidden keys with non-finite values: one product per row over its visible keys
            for (int64_t r = 0; r < M; ++r) {
              const Span vis = seq.visible(pos_of(r), j0, n);
              if (vis.size() > 0)
                gemm_rm<T>(false, false, 1, D, vis.size(), T(1), S + r * kKeyTile + vis.lo, kKeyTile,
                           V + vis.lo * ldv, ldv, T(1), st.acc + r * D, D);
            }
          }
        }
        j0 += n;
      }
      for (int64_t slot = 0; slot < group; ++slot) {
        const Member mb = member(slot);
        if (mb.item->splits > 1) continue;  // merged below
        for (int64_t r = 0; r < M; ++r) {
          const int64_t h = mb.item->hk * G + r / nq, i = pos_of(r);
          finish_row(mb.st.acc + r * D, mb.st.m[r], mb.st.l[r], seq.empty_row(i),
                     attrs.sinks ? attrs.sinks + h : nullptr, D, in.out + ((b * Sq + i) * H + h) * D,
                     in.lse + (b * H + h) * Sq + i);
        }
      }
    }
  });

  if (plan.partials == 0) return;
  // Merge the splits of each split item, row by row, in split order. Decode merges are a
  // few microseconds of work: below ~64k multiply-adds they run on the calling thread,
  // which spares the threads a second wake-up and barrier.
  const int64_t n_items = static_cast<int64_t>(plan.items.size());
  const int64_t merge_work = std::max<int64_t>(1, plan.partials * max_rows * D / n_items);
  at::parallel_for(0, n_items, std::max<int64_t>(1, 65536 / merge_work), [&](int64_t begin, int64_t end) {
    std::vector<T> acc(D), weight;
    for (int64_t it = begin; it < end; ++it) {
      const kvcache::Item& item = plan.items[it];
      if (item.splits <= 1) continue;
      const int64_t b = item.b, nq = item.nq, M = G * nq;
      const SeqBand seq = band.of(Sq, lens[b]);
      weight.resize(item.splits);
      for (int64_t r = 0; r < M; ++r) {
        const int64_t h = item.hk * G + r / nq, i = item.i0 + r % nq;
        auto slot = [&](int64_t sp) { return (item.first_partial + sp) * max_rows + r; };
        T m = neg_inf;
        for (int64_t sp = 0; sp < item.splits; ++sp) m = std::max(m, part_m[slot(sp)]);
        const T m_use = m == neg_inf ? T(0) : m;
        T l = 0;
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t sp = 0; sp < item.splits; ++sp) {
          const T w = Dom::exp(part_m[slot(sp)] - m_use);  // 0 for a split that saw nothing
          l += w * part_l[slot(sp)];
          if (w == T(0) && part_l[slot(sp)] == T(0)) continue;  // nothing to add (and no 0 x NaN)
          const T* a = part_acc.data() + slot(sp) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += w * a[d];
        }
        finish_row(acc.data(), m, l, seq.empty_row(i), attrs.sinks ? attrs.sinks + h : nullptr, D,
                   in.out + ((b * Sq + i) * H + h) * D, in.lse + (b * H + h) * Sq + i);
      }
    }
  });
}

// ------------------------------------------------------------------------ dispatch

template <typename In>
RowsView<In> rows_view(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return RowsView<In>{nullptr, 0, 0, 0};
  return RowsView<In>{t->data_ptr<In>(), t->stride(0), t->stride(1), t->stride(2)};
}

std::tuple<at::Tensor, at::Tensor> flash_attention_kvcache_cpu(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const c10::optional<at::Tensor>& k,
    const c10::optional<at::Tensor>& v, const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table,
    const c10::optional<at::Tensor>& rotary_cos, const c10::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
    bool is_causal, c10::optional<double> scale, int64_t window_left, int64_t window_right, double softcap,
    const c10::optional<at::Tensor>& sinks, int64_t num_splits) {
  const KvcacheShape s = check_kvcache_args(q, k_cache, v_cache, k, v, cache_seqlens, block_table, rotary_cos,
                                            rotary_sin, rotary_interleaved, is_causal, scale, window_left,
                                            window_right, softcap, sinks, num_splits,
                                            {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  const at::Tensor seqlens_c = cache_seqlens.contiguous();
  at::Tensor table_c;
  if (s.paged) table_c = block_table->contiguous();
  const int32_t* seqlens_p = seqlens_c.data_ptr<int32_t>();
  const int32_t* table_p = s.paged ? table_c.data_ptr<int32_t>() : nullptr;
  check_kvcache_values(s, seqlens_p, table_p, s.max_blocks);

  at::Tensor out = empty_output({s.batch, s.seqlen_q, s.heads, s.head_dim}, q.options());
  at::Tensor lse = empty_output({s.batch, s.heads, s.seqlen_q}, q.options().dtype(at::kFloat));
  std::vector<int64_t> lens(s.batch);
  int64_t max_len = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    lens[b] = seqlens_p[b] + s.seqlen_new;
    max_len = std::max(max_len, lens[b]);
  }
  const Band band = Band::make(s.seqlen_q + max_len, s.causal, /*bottom_right=*/true, s.window_left, s.window_right);
  at::Tensor cos_c, sin_c;
  if (s.rotary_dim > 0) {
    cos_c = *rotary_cos;
    sin_c = *rotary_sin;
  }
  const Attrs attrs{scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(s.head_dim)), softcap,
                    s.has_sinks ? sinks->data_ptr<float>() : nullptr};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "flash_attention_kvcache_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    Inputs<scalar_t> in{};
    in.q = rows_view<scalar_t>(q);
    in.k_new = rows_view<scalar_t>(k);
    in.v_new = rows_view<scalar_t>(v);
    for (auto [view, cache] : {std::pair<CacheView<scalar_t>*, at::Tensor*>{&in.k_cache, &k_cache},
                               {&in.v_cache, &v_cache}}) {
      *view = CacheView<scalar_t>{cache->data_ptr<scalar_t>(), cache->stride(0), cache->stride(1), cache->stride(2)};
      if (s.paged) {
        view->table = table_p;
        view->table_stride = s.max_blocks;
        view->block_size = s.cache_rows;
      }
    }
    if (s.rotary_dim > 0) {
      in.rotary = Rotary<scalar_t>{cos_c.data_ptr<scalar_t>(), sin_c.data_ptr<scalar_t>(),
                                   cos_c.size(0) > 1 ? cos_c.stride(0) : 0, sin_c.size(0) > 1 ? sin_c.stride(0) : 0,
                                   s.rotary_dim, s.rotary_interleaved};
    }
    in.cache_seqlens = seqlens_p;
    in.out = out.data_ptr<scalar_t>();
    in.lse = lse.data_ptr<float>();
    if (s.seqlen_new > 0) append_new_rows<T>(s, in);
    if (out.numel() == 0) return;
    const Plan plan = kvcache::make_plan(s.batch, s.kv_heads, s.heads / s.kv_heads, s.seqlen_q, band, lens.data(),
                                         s.num_splits, kKeyTile);
    attention<T>(s, attrs, band, lens.data(), plan, in);
  });
  return {out, lse};
}

}  // namespace
}  // namespace tfkernels::cpu

TORCH_LIBRARY_IMPL(tfkernels, CPU, m) {
  m.impl("flash_attention_kvcache", &tfkernels::cpu::flash_attention_kvcache_cpu);
}
