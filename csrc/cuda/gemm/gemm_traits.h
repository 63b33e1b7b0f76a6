// What a GEMM instantiation is, in one type: GemmTraits carries the element type,
// both operand layouts and forms, the row-sum flag and the epilogue, and derives
// the device views of the operands and the kernel's parameter block from them.
// Every kernel and launcher of the core takes a GemmTraits (plus the tile shape or
// the TF32 switch that picks the main loop). CUDA headers only.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "cuda/common/grid.h"
#include "cuda/common/ptx.h"
#include "cuda/gemm/gemm_params.h"

namespace tfkernels {
namespace gemm {

using cuda::FastDiv;

// Device form of Operand (gemm_args.h): parts unrolled into scalars (no dynamically
// indexed parameter arrays, which would go through local memory) and the two
// divisors of the segmented form as FastDiv.
template <typename T, bool kSeg>
struct OperandView {
  const T* p0 = nullptr;
  const T* p1 = nullptr;
  const T* p2 = nullptr;
  int64_t ld0 = 0, ld1 = 0, ld2 = 0;
  int64_t ss0 = 0, ss1 = 0, ss2 = 0;  // segment (head) strides
  int64_t bs0 = 0, bs1 = 0, bs2 = 0;  // outer segment (batch) strides
  int pb1 = INT_MAX, pb2 = INT_MAX;   // where parts 1 and 2 begin along j
  int seg_len = 1, outer_len = 1;
  FastDiv div_seg, div_outer;

  // &X[i][j]; i the outer index, j the inner (contiguous) one. i, j >= 0.
  __device__ __forceinline__ const T* at(int i, int j) const {
    if constexpr (!kSeg) {
      return p0 + static_cast<int64_t>(i) * ld0 + j;
    } else {
      const T* p = p0;
      int64_t ld = ld0, ss = ss0, bs = bs0;
      if (j >= pb2) {
        p = p2; ld = ld2; ss = ss2; bs = bs2; j -= pb2;
      } else if (j >= pb1) {
        p = p1; ld = ld1; ss = ss1; bs = bs1; j -= pb1;
      }
      const int g = static_cast<int>(div_seg.div(static_cast<uint32_t>(j)));
      const int d = j - g * seg_len;
      const int b = static_cast<int>(div_outer.div(static_cast<uint32_t>(i)));
      const int s = i - b * outer_len;
      return p + g * ss + b * bs + s * ld + d;
    }
  }
  __device__ __forceinline__ const T* base() const { return p0; }
};

template <typename T, bool kSeg>
OperandView<T, kSeg> make_view(const Operand& o) {
  OperandView<T, kSeg> v;
  v.p0 = static_cast<const T*>(o.ptr[0]);
  v.ld0 = o.ld[0];
  if constexpr (kSeg) {
    v.p1 = static_cast<const T*>(o.ptr[1]);
    v.p2 = static_cast<const T*>(o.ptr[2]);
    v.ld1 = o.ld[1];
    v.ld2 = o.ld[2];
    v.ss0 = o.seg_stride[0]; v.ss1 = o.seg_stride[1]; v.ss2 = o.seg_stride[2];
    v.bs0 = o.batch_stride[0]; v.bs1 = o.batch_stride[1]; v.bs2 = o.batch_stride[2];
    v.pb1 = o.ptr[1] != nullptr ? o.part_begin[1] : INT_MAX;
    v.pb2 = o.ptr[2] != nullptr ? o.part_begin[2] : INT_MAX;
    v.seg_len = o.seg_len;
    v.outer_len = o.outer_len;
    v.div_seg = FastDiv(static_cast<uint32_t>(o.seg_len > 0 ? o.seg_len : 1));
    v.div_outer = FastDiv(static_cast<uint32_t>(o.outer_len > 0 ? o.outer_len : 1));
  }
  return v;
}

// The kernel's parameter block: both operand views and the problem size in tiles.
template <typename T, bool kSegA, bool kSegB>
struct GemmKernelParams {
  OperandView<T, kSegA> a;
  OperandView<T, kSegB> b;
  int M = 0, N = 0, K = 0;
  int tiles_m = 0, tiles_n = 0;
};

// T: float, __half or __nv_bfloat16. LA, LB: where A and B are contiguous
// (gemm_params.h). kSegA, kSegB: segmented operand forms. kRowSum: the row sums of A
// go to Epi::store_rowsum. Epi: the epilogue functor (epilogue.h).
template <typename T, Layout LA, Layout LB, bool kSegA_, bool kSegB_, bool kRowSum_, class Epi>
struct GemmTraits {
  using Element = T;
  using Epilogue = Epi;
  static constexpr Layout kLayoutA = LA, kLayoutB = LB;
  static constexpr bool kSegA = kSegA_, kSegB = kSegB_, kRowSum = kRowSum_;
  // ldmatrix.trans addressing for an M/N-contiguous operand.
  static constexpr bool kTransposed = LA == Layout::kInnerMN || LB == Layout::kInnerMN;
  using Params = GemmKernelParams<T, kSegA, kSegB>;

  static Params make_params(const Operand& a, const Operand& b, int M, int N, int K, int BM, int BN) {
    Params p;
    p.a = make_view<T, kSegA>(a);
    p.b = make_view<T, kSegB>(b);
    p.M = M;
    p.N = N;
    p.K = K;
    p.tiles_m = static_cast<int>(cuda::ceil_div<int64_t>(M, BM));
    p.tiles_n = static_cast<int>(cuda::ceil_div<int64_t>(N, BN));
    return p;
  }
};

}  // namespace gemm
}  // namespace tfkernels
