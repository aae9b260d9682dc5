// The tile arithmetic of the flash-attention kernels (attention.cu), in two
// implementations with one interface, chosen by the input type:
//   Tiles<float, DMAX>:          f32 tiles, products by FMA on the CUDA cores;
//   Tiles<__nv_bfloat16, DMAX>:  bf16 tiles, products on the tensor cores
//                                (wmma 16x16x16, f32 accumulation), the
//                                probabilities rounded to bf16 as flash
//                                attention rounds them.
// A block of 256 threads works on 64 x 64 score tiles. Thread (ty, tx) of the
// 16 x 16 grid owns scores (ty + 16a, tx + 16b) and output elements
// (ty + 16a, tx + 16c) for a, b < 4, whichever implementation made them, so
// the softmax code of the kernels is shared. D is padded to DMAX in
// {32, 64, 128} with zeros, so inner loops have fixed trip counts.
#pragma once

#include "engine/cuda/common.cuh"

#include <mma.h>

namespace engine::cuda::attention {

constexpr int kTile = 64;                  // queries or keys per tile
constexpr int kSub = 16;                   // threads per tile side
constexpr int kPer = kTile / kSub;         // rows (and score columns) per thread: 4
constexpr int kTileThreads = kSub * kSub;  // 256
constexpr int kWarps = kTileThreads / 32;  // 8

template <typename In, int DMAX>
struct Tiles;

// ---- f32: FMA ----

template <int DMAX>
struct Tiles<float, DMAX> {
  using Elem = float;                     // q, k, v and dO tiles
  using Weight = float;                   // probability-like [64, 64] tiles
  static constexpr int ld = DMAX + 1;     // +1 word per row: column reads from 16 rows hit 16 banks
  static constexpr int weight_ld = kTile + 1;
  static constexpr int cols = DMAX / kSub;  // output columns per thread
  static constexpr size_t scratch_bytes = 0;

  static __device__ __forceinline__ Weight weight(float x) { return x; }

  // s[a][b] = <A[ty + 16a], B[tx + 16b]> over the padded DMAX columns.
  static __device__ __forceinline__ void scores(float (&s)[kPer][kPer], const Elem* a_tile, const Elem* b_tile, int ty,
                                                int tx, float*) {
#pragma unroll
    for (int a = 0; a < kPer; ++a)
#pragma unroll
      for (int b = 0; b < kPer; ++b) s[a][b] = 0.f;
#pragma unroll 8
    for (int d = 0; d < DMAX; ++d) {
      float x[kPer], y[kPer];
#pragma unroll
      for (int a = 0; a < kPer; ++a) x[a] = a_tile[(ty + kSub * a) * ld + d];
#pragma unroll
      for (int b = 0; b < kPer; ++b) y[b] = b_tile[(tx + kSub * b) * ld + d];
#pragma unroll
      for (int a = 0; a < kPer; ++a)
#pragma unroll
        for (int b = 0; b < kPer; ++b) s[a][b] += x[a] * y[b];
    }
  }

  // acc[a][c] += sum_k W[ty + 16a][k] * M[k][tx + 16c]: W a [64, 64] weight tile, M a [64, DMAX] tile.
  static __device__ __forceinline__ void accumulate(float (&acc)[kPer][cols], const Weight* w, const Elem* m, int ty,
                                                    int tx, float*) {
#pragma unroll 4
    for (int k = 0; k < kTile; ++k) {
      float x[kPer], y[cols];
#pragma unroll
      for (int a = 0; a < kPer; ++a) x[a] = w[(ty + kSub * a) * weight_ld + k];
#pragma unroll
      for (int c = 0; c < cols; ++c) y[c] = m[k * ld + tx + kSub * c];
#pragma unroll
      for (int a = 0; a < kPer; ++a)
#pragma unroll
        for (int c = 0; c < cols; ++c) acc[a][c] += x[a] * y[c];
    }
  }
};

// ---- bf16: tensor cores ----

// Each product is made in 16 x 16 fragments by the 8 warps, stored to an f32
// scratch tile, and read back by every thread in the layout above. The
// barriers inside make each call self-contained: scratch is free again when
// it returns. Row strides are multiples of 8 elements (16 bytes), as wmma
// requires, and pad rows away from sharing banks.
template <int DMAX>
struct Tiles<__nv_bfloat16, DMAX> {
  using Elem = __nv_bfloat16;
  using Weight = __nv_bfloat16;
  static constexpr int ld = DMAX + 8;
  static constexpr int weight_ld = kTile + 8;
  static constexpr int cols = DMAX / kSub;
  static constexpr int scratch_ld = (DMAX > kTile ? DMAX : kTile) + 4;
  static constexpr size_t scratch_bytes = sizeof(float) * kTile * scratch_ld;

  static __device__ __forceinline__ Weight weight(float x) { return __float2bfloat16_rn(x); }

  using Accumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  template <typename Layout>
  using FragmentA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, Layout>;
  template <typename Layout>
  using FragmentB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, Layout>;

  // S = A B^T for [64, DMAX] tiles A and B: B read column-major is B^T.
  static __device__ __forceinline__ void scores(float (&s)[kPer][kPer], const Elem* a_tile, const Elem* b_tile, int ty,
                                                int tx, float* scratch) {
    namespace wmma = nvcuda::wmma;
    const int warp = int(threadIdx.x) / 32;
    for (int f = warp; f < kPer * kPer; f += kWarps) {  // 16 fragments, 2 per warp
      const int row = f / kPer, col = f % kPer;
      Accumulator c;
      wmma::fill_fragment(c, 0.f);
#pragma unroll
      for (int k = 0; k < DMAX; k += 16) {
        FragmentA<wmma::row_major> x;
        FragmentB<wmma::col_major> y;
        wmma::load_matrix_sync(x, a_tile + row * 16 * ld + k, ld);
        wmma::load_matrix_sync(y, b_tile + col * 16 * ld + k, ld);
        wmma::mma_sync(c, x, y, c);
      }
      wmma::store_matrix_sync(scratch + row * 16 * scratch_ld + col * 16, c, scratch_ld, wmma::mem_row_major);
    }
    __syncthreads();
#pragma unroll
    for (int a = 0; a < kPer; ++a)
#pragma unroll
      for (int b = 0; b < kPer; ++b) s[a][b] = scratch[(ty + kSub * a) * scratch_ld + tx + kSub * b];
    __syncthreads();
  }

  // acc += W M for a [64, 64] weight tile W and a [64, DMAX] tile M.
  static __device__ __forceinline__ void accumulate(float (&acc)[kPer][cols], const Weight* w, const Elem* m, int ty,
                                                    int tx, float* scratch) {
    namespace wmma = nvcuda::wmma;
    const int warp = int(threadIdx.x) / 32;
    constexpr int col_frags = DMAX / 16;
    for (int f = warp; f < kPer * col_frags; f += kWarps) {
      const int row = f / col_frags, col = f % col_frags;
      Accumulator c;
      wmma::fill_fragment(c, 0.f);
#pragma unroll
      for (int k = 0; k < kTile; k += 16) {
        FragmentA<wmma::row_major> x;
        FragmentB<wmma::row_major> y;
        wmma::load_matrix_sync(x, w + row * 16 * weight_ld + k, weight_ld);
        wmma::load_matrix_sync(y, m + k * ld + col * 16, ld);
        wmma::mma_sync(c, x, y, c);
      }
      wmma::store_matrix_sync(scratch + row * 16 * scratch_ld + col * 16, c, scratch_ld, wmma::mem_row_major);
    }
    __syncthreads();
#pragma unroll
    for (int a = 0; a < kPer; ++a)
#pragma unroll
      for (int c = 0; c < cols; ++c) acc[a][c] += scratch[(ty + kSub * a) * scratch_ld + tx + kSub * c];
    __syncthreads();
  }
};

// Shared memory of a kernel holding `tiles` [64, DMAX] tiles and `weights`
// [64, 64] weight tiles, plus the scratch, each part a multiple of 32 bytes.
template <typename In, int DMAX>
constexpr size_t smem_bytes(int tiles, int weights) {
  using T = Tiles<In, DMAX>;
  return size_t(tiles) * kTile * T::ld * sizeof(typename T::Elem) +
         size_t(weights) * kTile * T::weight_ld * sizeof(typename T::Weight) + T::scratch_bytes;
}

// Carves a kernel's dynamic shared memory into its tiles, in order.
template <typename In, int DMAX>
struct SmemCursor {
  using T = Tiles<In, DMAX>;
  unsigned char* next;
  __device__ typename T::Elem* tile() { return take<typename T::Elem>(kTile * T::ld); }
  __device__ typename T::Weight* weight_tile() { return take<typename T::Weight>(kTile * T::weight_ld); }
  __device__ float* scratch() { return take<float>(T::scratch_bytes / sizeof(float)); }
  template <typename E>
  __device__ E* take(size_t count) {
    E* p = reinterpret_cast<E*>(next);
    next += count * sizeof(E);
    return p;
  }
};

// Rows row0 .. row0+63 of a contiguous [rows, D] matrix into a [64, DMAX]
// tile, zero-filled past the last row and past D.
template <typename In, int DMAX>
__device__ __forceinline__ void load_tile(In* tile, const In* src, int64_t row0, int64_t rows, int64_t D) {
  constexpr int ld = Tiles<In, DMAX>::ld;
  for (int e = threadIdx.x; e < kTile * DMAX; e += kTileThreads) {
    const int r = e / DMAX, c = e % DMAX;
    const int64_t row = row0 + r;
    tile[r * ld + c] = (row < rows && c < D) ? src[row * D + c] : In(0.f);
  }
}

// Reductions over the 16 threads (tx) that share a tile row: half a warp.
__device__ __forceinline__ float row_max(float v) { return warp_reduce<kSub>(v, MaxOp{}); }
__device__ __forceinline__ float row_sum(float v) { return warp_reduce<kSub>(v, SumOp{}); }
__device__ __forceinline__ bool row_any(bool v) { return warp_reduce<kSub>(int(v), MaxOp{}) != 0; }

}  // namespace engine::cuda::attention
