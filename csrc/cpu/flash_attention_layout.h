// Where the sequences of one CPU flash-attention call live, so that the padded op
// ([B,H,S,D] tensors) and the packed variable-length op ([total,H,D] tensors with
// cu_seqlens) run the same kernels without copying either into the other's layout.
//
// Rows are numbered "flat": query row i of sequence b is flat row q_start(b) + i
// (padded: b * Sq + i; packed: cu_seqlens_q[b] + i), keys likewise. A RowView maps
// (flat row, head) to memory through the tensor's own strides; within a sequence
// consecutive rows are row_stride apart, which is what the tile GEMMs read as
// their leading dimension.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

namespace tfkernels::cpu {

// The sequences: lengths and first flat rows.
class Sequences {
 public:
  // B sequences of seqlen_q query rows and seqlen_k key rows each; sequence b sees
  // its first lens_k[b] keys (all of them when lens_k is null).
  static Sequences padded(int64_t batch, int64_t seqlen_q, int64_t seqlen_k, const int64_t* lens_k) {
    Sequences s;
    s.count_ = batch;
    s.seqlen_q_ = seqlen_q;
    s.seqlen_k_ = seqlen_k;
    s.lens_k_ = lens_k;
    s.max_q_ = seqlen_q;
    s.max_k_ = seqlen_k;
    return s;
  }
  // Sequence b owns flat rows cu_q[b] .. cu_q[b+1] of q and cu_k[b] .. cu_k[b+1] of
  // k, v (validated values: start at 0, non-decreasing).
  static Sequences packed(int64_t batch, const int32_t* cu_q, const int32_t* cu_k) {
    Sequences s;
    s.count_ = batch;
    s.cu_q_ = cu_q;
    s.cu_k_ = cu_k;
    for (int64_t b = 0; b < batch; ++b) {
      s.max_q_ = std::max(s.max_q_, s.q_len(b));
      s.max_k_ = std::max(s.max_k_, s.k_rows(b));
    }
    return s;
  }

  int64_t count() const { return count_; }
  bool is_packed() const { return cu_q_ != nullptr; }
  int64_t q_start(int64_t b) const { return cu_q_ ? cu_q_[b] : b * seqlen_q_; }
  int64_t q_len(int64_t b) const { return cu_q_ ? cu_q_[b + 1] - cu_q_[b] : seqlen_q_; }
  int64_t k_start(int64_t b) const { return cu_k_ ? cu_k_[b] : b * seqlen_k_; }
  // The key rows sequence b owns (its dK, dV rows), and the keys it sees (<= k_rows).
  int64_t k_rows(int64_t b) const { return cu_k_ ? cu_k_[b + 1] - cu_k_[b] : seqlen_k_; }
  int64_t k_len(int64_t b) const { return cu_k_ ? k_rows(b) : lens_k_ ? lens_k_[b] : seqlen_k_; }
  int64_t q_rows_total() const { return cu_q_ ? cu_q_[count_] : count_ * seqlen_q_; }
  int64_t k_rows_total() const { return cu_k_ ? cu_k_[count_] : count_ * seqlen_k_; }
  int64_t max_q_len() const { return max_q_; }
  int64_t max_k_rows() const { return max_k_; }
  // The sequence that owns flat query row g (g < q_rows_total()).
  int64_t seq_of_q_row(int64_t g) const {
    if (!cu_q_) return g / seqlen_q_;
    // The last b with cu_q[b] <= g (empty sequences before it own no row).
    return std::upper_bound(cu_q_, cu_q_ + count_ + 1, static_cast<int32_t>(g)) - cu_q_ - 1;
  }

 private:
  int64_t count_ = 0, seqlen_q_ = 0, seqlen_k_ = 0, max_q_ = 0, max_k_ = 0;
  const int64_t* lens_k_ = nullptr;
  const int32_t* cu_q_ = nullptr;
  const int32_t* cu_k_ = nullptr;
};

// Element strides of a tensor addressed by (flat row, head). Padded [B,H,S,D]:
// rows_per_seq = S and seq_stride = the batch stride. Packed [total,H,D]: flat
// rows are the tensor's rows, so rows_per_seq is "infinite" and seq_stride 0.
struct RowLayout {
  int64_t seq_stride, head_stride, row_stride, rows_per_seq;

  static RowLayout padded(int64_t batch_stride, int64_t head_stride, int64_t row_stride, int64_t seqlen) {
    return RowLayout{batch_stride, head_stride, row_stride, std::max<int64_t>(seqlen, 1)};
  }
  static RowLayout packed(int64_t head_stride, int64_t row_stride) {
    return RowLayout{0, head_stride, row_stride, std::numeric_limits<int64_t>::max()};
  }
  int64_t offset(int64_t g, int64_t h) const {
    return (g / rows_per_seq) * seq_stride + (g % rows_per_seq) * row_stride + h * head_stride;
  }
};

template <typename T>
struct RowView {
  T* p;
  RowLayout layout;
  // Flat row g of head h; the next row of the same sequence is ld() further.
  T* at(int64_t g, int64_t h) const { return p + layout.offset(g, h); }
  int64_t ld() const { return layout.row_stride; }
};

// Hands out task indices 0, 1, 2, ... to the threads of one at::parallel_for, each
// thread taking the next index when it is done with its last. The callers number
// their tasks costliest first, so the threads finish together however unequal the
// sequences are (a static split of a cost-sorted list would not). Which thread runs
// a task never changes what the task computes: results stay bitwise reproducible.
class TaskQueue {
 public:
  explicit TaskQueue(int64_t tasks) : tasks_(tasks) {}
  bool next(int64_t& task) {
    task = next_.fetch_add(1, std::memory_order_relaxed);
    return task < tasks_;
  }

 private:
  const int64_t tasks_;
  std::atomic<int64_t> next_{0};
};

}  // namespace tfkernels::cpu
