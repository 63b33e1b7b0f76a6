// The tensor-core, ldmatrix and cp.async primitives of csrc/cuda/common/ptx.h on
// the emulated device, implemented from the PTX ISA (version 8.x), not from the
// kernels' own comments. Section names refer to the ISA document:
//   9.7.14.5.8  "Matrix Fragments for mma.m16n8k16 with floating point type"
//   9.7.14.5.7  "Matrix Fragments for mma.m16n8k8" (.tf32)
//   9.7.14.5.15 "Warp-level matrix load instruction: ldmatrix"
//   9.7.9.25    "Data Movement and Conversion Instructions: cp.async" (+ commit_group, wait_group)
//   9.7.9.21    "cvt" (.rna.tf32.f32)
//   9.7.3.x     "ex2" (.approx.ftz.f32)
// Each warp-level instruction is a collective: every lane deposits its operands,
// then computes its own fragment of the result from all lanes' operands.
// The primitives' own shared-memory accesses are reported to the race detector
// explicitly (per supplying lane), so their bodies are not instrumented.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "emu/cuda_device.h"

#define TFK_EMU_PRIMITIVE __attribute__((no_sanitize_thread)) inline

namespace tfkernels {
namespace cuda {

TFK_EMU_PRIMITIVE uint32_t smem_addr(const void* p) { return __cvta_generic_to_shared(p); }

// ----------------------------------------------------------------- cp.async (9.7.9.25)
// cp.async.cg.shared.global [dst], [src], 16, src_size: src_size = 0 reads nothing
// and zero-fills the 16 bytes. Completion is only guaranteed by cp.async.wait_group.
TFK_EMU_PRIMITIVE void cp_async_16(void* smem, const void* gmem, bool in_bounds) {
  emu::cp_async_issue(smem, gmem, 16, !in_bounds);
}
TFK_EMU_PRIMITIVE void cp_async_commit() { emu::cp_async_commit(); }
// cp.async.wait_group N: waits until at most N of the most recent committed
// groups are pending (uncommitted copies are not covered).
template <int kPending>
TFK_EMU_PRIMITIVE void cp_async_wait() {
  emu::cp_async_wait(kPending);
}

// ----------------------------------------------------------------- ldmatrix (9.7.14.5.15)
namespace emu_detail {

// ldmatrix.sync.aligned.m8n8.xN{.trans}.shared.b16: matrix i's rows come from the
// addresses of lanes 8i..8i+7 (row r from lane 8i+r); each row is 16 contiguous
// bytes (8 x b16) and must be 16-byte aligned. Destination register i of lane l
// holds, without .trans, elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i;
// with .trans, elements (rows 2(l%4), 2(l%4)+1, col l/4), i.e. of the transpose.
template <int kMatrices, bool kTrans>
TFK_EMU_PRIMITIVE void ldmatrix(uint32_t* r, const void* smem_row) {
  const int lane = emu::this_thread().lane;
  if (lane < 8 * kMatrices) {
    if (!emu::is_smem(smem_row)) emu::fail("ldmatrix: row address is not in shared memory");
    if (reinterpret_cast<uintptr_t>(smem_row) % 16 != 0) emu::fail("ldmatrix: row address not 16-byte aligned");
    emu::note_smem_read(smem_row, 16);
  }
  const unsigned char* slots = emu::warp_exchange(emu::Collective::kLdmatrix, 0xffffffffu, &smem_row,
                                                  sizeof(smem_row), kTrans ? "ldmatrix.trans" : "ldmatrix");
  const unsigned char* rows[32];
  for (int l = 0; l < 32; ++l) std::memcpy(&rows[l], slots + l * emu::kSlotBytes, sizeof(rows[l]));
  if (lane == 0) {
    for (int m = 0; m < kMatrices; ++m) emu::note_ldmatrix_rows(reinterpret_cast<const void* const*>(&rows[8 * m]));
  }
  for (int m = 0; m < kMatrices; ++m) {
    uint16_t e[2];
    for (int j = 0; j < 2; ++j) {
      const int row = kTrans ? 2 * (lane % 4) + j : lane / 4;
      const int col = kTrans ? lane / 4 : 2 * (lane % 4) + j;
      std::memcpy(&e[j], rows[8 * m + row] + 2 * col, 2);
    }
    r[m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
}

}  // namespace emu_detail

TFK_EMU_PRIMITIVE void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  emu_detail::ldmatrix<4, false>(r, smem_row);
}
TFK_EMU_PRIMITIVE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  emu_detail::ldmatrix<4, true>(r, smem_row);
}
TFK_EMU_PRIMITIVE void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
  emu_detail::ldmatrix<2, false>(r, smem_row);
}
TFK_EMU_PRIMITIVE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  emu_detail::ldmatrix<2, true>(r, smem_row);
}
TFK_EMU_PRIMITIVE void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row) {
  emu_detail::ldmatrix<1, false>(r, smem_row);
}
TFK_EMU_PRIMITIVE void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row) {
  emu_detail::ldmatrix<1, true>(r, smem_row);
}

// ----------------------------------------------------------------- mma (9.7.14.5.7, 9.7.14.5.8)
namespace emu_detail {

struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
};

inline float b16_to_float(uint16_t bits, bool bf16) {
  return bf16 ? emu::bf16_bits_to_float(bits) : emu::half_bits_to_float(bits);
}

// Element (row, k) of A and (k, col) of B, gathered from the lane that holds it.
// m16n8k16, .f16/.bf16 (9.7.14.5.8): with g = lane/4 (groupID), t = lane%4:
//   A: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B: b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C/D: c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
inline float a_16816(const MmaOperands* lanes, int row, int k, bool bf16) {
  const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
  const int lane = (row % 8) * 4 + (k % 8) / 2;
  return b16_to_float(static_cast<uint16_t>(lanes[lane].a[reg] >> (16 * (k % 2))), bf16);
}
inline float b_16816(const MmaOperands* lanes, int k, int col, bool bf16) {
  const int reg = k >= 8 ? 1 : 0;
  const int lane = col * 4 + (k % 8) / 2;
  return b16_to_float(static_cast<uint16_t>(lanes[lane].b[reg] >> (16 * (k % 2))), bf16);
}

// m16n8k8, .tf32 (9.7.14.5.7): A: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4);
// B: b0 (k t, n g), b1 (k t+4, n g). The tensor core reads the top 19 bits of each
// 32-bit operand (sign, exponent, 10 mantissa bits).
inline float tf32_operand(uint32_t bits) { return emu::bits_float(bits & 0xffffe000u); }
inline float a_1688(const MmaOperands* lanes, int row, int k) {
  const int reg = (row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0);
  return tf32_operand(lanes[(row % 8) * 4 + k % 4].a[reg]);
}
inline float b_1688(const MmaOperands* lanes, int k, int col) {
  return tf32_operand(lanes[col * 4 + k % 4].b[k >= 4 ? 1 : 0]);
}

// D = A B + C with fp32 accumulation. The ISA leaves the order and the internal
// precision of the sum unspecified; here the products are exact (16-bit and tf32
// operands multiply exactly in double), summed in double with C and rounded once.
template <int kK, typename GetA, typename GetB>
TFK_EMU_PRIMITIVE void mma_accumulate(float (&d)[4], int lane, GetA get_a, GetB get_b) {
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0);
    const int col = 2 * t + (i % 2);
    double sum = d[i];
    for (int k = 0; k < kK; ++k) sum += static_cast<double>(get_a(row, k)) * static_cast<double>(get_b(k, col));
    d[i] = static_cast<float>(sum);
  }
}

template <bool kBf16>
TFK_EMU_PRIMITIVE void mma_16816_impl(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  MmaOperands mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  const unsigned char* slots = emu::warp_exchange(emu::Collective::kMma, 0xffffffffu, &mine, sizeof(mine),
                                                  kBf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16");
  MmaOperands lanes[32];
  for (int l = 0; l < 32; ++l) std::memcpy(&lanes[l], slots + l * emu::kSlotBytes, sizeof(MmaOperands));
  mma_accumulate<16>(
      d, emu::this_thread().lane, [&](int r, int k) { return a_16816(lanes, r, k, kBf16); },
      [&](int k, int c) { return b_16816(lanes, k, c, kBf16); });
}

}  // namespace emu_detail

template <typename T>
TFK_EMU_PRIMITIVE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
TFK_EMU_PRIMITIVE void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu_detail::mma_16816_impl<false>(d, a, b);
}
template <>
TFK_EMU_PRIMITIVE void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu_detail::mma_16816_impl<true>(d, a, b);
}

TFK_EMU_PRIMITIVE void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu_detail::MmaOperands mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  const unsigned char* slots =
      emu::warp_exchange(emu::Collective::kMma, 0xffffffffu, &mine, sizeof(mine), "mma.m16n8k8.tf32");
  emu_detail::MmaOperands lanes[32];
  for (int l = 0; l < 32; ++l) std::memcpy(&lanes[l], slots + l * emu::kSlotBytes, sizeof(emu_detail::MmaOperands));
  emu_detail::mma_accumulate<8>(
      d, emu::this_thread().lane, [&](int r, int k) { return emu_detail::a_1688(lanes, r, k); },
      [&](int k, int c) { return emu_detail::b_1688(lanes, k, c); });
}

// cvt.rna.tf32.f32 (9.7.9.21): round to nearest, ties away from zero, to the
// 10-bit tf32 mantissa; the low 13 bits of the result are zero. NaN and inf pass.
TFK_EMU_PRIMITIVE uint32_t to_tf32(float x) {
  const uint32_t u = emu::float_bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;
  return (u + 0x1000u) & 0xffffe000u;  // sign-magnitude: adding half an ulp rounds half away
}

// ----------------------------------------------------------------- ex2 (9.7.3)
// ex2.approx.ftz.f32: 2^x; subnormal inputs and results flush to +0 (sign kept on
// input); ex2(-inf) = +0, ex2(+inf) = +inf, ex2(NaN) = NaN. The hardware's ~2 ulp
// approximation is stood in for by the host's exp2.
TFK_EMU_PRIMITIVE float exp2_approx(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

}  // namespace cuda
}  // namespace tfkernels
