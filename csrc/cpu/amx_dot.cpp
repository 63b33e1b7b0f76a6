// AMX-BF16 tile GEMMs (amx_dot.h). The tile instructions are compiled through target
// attributes (GCC's intrinsics are inline assembly), so the rest of the library keeps
// its baseline ISA; they run only after available() said the CPU and the OS allow them.
#include "cpu/amx_dot.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu_caps.h"
#include "cpu/tile_utils.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define TFK_HAVE_AMX 1
#define TFK_AMX __attribute__((target("amx-tile,amx-bf16,avx512f")))
#endif

namespace tfkernels::cpu::amx {
namespace {

#ifdef TFK_HAVE_AMX

// A tile is 16 rows of 64 bytes: 16 fp32 sums of C, 16 words of bf16 pairs of A, or
// 16 packed columns of one pair step of B (a B tile spans 16 pair steps).
constexpr int64_t kTile = 16;
constexpr int64_t kTileBytes = 64;

// Linux hands the 8 KiB of tile state only to processes that ask for it; without
// the grant the first tile instruction faults.
bool tiles_permitted() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

// Palette 1, every tile 16 rows x 64 bytes. Tiles 0-3 hold a 2 x 2 block of C (A strip
// r, B strip s: tile 2r + s), 4-5 the two strips of A, 6-7 the two of B: each A and B
// tile loaded feeds two products. Edges are padded in memory instead of shrinking
// tiles, so one configuration serves a whole call.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TFK_AMX void load_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = kTileBytes;
    cfg.rows[t] = kTile;
  }
  // GCC's _tile_loadconfig tells the compiler it reads only 8 bytes of cfg, so the
  // stores of the rest may sink past it: inlined into a larger function, the tile
  // loads then met an all-zero colsb and faulted (#GP, seen as SIGSEGV).
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// Where one 16-row strip of A has reduction chunk q (16 pairs): in place while the
// strip has 16 rows and the chunk 16 pairs, else in a zero-padded copy (rows past m
// and pairs past `pairs` must read as 0, not as whatever memory follows: 0 x NaN
// would poison the row).
struct StripA {
  const char* base;
  int64_t stride;
  int64_t split;  // chunks [0, split) in place, the rest from pad
  const char* pad;
  int64_t pad_stride;
  const char* at(int64_t q) const { return q < split ? base + q * kTileBytes : pad + (q - split) * kTileBytes; }
  int64_t stride_at(int64_t q) const { return q < split ? stride : pad_stride; }
};

// pad: room for kTile rows of every chunk's words.
StripA strip_a(const c10::BFloat16* a, int64_t lda, int64_t i0, int64_t rows, int64_t pairs, uint32_t* pad) {
  const int64_t whole = pairs / kTile, chunks = (pairs + kTile - 1) / kTile;
  const auto* base = reinterpret_cast<const char*>(a + i0 * lda);
  if (rows == kTile && whole == chunks) return {base, 2 * lda, chunks, nullptr, 0};
  const int64_t first = rows == kTile ? whole : 0;  // the first chunk read from the copy
  const int64_t words = (chunks - first) * kTile;
  std::fill(pad, pad + kTile * words, 0u);
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(pad + r * words, a + (i0 + r) * lda + 2 * first * kTile, 4 * (pairs - first * kTile));
  }
  return {base, 2 * lda, first, reinterpret_cast<const char*>(pad), 4 * words};
}

// B's chunk q at column col: in place for whole chunks, the partial last one from a
// copy whose pair steps past `pairs` are zero.
struct ChunksB {
  const uint32_t* b;
  int64_t ldb, whole;
  const uint32_t* tail;
  const uint32_t* at(int64_t q, int64_t col) const { return (q < whole ? b + q * kTile * ldb : tail) + col; }
  int64_t stride() const { return 4 * ldb; }
};

// The chunks of b, with the partial last chunk copied into `tail_buf`.
ChunksB chunks_b(const uint32_t* b, int64_t ldb, int64_t pairs, tile::Scratch<uint32_t>& tail_buf) {
  const int64_t whole = pairs / kTile, steps = pairs - whole * kTile;
  ChunksB chunks{b, ldb, whole, nullptr};
  if (steps > 0) {
    uint32_t* tail = tail_buf.grow(kTile * ldb);
    std::fill(tail + steps * ldb, tail + kTile * ldb, 0u);
    std::copy(b + whole * kTile * ldb, b + pairs * ldb, tail);
    chunks.tail = tail;
  }
  return chunks;
}

// One C tile: in place when all 16 x 16 sums are inside C, else through `scratch`,
// which holds the inside part (or zeros) and is copied back by finish().
struct TileC {
  float* c;
  int64_t ldc, rows, cols;
  float* ptr;
  int64_t stride;

  TileC() = default;
  TileC(float* c_, int64_t ldc_, int64_t rows_, int64_t cols_, float* scratch, bool accumulate)
      : c(c_), ldc(ldc_), rows(rows_), cols(cols_), ptr(c_), stride(4 * ldc_) {
    if (rows == kTile && cols == kTile) return;
    ptr = scratch;
    stride = kTileBytes;
    std::fill(scratch, scratch + kTile * kTile, 0.0f);
    if (accumulate) {
      for (int64_t r = 0; r < rows; ++r) std::copy(c + r * ldc, c + r * ldc + cols, scratch + r * kTile);
    }
  }
  void finish() const {
    if (ptr == c) return;
    for (int64_t r = 0; r < rows; ++r) std::copy(ptr + r * kTile, ptr + r * kTile + cols, c + r * ldc);
  }
};

// The block of kStripsA x kStripsB C tiles at B column j0, over chunks [q0, q1),
// added to C (accumulate) or to zero.
template <int kStripsA, int kStripsB>
TFK_AMX void block(const StripA* a, const ChunksB& b, int64_t j0, const TileC* c, int64_t q0, int64_t q1,
                   bool accumulate) {
  constexpr bool kFour = kStripsA == 2 && kStripsB == 2;
  if (accumulate) {
    _tile_loadd(0, c[0].ptr, c[0].stride);
    if constexpr (kStripsB == 2) _tile_loadd(1, c[1].ptr, c[1].stride);
    if constexpr (kStripsA == 2) _tile_loadd(2, c[2].ptr, c[2].stride);
    if constexpr (kFour) _tile_loadd(3, c[3].ptr, c[3].stride);
  } else {
    _tile_zero(0);
    if constexpr (kStripsB == 2) _tile_zero(1);
    if constexpr (kStripsA == 2) _tile_zero(2);
    if constexpr (kFour) _tile_zero(3);
  }
  for (int64_t q = q0; q < q1; ++q) {
    _tile_loadd(4, a[0].at(q), a[0].stride_at(q));
    _tile_loadd(6, b.at(q, j0), b.stride());
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kStripsB == 2) {
      _tile_loadd(7, b.at(q, j0 + kTile), b.stride());
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (kStripsA == 2) {
      _tile_loadd(5, a[1].at(q), a[1].stride_at(q));
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (kFour) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c[0].ptr, c[0].stride);
  if constexpr (kStripsB == 2) _tile_stored(1, c[1].ptr, c[1].stride);
  if constexpr (kStripsA == 2) _tile_stored(2, c[2].ptr, c[2].stride);
  if constexpr (kFour) _tile_stored(3, c[3].ptr, c[3].stride);
}

// Per row of a 32-row strip, the lane-wise max of the C columns stored so far; each
// row's max is reduced across its lanes once, after the last block.
struct StripMax {
  alignas(64) float lanes[2 * kTile][kTile];

  TFK_AMX void reset(int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) _mm512_store_ps(lanes[r], _mm512_set1_ps(-INFINITY));
  }
  // Takes in columns [j0, j0 + width) of the strip's rows (C rows ldc apart, from c0).
  TFK_AMX void add(const float* c0, int64_t ldc, int64_t rows, int64_t j0, int64_t width) {
    const auto part = [&](int64_t w) { return static_cast<__mmask16>((1u << std::clamp<int64_t>(w, 0, kTile)) - 1); };
    const __mmask16 first = part(width), second = part(width - kTile);
    const __m512 none = _mm512_set1_ps(-INFINITY);
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = c0 + r * ldc + j0;
      __m512 v = _mm512_max_ps(_mm512_load_ps(lanes[r]), _mm512_mask_loadu_ps(none, first, row));
      if (second) v = _mm512_max_ps(v, _mm512_mask_loadu_ps(none, second, row + kTile));
      _mm512_store_ps(lanes[r], v);
    }
  }
  TFK_AMX void reduce(int64_t rows, float* row_max) const {
    for (int64_t r = 0; r < rows; ++r) row_max[r] = _mm512_reduce_max_ps(_mm512_load_ps(lanes[r]));
  }
};

// Chunks of the reduction per pass over C: a strip pair of A (32 rows) and a block of
// B (32 columns) of 8 chunks are 16 KiB each, so both stay in L1 across the pass's
// blocks; C's sums go to memory and back once per pass.
constexpr int64_t kPassChunks = 8;

// C[m][cols] (+)= A . B. In passes over the reduction (kPassChunks); each pass walks
// C in blocks of 2 x 2 tiles, strips of A outer, so a strip pair stays in L1 while the
// B blocks stream past it.
TFK_AMX void gemm_tiles(int64_t m, int64_t cols, int64_t pairs, const c10::BFloat16* a, int64_t lda,
                        const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate, float* row_max) {
  const int64_t chunks = (pairs + kTile - 1) / kTile, strips = (m + kTile - 1) / kTile;
  // Aligned: a tile row straddling two cache lines loads at about half speed.
  thread_local tile::Scratch<uint32_t> a_pad_buf, b_tail;
  uint32_t* a_pads = a_pad_buf.grow(strips * kTile * chunks * kTile);
  thread_local std::vector<StripA> A;
  A.resize(static_cast<size_t>(strips));
  for (int64_t r = 0; r < strips; ++r) {
    A[r] = strip_a(a, lda, r * kTile, std::min(kTile, m - r * kTile), pairs, a_pads + r * kTile * chunks * kTile);
  }
  const ChunksB B = chunks_b(b, ldb, pairs, b_tail);
  alignas(64) float scratch[4][kTile * kTile];
  StripMax strip_max;
  load_config();
  // At least one pass, so that C is written even when there is nothing to add.
  for (int64_t q0 = 0; q0 == 0 || q0 < chunks; q0 += kPassChunks) {
    const int64_t q1 = std::min(chunks, q0 + kPassChunks);
    const bool add = accumulate || q0 > 0, last_pass = q1 == chunks;
    for (int64_t i0 = 0; i0 < m; i0 += 2 * kTile) {
      const int strips_a = i0 + kTile < m ? 2 : 1;
      const StripA* strip = A.data() + i0 / kTile;
      const int64_t strip_rows = std::min(2 * kTile, m - i0);
      const bool track_max = row_max != nullptr && last_pass;
      if (track_max) strip_max.reset(strip_rows);
      for (int64_t j0 = 0; j0 < cols; j0 += 2 * kTile) {
        const int strips_b = j0 + kTile < cols ? 2 : 1;
        TileC C[4];
        for (int r = 0; r < strips_a; ++r) {
          for (int s = 0; s < strips_b; ++s) {
            const int64_t row = i0 + r * kTile, col = j0 + s * kTile;
            C[2 * r + s] = TileC(c + row * ldc + col, ldc, std::min(kTile, m - row), std::min(kTile, cols - col),
                                 scratch[2 * r + s], add);
          }
        }
        if (strips_a == 2 && strips_b == 2) block<2, 2>(strip, B, j0, C, q0, q1, add);
        else if (strips_a == 2) block<2, 1>(strip, B, j0, C, q0, q1, add);
        else if (strips_b == 2) block<1, 2>(strip, B, j0, C, q0, q1, add);
        else block<1, 1>(strip, B, j0, C, q0, q1, add);
        for (int r = 0; r < strips_a; ++r) {
          for (int s = 0; s < strips_b; ++s) C[2 * r + s].finish();
        }
        if (track_max) strip_max.add(c + i0 * ldc, ldc, strip_rows, j0, std::min(2 * kTile, cols - j0));
      }
      if (track_max) strip_max.reduce(strip_rows, row_max + i0);
    }
  }
  // Back to the initial tile state: a context switch then saves no tile data.
  _tile_release();
}

#endif  // TFK_HAVE_AMX

}  // namespace

bool available() {
#ifdef TFK_HAVE_AMX
  return !switched_off("TFKERNELS_CPU_AMX") && cpu_has("amx_bf16") && tiles_permitted();
#else
  return false;
#endif
}

void gemm(int64_t m, int64_t cols, int64_t pairs, const c10::BFloat16* a, int64_t lda, const uint32_t* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate, float* row_max) {
  TORCH_CHECK(available(), "tfkernels: amx::gemm needs a CPU with AMX-BF16 and the OS's grant of the tile state");
  TORCH_CHECK(ldb >= (cols + 15) / 16 * 16, "amx::gemm: ldb ", ldb, " shorter than ", cols,
              " columns rounded up to 16");
#ifdef TFK_HAVE_AMX
  gemm_tiles(m, cols, pairs, a, lda, b, ldb, c, ldc, accumulate, row_max);
#endif
}

}  // namespace tfkernels::cpu::amx
