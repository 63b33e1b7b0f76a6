// The work plan of the CPU kvcache attention: which task computes what.
//
// An item is (sequence b, kv head hk, block of query positions): its rows are the G
// query heads of hk times those positions, so every K/V row an item reads serves all
// G heads (GQA reads the cache once per kv head, not once per query head). An item's
// keys are the union of its rows' bands; they may be cut into splits, each a task of
// its own, whose partial results are merged by lse afterwards in split order, so the
// result does not depend on which thread ran what.
//
// Decode (Sq = 1) with small B * Hkv has fewer items than cores: splitting the keys is
// then the only parallelism. With num_splits = 0 the split length is chosen from the
// shape alone (never from the thread count, so a result is bitwise the same on any
// machine): no splits when there are kTargetTasks items or more, else every item's
// keys in chunks of about total_keys / kTargetTasks (a multiple of the key tile), so
// that long sequences get more splits than short ones and tasks cost about the same.
// num_splits > 0 cuts every item into exactly that many near-equal key ranges.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/flash_attention_band.h"

namespace tfkernels::cpu::kvcache {

// Tasks aimed for before keys are split: enough for 2-32 cores to balance.
constexpr int64_t kTargetTasks = 64;
// Rows (query heads x query positions) of one item: S = Q K^T is rows x key tile.
constexpr int64_t kItemRows = 128;

struct Item {
  int64_t b, hk, i0, nq;  // query positions [i0, i0 + nq)
  Span keys;              // the keys some row of the item sees
  int64_t splits;
  int64_t first_partial;  // the partial slot of split 0 (when splits > 1)
};

struct Task {
  int64_t item, split;
  int64_t kv0, kv1;       // the task's keys
};

struct Plan {
  int64_t bq;             // query positions per item
  std::vector<Item> items;
  std::vector<Task> tasks;
  int64_t partials = 0;   // partial slots (one per split of a split item)
};

// lens[b]: keys of sequence b; `band` gives each row's keys (bottom-right aligned).
inline Plan make_plan(int64_t batch, int64_t kv_heads, int64_t group, int64_t seqlen_q, const Band& band,
                      const int64_t* lens, int64_t num_splits, int64_t key_tile) {
  Plan plan;
  plan.bq = std::max<int64_t>(1, std::min(seqlen_q, kItemRows / group));
  int64_t total_keys = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const SeqBand seq = band.of(seqlen_q, lens[b]);
    for (int64_t hk = 0; hk < kv_heads; ++hk) {
      for (int64_t i0 = 0; i0 < seqlen_q; i0 += plan.bq) {
        const int64_t nq = std::min(plan.bq, seqlen_q - i0);
        Span keys = seq.keys_of_rows(i0, i0 + nq);
        if (keys.size() == 0) keys = Span{0, 0};
        plan.items.push_back(Item{b, hk, i0, nq, keys, 1, -1});
        total_keys += keys.size();
      }
    }
  }
  const int64_t n_items = static_cast<int64_t>(plan.items.size());
  int64_t chunk = 0;  // 0: no splits
  if (num_splits == 0 && n_items < kTargetTasks) {
    chunk = (total_keys + kTargetTasks - 1) / kTargetTasks;
    chunk = std::max<int64_t>(key_tile, (chunk + key_tile - 1) / key_tile * key_tile);
  }
  for (Item& item : plan.items) {
    const int64_t size = item.keys.size();
    if (num_splits > 0) item.splits = num_splits;
    else if (chunk > 0) item.splits = std::max<int64_t>(1, (size + chunk - 1) / chunk);
    if (item.splits > 1) {
      item.first_partial = plan.partials;
      plan.partials += item.splits;
    }
  }
  // Tasks ordered (sequence, query block, key split, kv head): the kv heads of one
  // (sequence, query block, key split) side by side, with the same keys (an item's keys
  // and splits depend only on its sequence and rows), so that a divisor of kv_heads
  // cuts the list into groups for one thread (flash_kvcache.cpp's decode).
  const int64_t blocks = (seqlen_q + plan.bq - 1) / plan.bq;  // items per (sequence, kv head)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t qb = 0; qb < blocks; ++qb) {
      const Item& lead = plan.items[b * kv_heads * blocks + qb];
      const int64_t size = lead.keys.size();
      for (int64_t s = 0; s < lead.splits; ++s) {
        // Auto: chunk-long pieces from the band's start; fixed count: near-equal pieces.
        const int64_t lo = chunk > 0 ? std::min(size, s * chunk) : size * s / lead.splits;
        const int64_t hi = chunk > 0 ? std::min(size, (s + 1) * chunk) : size * (s + 1) / lead.splits;
        for (int64_t hk = 0; hk < kv_heads; ++hk) {
          plan.tasks.push_back(Task{(b * kv_heads + hk) * blocks + qb, s, lead.keys.lo + lo, lead.keys.lo + hi});
        }
      }
    }
  }
  return plan;
}

}  // namespace tfkernels::cpu::kvcache
