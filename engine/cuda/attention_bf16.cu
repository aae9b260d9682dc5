// Attention on the tensor cores for bf16 inputs (mixed precision): the
// flash-attention algorithm of attention.cu, with every product made in wmma
// fragments (16 x 16 x 16, f32 accumulation) and f32 outputs.
//
// A block of 4 warps owns a 64-row tile (queries in the forward and in dQ,
// keys in dK/dV) and warp w owns its rows 16w .. 16w+15. A warp's scores,
// softmax and accumulators never leave it: a product lands in the warp's own
// scratch tile and its lanes read it back, so only loading a shared K/V (or
// Q/dO) tile needs the whole block. Lane l holds row l % 16 and half l / 16
// of that row's columns: 32 of a tile's 64 scores, D/2 of its D outputs; a
// row's max and sum take one shuffle between its two lanes.
//
// P and dS are rounded to bf16 before they are multiplied, as flash attention
// does; so the forward's exponentials use the fast __expf, whose few-ulp
// error is far below bf16's 2^-9. Head dims up to 128 are padded with zeros to DMAX in {32, 64, 128};
// engine/cuda/cuda_backend.cpp widens larger ones to f32 for attention.cu.
#include "engine/cuda/attention_common.cuh"

#include <mma.h>

namespace engine::cuda::attention {

namespace {

namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;

constexpr int kWarps = 4;
constexpr int kBlockThreads = 32 * kWarps;
constexpr int kRows = 16;  // rows per warp: one fragment high

// Shared-memory geometry. Row strides are multiples of 8 elements (16 bytes),
// as wmma requires, and keep consecutive rows off each other's banks; every
// part is a multiple of 32 bytes, so fragment pointers stay aligned.
template <int DMAX>
struct Layout {
  static constexpr int ld = DMAX + 8;          // bf16 [64, DMAX] tiles of q, k, v, dO
  static constexpr int weight_ld = kTile + 8;  // bf16 [16, 64] per-warp tiles of P or dS
  static constexpr int scratch_ld = (DMAX > kTile ? DMAX : kTile) + 4;  // f32 [16, max(64, DMAX)] per warp
  static constexpr int half = DMAX / 2;        // output columns per lane
  static constexpr size_t tile_bytes = size_t(kTile) * ld * sizeof(bf16);
  static constexpr size_t weight_bytes = size_t(kRows) * weight_ld * sizeof(bf16);
  static constexpr size_t scratch_bytes = size_t(kRows) * scratch_ld * sizeof(float);
  static constexpr size_t smem(int tiles, int weights_per_warp) {
    return tiles * tile_bytes + kWarps * (scratch_bytes + weights_per_warp * weight_bytes);
  }
};

// Where a kernel's parts lie in dynamic shared memory: `tiles` block tiles,
// then each warp's scratch, then each warp's weight tiles.
template <int DMAX>
struct Smem {
  using L = Layout<DMAX>;
  unsigned char* base;
  int tiles;
  __device__ bf16* tile(int index) const { return reinterpret_cast<bf16*>(base + index * L::tile_bytes); }
  __device__ float* scratch(int warp) const {
    return reinterpret_cast<float*>(base + tiles * L::tile_bytes + warp * L::scratch_bytes);
  }
  __device__ bf16* weights(int warp, int index, int per_warp) const {
    return reinterpret_cast<bf16*>(base + tiles * L::tile_bytes + kWarps * L::scratch_bytes +
                                   (warp * per_warp + index) * L::weight_bytes);
  }
};

// Rows row0 .. row0+63 of a contiguous [rows, D] matrix into a [64, DMAX]
// tile, zero-filled past the last row and past D. Whole block; 16-byte
// chunks when D allows them (rows then start 16-byte aligned).
template <int DMAX>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* src, int64_t row0, int64_t rows, int64_t D) {
  constexpr int ld = Layout<DMAX>::ld;
  if (D % 8 == 0) {
    constexpr int chunks = DMAX / 8;
    for (int e = threadIdx.x; e < kTile * chunks; e += kBlockThreads) {
      const int r = e / chunks, c = e % chunks * 8;
      const int64_t row = row0 + r;
      uint4 value = make_uint4(0, 0, 0, 0);
      if (row < rows && c < D) value = *reinterpret_cast<const uint4*>(src + row * D + c);
      *reinterpret_cast<uint4*>(tile + r * ld + c) = value;
    }
    return;
  }
  for (int e = threadIdx.x; e < kTile * DMAX; e += kBlockThreads) {
    const int r = e / DMAX, c = e % DMAX;
    const int64_t row = row0 + r;
    tile[r * ld + c] = (row < rows && c < D) ? src[row * D + c] : bf16(0.f);
  }
}

// A lane's N values of a scratch row, 16 bytes at a time. In this layout the
// eight lanes of each quarter-warp read eight different rows whose starts
// fall in eight different 16-byte bank groups (the row stride is 17 groups),
// so the reads are free of bank conflicts; one float at a time they are not.
template <int N>
__device__ __forceinline__ void read_half_row(float (&x)[N], const float* src) {
#pragma unroll
  for (int c = 0; c < N / 4; ++c) {
    const float4 v = reinterpret_cast<const float4*>(src)[c];
    x[4 * c] = v.x, x[4 * c + 1] = v.y, x[4 * c + 2] = v.z, x[4 * c + 3] = v.w;
  }
}

// A lane's 32 weights (P or dS for its half row) into a weight tile as bf16,
// 16 bytes at a time, for the same reason.
template <int DMAX>
__device__ __forceinline__ void store_weights(bf16* w_rows, const float (&x)[32], int row, int half) {
  uint4* dst = reinterpret_cast<uint4*>(w_rows + row * Layout<DMAX>::weight_ld + half * 32);
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    __nv_bfloat162 pairs[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) pairs[u] = __floats2bfloat162_rn(x[8 * c + 2 * u], x[8 * c + 2 * u + 1]);
    dst[c] = *reinterpret_cast<const uint4*>(pairs);
  }
}

// The lane's 32 values of S = A B^T, for the warp's 16 rows A [16, DMAX] of a
// tile and a whole tile B [64, DMAX] (read column-major, B is B^T).
template <int DMAX>
__device__ __forceinline__ void warp_scores(float (&s)[32], const bf16* a_rows, const bf16* b_tile, float* scratch,
                                            int row, int half) {
  using L = Layout<DMAX>;
#pragma unroll
  for (int col = 0; col < kTile / 16; ++col) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.f);
#pragma unroll
    for (int k = 0; k < DMAX; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> x;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> y;
      wmma::load_matrix_sync(x, a_rows + k, L::ld);
      wmma::load_matrix_sync(y, b_tile + col * 16 * L::ld + k, L::ld);
      wmma::mma_sync(c, x, y, c);
    }
    wmma::store_matrix_sync(scratch + col * 16, c, L::scratch_ld, wmma::mem_row_major);
  }
  __syncwarp();
  read_half_row<32>(s, scratch + row * L::scratch_ld + half * 32);
  __syncwarp();  // scratch is free again
}

// acc += the lane's D/2 values of W M, for the warp's weight tile W [16, 64]
// and a block tile M [64, DMAX].
template <int DMAX>
__device__ __forceinline__ void warp_accumulate(float (&acc)[DMAX / 2], const bf16* w_rows, const bf16* m_tile,
                                                float* scratch, int row, int half) {
  using L = Layout<DMAX>;
#pragma unroll
  for (int col = 0; col < DMAX / 16; ++col) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.f);
#pragma unroll
    for (int k = 0; k < kTile; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> x;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> y;
      wmma::load_matrix_sync(x, w_rows + k, L::weight_ld);
      wmma::load_matrix_sync(y, m_tile + k * L::ld + col * 16, L::ld);
      wmma::mma_sync(c, x, y, c);
    }
    wmma::store_matrix_sync(scratch + col * 16, c, L::scratch_ld, wmma::mem_row_major);
  }
  __syncwarp();
  float product[L::half];
  read_half_row<L::half>(product, scratch + row * L::scratch_ld + half * L::half);
#pragma unroll
  for (int t = 0; t < L::half; ++t) acc[t] += product[t];
  __syncwarp();
}

// The lane's half of an output row, times `scale`, for columns < D.
template <int DMAX>
__device__ __forceinline__ void store_half_row(float* dst_row, const float (&acc)[DMAX / 2], float scale, int half,
                                               int64_t D) {
#pragma unroll
  for (int t = 0; t < DMAX / 2; ++t) {
    const int d = half * (DMAX / 2) + t;
    if (d < D) dst_row[d] = acc[t] * scale;
  }
}

__device__ __forceinline__ float pair_max(float v) { return MaxOp{}(v, __shfl_xor_sync(0xffffffffu, v, 16)); }
__device__ __forceinline__ float pair_sum(float v) { return v + __shfl_xor_sync(0xffffffffu, v, 16); }

// One block per (batch * head, query tile); the online softmax of attention.cu, per warp.
template <int DMAX>
__global__ void __launch_bounds__(kBlockThreads)
    forward_kernel(Problem p, float scale, float* out, float* lse, const bf16* q, const bf16* k, const bf16* v) {
  using L = Layout<DMAX>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const Smem<DMAX> smem{smem_raw, 3};
  bf16 *q_tile = smem.tile(0), *k_tile = smem.tile(1), *v_tile = smem.tile(2);
  __shared__ bool key_ok[kTile];
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, row = lane % kRows, half = lane / kRows;
  float* scratch = smem.scratch(warp);
  bf16* probs = smem.weights(warp, 0, 1);  // [query, key]
  const int64_t bh = blockIdx.x, i0 = int64_t(blockIdx.y) * kTile, i = i0 + warp * kRows + row;
  const int32_t* mask = p.mask_row(bh);
  load_tile<DMAX>(q_tile, q + bh * p.Tq * p.D, i0, p.Tq, p.D);
  const bf16* q_rows = q_tile + warp * kRows * L::ld;

  float m = -INFINITY, l = 0.f, acc[L::half];
  bool seen = false;  // decided by the mask alone, so NaN scores cannot pass for "no key"
#pragma unroll
  for (int t = 0; t < L::half; ++t) acc[t] = 0.f;

  const int64_t key_end = p.key_end(i0 + kTile);
  for (int64_t j0 = 0; j0 < key_end; j0 += kTile) {
    __syncthreads();  // every warp is done with the previous K and V
    if (!load_key_flags(key_ok, p, mask, j0)) continue;  // all padding: skipped, as the CPU skips it
    load_tile<DMAX>(k_tile, k + bh * p.Tk * p.D, j0, p.Tk, p.D);
    load_tile<DMAX>(v_tile, v + bh * p.Tk * p.D, j0, p.Tk, p.D);
    __syncthreads();

    float s[32];
    warp_scores<DMAX>(s, q_rows, k_tile, scratch, row, half);
    bool any = false;
    float tile_max = -INFINITY;
#pragma unroll
    for (int t = 0; t < 32; ++t) {
      const int jl = half * 32 + t;
      const bool visible = key_ok[jl] && i < p.Tq && p.in_causal_window(i, j0 + jl);
      s[t] = visible ? s[t] * scale : -INFINITY;
      any |= visible;
      tile_max = MaxOp{}(tile_max, s[t]);
    }
    any = __shfl_xor_sync(0xffffffffu, int(any), 16) != 0 || any;
    tile_max = pair_max(tile_max);
    const bool grows = any && tile_max > m;
    const float new_max = grows ? tile_max : m;
    const float rescale = grows ? __expf(m - tile_max) : 1.f;  // 0 on the row's first keys (m = -inf)
    float sum = 0.f;
#pragma unroll
    for (int t = 0; t < 32; ++t) {
      const float prob = any ? __expf(s[t] - new_max) : 0.f;  // a NaN score makes the row NaN, as it should
      sum += prob;  // the normaliser counts every probability, dropped or not
      s[t] = prob * p.dropout_factor<float>(bh, i, j0 + half * 32 + t);
    }
    store_weights<DMAX>(probs, s, row, half);
    sum = pair_sum(sum);
    if (any) {
      seen = true;
      m = new_max;
      l = l * rescale + sum;
#pragma unroll
      for (int t = 0; t < L::half; ++t) acc[t] *= rescale;
    }
    __syncwarp();
    warp_accumulate<DMAX>(acc, probs, v_tile, scratch, row, half);  // acc += P V
  }

  if (i >= p.Tq) return;
  if (half == 0) lse[bh * p.Tq + i] = seen ? m + logf(l) : -INFINITY;
  store_half_row<DMAX>(out + (bh * p.Tq + i) * p.D, acc, seen ? 1.f / l : 0.f, half, p.D);
}

// dQ for one (batch * head, query tile): dQ = dS K, dS = scale * P * (dP F - delta), dP = dO V^T.
template <int DMAX>
__global__ void __launch_bounds__(kBlockThreads)
    dq_kernel(Problem p, float scale, float* dq, const bf16* dout, const bf16* q, const bf16* k, const bf16* v,
              const float* lse, const float* delta) {
  using L = Layout<DMAX>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const Smem<DMAX> smem{smem_raw, 4};
  bf16 *q_tile = smem.tile(0), *do_tile = smem.tile(1), *k_tile = smem.tile(2), *v_tile = smem.tile(3);
  __shared__ bool key_ok[kTile];
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, row = lane % kRows, half = lane / kRows;
  float* scratch = smem.scratch(warp);
  bf16* ds = smem.weights(warp, 0, 1);  // [query, key]
  const int64_t bh = blockIdx.x, i0 = int64_t(blockIdx.y) * kTile, i = i0 + warp * kRows + row;
  const int32_t* mask = p.mask_row(bh);
  load_tile<DMAX>(q_tile, q + bh * p.Tq * p.D, i0, p.Tq, p.D);
  load_tile<DMAX>(do_tile, dout + bh * p.Tq * p.D, i0, p.Tq, p.D);
  const bf16 *q_rows = q_tile + warp * kRows * L::ld, *do_rows = do_tile + warp * kRows * L::ld;
  const float row_lse = i < p.Tq ? lse[bh * p.Tq + i] : -INFINITY;
  const float row_delta = i < p.Tq ? delta[bh * p.Tq + i] : 0.f;
  float acc[L::half];
#pragma unroll
  for (int t = 0; t < L::half; ++t) acc[t] = 0.f;

  const int64_t key_end = p.key_end(i0 + kTile);
  for (int64_t j0 = 0; j0 < key_end; j0 += kTile) {
    __syncthreads();
    if (!load_key_flags(key_ok, p, mask, j0)) continue;
    load_tile<DMAX>(k_tile, k + bh * p.Tk * p.D, j0, p.Tk, p.D);
    load_tile<DMAX>(v_tile, v + bh * p.Tk * p.D, j0, p.Tk, p.D);
    __syncthreads();
    float s[32], dp[32];
    warp_scores<DMAX>(s, q_rows, k_tile, scratch, row, half);
    warp_scores<DMAX>(dp, do_rows, v_tile, scratch, row, half);
#pragma unroll
    for (int t = 0; t < 32; ++t) {
      const int jl = half * 32 + t;
      const bool visible = key_ok[jl] && i < p.Tq && p.in_causal_window(i, j0 + jl);
      const float prob = probability(visible, s[t], scale, row_lse);
      s[t] = scale * prob * (dp[t] * p.dropout_factor<float>(bh, i, j0 + jl) - row_delta);
    }
    store_weights<DMAX>(ds, s, row, half);
    __syncwarp();
    warp_accumulate<DMAX>(acc, ds, k_tile, scratch, row, half);  // dQ += dS K
  }
  if (i < p.Tq) store_half_row<DMAX>(dq + (bh * p.Tq + i) * p.D, acc, 1.f, half, p.D);
}

// dK and dV for one (batch * head, key tile): dV = (P F)^T dO, dK = dS^T Q.
// Here a warp's rows are keys and its score columns queries: it makes P^T and
// dS^T directly, as K Q^T and V dO^T.
template <int DMAX>
__global__ void __launch_bounds__(kBlockThreads)
    dkv_kernel(Problem p, float scale, float* dk, float* dv, const bf16* dout, const bf16* q, const bf16* k,
               const bf16* v, const float* lse, const float* delta) {
  using L = Layout<DMAX>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const Smem<DMAX> smem{smem_raw, 4};
  bf16 *k_tile = smem.tile(0), *v_tile = smem.tile(1), *q_tile = smem.tile(2), *do_tile = smem.tile(3);
  __shared__ bool key_ok[kTile];
  __shared__ float tile_lse[kTile], tile_delta[kTile];
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, row = lane % kRows, half = lane / kRows;
  float* scratch = smem.scratch(warp);
  bf16 *p_t = smem.weights(warp, 0, 2), *ds_t = smem.weights(warp, 1, 2);  // [key, query]
  const int64_t bh = blockIdx.x, j0 = int64_t(blockIdx.y) * kTile;
  const int jl = warp * kRows + row;
  const int64_t j = j0 + jl;
  const bool need_ds = dk != nullptr;  // dV alone needs only P
  const int32_t* mask = p.mask_row(bh);
  float dk_acc[L::half], dv_acc[L::half];
#pragma unroll
  for (int t = 0; t < L::half; ++t) dk_acc[t] = dv_acc[t] = 0.f;

  // A tile of padding keys gets zero gradient without reading any query.
  if (load_key_flags(key_ok, p, mask, j0)) {
    load_tile<DMAX>(k_tile, k + bh * p.Tk * p.D, j0, p.Tk, p.D);
    load_tile<DMAX>(v_tile, v + bh * p.Tk * p.D, j0, p.Tk, p.D);
    const bf16 *k_rows = k_tile + warp * kRows * L::ld, *v_rows = v_tile + warp * kRows * L::ld;
    // Under causal masking, queries before j0 - shift see none of these keys.
    const int64_t first_query = p.causal ? max64(0, j0 - p.causal_shift) : 0;
    for (int64_t i0 = first_query / kTile * kTile; i0 < p.Tq; i0 += kTile) {
      __syncthreads();  // every warp is done with the previous Q and dO
      load_tile<DMAX>(q_tile, q + bh * p.Tq * p.D, i0, p.Tq, p.D);
      load_tile<DMAX>(do_tile, dout + bh * p.Tq * p.D, i0, p.Tq, p.D);
      load_query_stats(tile_lse, tile_delta, p, bh, i0, lse, delta);
      __syncthreads();
      float s[32], dp[32];
      warp_scores<DMAX>(s, k_rows, q_tile, scratch, row, half);                 // s[t] = <k_j, q_i>
      if (need_ds) warp_scores<DMAX>(dp, v_rows, do_tile, scratch, row, half);  // dp[t] = <v_j, dO_i>
#pragma unroll
      for (int t = 0; t < 32; ++t) {
        const int il = half * 32 + t;
        const int64_t i = i0 + il;
        const bool visible = key_ok[jl] && i < p.Tq && p.in_causal_window(i, j);
        const float prob = probability(visible, s[t], scale, tile_lse[il]);
        const float factor = p.dropout_factor<float>(bh, i, j);
        s[t] = prob * factor;
        if (need_ds) dp[t] = scale * prob * (dp[t] * factor - tile_delta[il]);
      }
      store_weights<DMAX>(p_t, s, row, half);
      if (need_ds) store_weights<DMAX>(ds_t, dp, row, half);
      __syncwarp();
      warp_accumulate<DMAX>(dv_acc, p_t, do_tile, scratch, row, half);              // dV += (P F)^T dO
      if (need_ds) warp_accumulate<DMAX>(dk_acc, ds_t, q_tile, scratch, row, half);  // dK += dS^T Q
    }
  }
  if (j >= p.Tk) return;
  if (dk) store_half_row<DMAX>(dk + (bh * p.Tk + j) * p.D, dk_acc, 1.f, half, p.D);
  if (dv) store_half_row<DMAX>(dv + (bh * p.Tk + j) * p.D, dv_acc, 1.f, half, p.D);
}

// Calls fn(std::integral_constant<int, DMAX>) for the smallest padded head size that holds D.
template <typename Fn>
void by_head_size(int64_t D, Fn&& fn) {
  if (D <= 32) fn(std::integral_constant<int, 32>{});
  else if (D <= 64) fn(std::integral_constant<int, 64>{});
  else fn(std::integral_constant<int, 128>{});
}

int64_t tiles_of(int64_t rows) { return (rows + kTile - 1) / kTile; }

}  // namespace

cudaError_t launch_forward_bf16(const LaunchContext& ctx, const AttentionShape& shape, float* out, float* lse,
                                const bf16* q, const bf16* k, const bf16* v) {
  const Problem p = problem_of(shape);
  const int64_t bh = shape.B * shape.H, tiles = tiles_of(shape.Tq);
  if (bh == 0 || tiles == 0) return cudaSuccess;
  if (!grid_fits(bh, tiles)) return cudaErrorInvalidConfiguration;
  cudaError_t status = cudaSuccess;
  by_head_size(shape.D, [&](auto dmax) {
    constexpr int DMAX = decltype(dmax)::value;
    status = launch_with_smem(forward_kernel<DMAX>, dim3(unsigned(bh), unsigned(tiles)), kBlockThreads,
                              Layout<DMAX>::smem(3, 1), ctx.stream, p, float(shape.scale), out, lse, q, k, v);
  });
  return status;
}

cudaError_t launch_backward_bf16(const LaunchContext& ctx, const AttentionShape& shape, float* dq, float* dk,
                                 float* dv, const bf16* dout, const bf16* q, const bf16* k, const bf16* v,
                                 const float* out, const float* lse, float* delta) {
  const Problem p = problem_of(shape);
  const int64_t bh = shape.B * shape.H, q_tiles = tiles_of(shape.Tq), k_tiles = tiles_of(shape.Tk);
  if (bh == 0 || (!dq && !dk && !dv)) return cudaSuccess;
  if (!grid_fits(bh, q_tiles) || !grid_fits(bh, k_tiles)) return cudaErrorInvalidConfiguration;
  cudaError_t status = cudaSuccess;
  if (dq || dk) status = launch_delta(ctx, bh * shape.Tq, shape.D, delta, dout, out);  // dV alone needs no delta
  const float scale = float(shape.scale);
  by_head_size(shape.D, [&](auto dmax) {
    constexpr int DMAX = decltype(dmax)::value;
    if (dq && q_tiles > 0 && status == cudaSuccess)
      status = launch_with_smem(dq_kernel<DMAX>, dim3(unsigned(bh), unsigned(q_tiles)), kBlockThreads,
                                Layout<DMAX>::smem(4, 1), ctx.stream, p, scale, dq, dout, q, k, v, lse, delta);
    if ((dk || dv) && k_tiles > 0 && status == cudaSuccess)
      status = launch_with_smem(dkv_kernel<DMAX>, dim3(unsigned(bh), unsigned(k_tiles)), kBlockThreads,
                                Layout<DMAX>::smem(4, 2), ctx.stream, p, scale, dk, dv, dout, q, k, v, lse, delta);
  });
  return status;
}

}  // namespace engine::cuda::attention
