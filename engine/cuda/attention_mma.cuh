// The warp-level pieces of the tensor-core attention kernels (attention_bf16.cu):
// mma.sync fragments and where each lane's values sit, ldmatrix operands,
// and 64-row bf16 tiles streamed from global to shared memory by cp.async.
#pragma once

#include "engine/cuda/attention_common.cuh"

namespace engine::cuda::attention {

using bf16 = __nv_bfloat16;

constexpr int kWarps = 4;
constexpr int kBlockThreads = 32 * kWarps;
constexpr int kRows = 16;  // rows per warp: one mma tile high

// ---- Fragments ----
// mma.sync.m16n8k16 multiplies A [16, 16] by B [16, 8] into C [16, 8]. Lane l
// of the warp, with g = l / 4 and t = l % 4, holds
//   of C: rows g and g + 8, columns 2t and 2t + 1: c[0], c[1] (row g), c[2], c[3] (row g + 8);
//   of A: the same rows and columns, then columns + 8; two bf16 per register;
//   of B: rows 2t, 2t + 1 (and + 8) of column g.
// A 16 x 64 score tile is eight C tiles: float[8][4] per lane.

using Scores = float[kTile / 8][4];

__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8 x 8 bf16 matrices from shared memory; lane l gives the address of
// row l % 8 of matrix l / 8 and receives, of each matrix, row l / 4, columns
// 2(l % 4) and 2(l % 4) + 1 (transposed: rows and columns swap).
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[4], const bf16* row) {
  const unsigned address = unsigned(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
__device__ __forceinline__ void ldmatrix_transposed(uint32_t (&r)[4], const bf16* row) {
  const unsigned address = unsigned(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ uint32_t pack_bf16(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// Where lane l points ldmatrix for a 16 x 16 block at (r0, c0) of a row-major
// tile: as an A operand (matrices: top-left, bottom-left, top-right,
// bottom-right), which is also a B operand read transposed (B's rows are the
// tile's rows); and as a B operand [n, k] read straight, two 8-column tiles.
__device__ __forceinline__ int operand_row(int lane) { return lane % 8 + 8 * (lane / 8 % 2); }
__device__ __forceinline__ int operand_col(int lane) { return 8 * (lane / 16); }
__device__ __forceinline__ int b_row(int lane) { return lane % 8 + 8 * (lane / 16); }
__device__ __forceinline__ int b_col(int lane) { return 8 * (lane / 8 % 2); }

// Row stride of a bf16 [64, DMAX] shared tile: 16 bytes more than a row, so
// the eight rows one ldmatrix matrix reads start in eight different banks.
template <int DMAX>
constexpr int kLd = DMAX + 8;

template <int DMAX>
constexpr int kTileElems = kTile * kLd<DMAX>;

// ---- loading tiles: cp.async, global to shared without registers ----

// 16 bytes; with `valid` false, 16 zero bytes (nothing is read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned address = unsigned(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `pending` of this thread's newest groups are in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
}

// The [T, D] matrix of one (batch, head) of an operand: row r starts at
// base + r * ld (the operand's row stride, which a view may make anything).
template <typename T>
struct Rows {
  T* base;
  int64_t ld;
  __device__ T* row(int64_t r) const { return base + r * ld; }
  __device__ Rows from(int64_t r) const { return {row(r), ld}; }
};

template <typename T>
__device__ __forceinline__ Rows<T> rows_of(const Problem& p, T* data, const HeadStrides& s, int64_t bh) {
  return {data + p.offset(s, bh), s.row};
}

// Starts copying rows row0 .. row0+63 of a [rows, cols] matrix into a [64, COLS]
// tile, zero-filled past the last row and past cols. Whole block. In 16-byte
// cp.async chunks when every row starts 16-byte aligned and cols is a multiple
// of 8 (`vector`): the copy lands by cp_async_wait and a barrier. Otherwise
// element by element, which the barrier alone publishes.
template <int COLS>
__device__ __forceinline__ void load_rows(bf16* tile, Rows<const bf16> src, int64_t row0, int64_t rows, int64_t cols,
                                          bool vector) {
  constexpr int ld = kLd<COLS>;
  if (vector) {
    constexpr int chunks = COLS / 8;
    for (int e = threadIdx.x; e < kTile * chunks; e += kBlockThreads) {
      const int r = e / chunks, c = e % chunks * 8;
      const int64_t row = row0 + r;
      const bool valid = row < rows && c < cols;
      cp_async16(tile + r * ld + c, valid ? src.row(row) + c : src.base, valid);
    }
    return;
  }
  for (int e = threadIdx.x; e < kTile * COLS; e += kBlockThreads) {
    const int r = e / COLS, c = e % COLS;
    const int64_t row = row0 + r;
    tile[r * ld + c] = (row < rows && c < cols) ? src.row(row)[c] : bf16(0.f);
  }
}

// The same for a tile of q, k, v or dO: D columns, padded to DMAX.
template <int DMAX>
__device__ __forceinline__ void load_tile(bf16* tile, Rows<const bf16> src, int64_t row0, int64_t rows,
                                          const Problem& p) {
  load_rows<DMAX>(tile, src, row0, rows, p.D, p.vector_loads);
}

// The 64-row tiles of two [rows, D] matrices (K and V, or Q and dO), streamed
// through two shared buffers: the block computes on one pair of tiles while
// the next pair is in flight.
template <int DMAX>
struct TileStream {
  bf16* base;  // four tiles: buffer 0's two, then buffer 1's
  Rows<const bf16> first, second;
  int64_t rows;

  __device__ bf16* tile(int buffer, int which) const { return base + (2 * buffer + which) * kTileElems<DMAX>; }
  // Starts loading rows row0 .. row0+63 into `buffer`, if row0 < end, and
  // closes a cp.async group either way, so the groups count one per tile.
  __device__ void fetch(int buffer, int64_t row0, int64_t end, const Problem& p) const {
    if (row0 < end) {
      load_tile<DMAX>(tile(buffer, 0), first, row0, rows, p);
      load_tile<DMAX>(tile(buffer, 1), second, row0, rows, p);
    }
    cp_async_commit();
  }
};

// s = A B^T for the warp's 16 rows A [16, DMAX] of one tile and a whole tile
// B [64, DMAX] (its rows are the score columns).
template <int DMAX>
__device__ __forceinline__ void warp_scores(Scores& s, const bf16* a_rows, const bf16* b_tile, int lane) {
  constexpr int ld = kLd<DMAX>;
#pragma unroll
  for (int n = 0; n < kTile / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
  for (int k = 0; k < DMAX; k += 16) {
    uint32_t a[4];
    ldmatrix(a, a_rows + operand_row(lane) * ld + k + operand_col(lane));
#pragma unroll
    for (int n = 0; n < kTile / 8; n += 2) {
      uint32_t b[4];
      ldmatrix(b, b_tile + (n * 8 + b_row(lane)) * ld + k + b_col(lane));
      mma(s[n], a, b[0], b[1]);
      mma(s[n + 1], a, b[2], b[3]);
    }
  }
}

// acc [16, DMAX] += A M[16k .. 16k+15] for one 16-deep step: A the warp's
// [16, 16] operand, M a block tile [64, DMAX].
template <int DMAX>
__device__ __forceinline__ void accumulate_step(float (&acc)[DMAX / 8][4], const uint32_t (&a)[4], const bf16* m_tile,
                                                int k, int lane) {
  constexpr int ld = kLd<DMAX>;
#pragma unroll
  for (int n = 0; n < DMAX / 8; n += 2) {
    uint32_t b[4];
    ldmatrix_transposed(b, m_tile + (k * 16 + operand_row(lane)) * ld + n * 8 + operand_col(lane));
    mma(acc[n], a, b[0], b[1]);
    mma(acc[n + 1], a, b[2], b[3]);
  }
}

// acc [16, DMAX] += W M for the warp's weights W [16, 64] (P or dS, in score
// layout, rounded to bf16 here) and a block tile M [64, DMAX].
template <int DMAX>
__device__ __forceinline__ void warp_accumulate(float (&acc)[DMAX / 8][4], const Scores& w, const bf16* m_tile,
                                                int lane) {
#pragma unroll
  for (int k = 0; k < kTile / 16; ++k) {
    const uint32_t a[4] = {pack_bf16(w[2 * k][0], w[2 * k][1]), pack_bf16(w[2 * k][2], w[2 * k][3]),
                           pack_bf16(w[2 * k + 1][0], w[2 * k + 1][1]), pack_bf16(w[2 * k + 1][2], w[2 * k + 1][3])};
    accumulate_step<DMAX>(acc, a, m_tile, k, lane);
  }
}

// The lane's two rows of a [16, DMAX] accumulator, times scale[row], for
// rows below `rows` and columns below D, rounded to T; dst starts at the
// warp's first row.
template <int DMAX, typename T>
__device__ __forceinline__ void store_rows(Rows<T> dst, const float (&acc)[DMAX / 8][4], const float (&scale)[2],
                                           int64_t rows, int64_t D, int lane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = lane / 4 + 8 * h;
    if (r >= rows) continue;
#pragma unroll
    for (int n = 0; n < DMAX / 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = n * 8 + 2 * (lane % 4) + e;
        if (d < D) dst.row(r)[d] = convert<T>(acc[n][2 * h + e] * scale[h]);
      }
  }
}

// The row (h = 0: lane / 4, h = 1: lane / 4 + 8) and column of element
// [n][e] of a lane's score tile.
__device__ __forceinline__ int score_row(int lane, int e) { return lane / 4 + 8 * (e / 2); }
__device__ __forceinline__ int score_col(int lane, int n, int e) { return n * 8 + 2 * (lane % 4) + e % 2; }

// A row's four lanes (same lane / 4) combine their values.
__device__ __forceinline__ float quad_max(float v) {
  v = MaxOp{}(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return MaxOp{}(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

template <int DMAX>
__device__ __forceinline__ void zero(float (&acc)[DMAX / 8][4]) {
#pragma unroll
  for (int n = 0; n < DMAX / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

}  // namespace engine::cuda::attention
