// Where the forward kernels find key/value row r of one (batch, kv head): dense
// caches and the padded op keep rows at a fixed stride, a paged KV cache
// (flash_attention_kvcache with block_table) keeps them in fixed-size blocks that
// the block table maps (flash_params.h, "KV cache"). The tile loads take either
// row map as a functor; the choice is made once per tile (load_kv_tile,
// flash_tile.h), so the dense path's inner loop is the same code as before.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/flash/flash_params.h"

namespace tfkernels {
namespace flash {

// Row r at base + r * row_stride.
template <typename Element>
struct DenseRows {
  const Element* base;
  int64_t row_stride;
  __device__ __forceinline__ const Element* operator()(int r) const {
    return base + static_cast<int64_t>(r) * row_stride;
  }
};

// Row r in block table[r / block_size], slot r % block_size. The block index is
// clamped to [0, num_blocks): unvalidated tables (CUDA-graph capture skips the
// host check) read some valid block, never outside the cache. Callers ask only
// for rows below len_k <= seqlen_k = table width * block_size, so the table read
// itself stays inside the row.
template <typename Element>
struct PagedRows {
  const Element* base;  // block 0, slot 0, at the kv head
  int64_t row_stride;
  int64_t block_stride;
  const int* table;     // this batch entry's row of block_table
  int block_size;
  int num_blocks;
  __device__ __forceinline__ const Element* operator()(int r) const {
    int block = table[r / block_size];
    block = block < 0 ? 0 : (block >= num_blocks ? num_blocks - 1 : block);
    return base + static_cast<int64_t>(block) * block_stride + static_cast<int64_t>(r % block_size) * row_stride;
  }
};

// K or V of one (batch, kv head), dense or paged: one base pointer either way
// (the dense row 0, or block 0 at the kv head), so the dense kernels carry no
// second address.
template <typename Element>
struct KvRows {
  PagedRows<Element> map;  // table == nullptr: dense rows at map.base + r * map.row_stride

  // dense_offset: where the entry's row 0 is (BlockInfo::k_offset: padded batch or
  // packed sequence); a paged cache finds its rows through block_table[batch]
  // instead, whose blocks are batch_stride apart.
  __device__ __forceinline__ static KvRows make(const FwdParams& p, const void* data, int64_t dense_offset,
                                                int64_t batch_stride, int64_t head_stride, int64_t row_stride,
                                                int batch, int kv_head) {
    const Element* head_base = static_cast<const Element*>(data) + kv_head * head_stride;
    if (p.block_table == nullptr) {
      return KvRows{PagedRows<Element>{head_base + dense_offset, row_stride, 0, nullptr, 1, 1}};
    }
    return KvRows{PagedRows<Element>{head_base, row_stride, batch_stride,
                                     p.block_table + batch * p.block_table_batch_stride, p.page_block_size,
                                     p.num_pages}};
  }

  __device__ __forceinline__ bool is_paged() const { return map.table != nullptr; }
  __device__ __forceinline__ DenseRows<Element> dense() const { return DenseRows<Element>{map.base, map.row_stride}; }
  __device__ __forceinline__ const PagedRows<Element>& paged() const { return map; }
  __device__ __forceinline__ const Element* row(int r) const { return is_paged() ? map(r) : dense()(r); }
};

}  // namespace flash
}  // namespace tfkernels
