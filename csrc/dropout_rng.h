// Attention dropout's random numbers, for host and device code alike (no torch
// headers): the CPU kernels, the CUDA kernels and the test-only mask op draw the
// keep/drop decision of score (b, h, i, j) from this one function, so the backward
// regenerates the forward's mask instead of storing it, and tests can rebuild it.
//
// The generator is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC'11), counter-based: every draw is a pure function of
// (seed, offset, counter), so any thread can produce any element in any order.
// One call gives four 32-bit words, used for four consecutive keys j = 4g .. 4g+3.
//
//   key     = (lo32(seed), hi32(seed) ^ hi32(offset))
//   counter = (j / 4, i, b * H + h, lo32(offset))       H = query heads
//   keep    = word[j % 4] >= threshold,  threshold = floor(p * 2^32)
//
// so an element is kept with probability 1 - p (to within 2^-32). The seed and
// offset are the two int64 values of the op's rng_state tensor.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TFK_RNG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TFK_RNG_HOST_DEVICE inline
#endif

namespace tfkernels {
namespace dropout {

struct Philox4 {
  uint32_t x, y, z, w;
};

TFK_RNG_HOST_DEVICE uint32_t mul_hi_lo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// Philox4x32 with 10 rounds; constants from the paper (and Random123).
TFK_RNG_HOST_DEVICE Philox4 philox4x32_10(Philox4 counter, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mul_hi_lo(kMul0, counter.x, &hi0);
    const uint32_t lo1 = mul_hi_lo(kMul1, counter.z, &hi1);
    counter = Philox4{hi1 ^ counter.y ^ key0, lo1, hi0 ^ counter.w ^ key1, lo0};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return counter;
}

// The per-launch constants: the key, the offset word of the counter and the threshold.
struct DropoutRng {
  uint32_t key0, key1, offset_word;
  uint32_t threshold;  // floor(p * 2^32); p < 1

  TFK_RNG_HOST_DEVICE static DropoutRng make(uint64_t seed, uint64_t offset, float p) {
    DropoutRng rng;
    rng.key0 = static_cast<uint32_t>(seed);
    rng.key1 = static_cast<uint32_t>(seed >> 32) ^ static_cast<uint32_t>(offset >> 32);
    rng.offset_word = static_cast<uint32_t>(offset);
    // Computed in double: p * 2^32 is exact there, and p < 1 keeps it below 2^32.
    rng.threshold = static_cast<uint32_t>(static_cast<double>(p) * 4294967296.0);
    return rng;
  }

  // Four decisions, for keys 4 * key_group .. 4 * key_group + 3 of row `row` of
  // (batch, head) slice `batch_head` (= b * H + h). Bit t of the result is 1 when
  // key 4 * key_group + t is kept.
  TFK_RNG_HOST_DEVICE uint32_t keep_bits4(uint32_t batch_head, uint32_t row, uint32_t key_group) const {
    const Philox4 r = philox4x32_10(Philox4{key_group, row, batch_head, offset_word}, key0, key1);
    return uint32_t(r.x >= threshold) | (uint32_t(r.y >= threshold) << 1) |
           (uint32_t(r.z >= threshold) << 2) | (uint32_t(r.w >= threshold) << 3);
  }

  TFK_RNG_HOST_DEVICE bool keep(uint32_t batch_head, uint32_t row, uint32_t key) const {
    return (keep_bits4(batch_head, row, key >> 2) >> (key & 3)) & 1u;
  }
};

}  // namespace dropout
}  // namespace tfkernels
