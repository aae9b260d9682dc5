// Attention on CUDA, flash-attention style: softmax(scale * q k^T, masked) v
// without a Tq x Tk matrix in device memory. The forward folds key tiles into
// each query tile with an online softmax and saves the per-query log-sum-exp
// (lse); the backward recomputes each probability tile from q, k and lse.
// Conventions are engine/cpu/cpu_attention.cpp's: query i sees key j when
// key_mask[b, j] != 0 and, if causal, j <= i + (Tk - Tq); a query that sees
// no key outputs zeros with lse = -inf and gets zero gradient. Dropout on the
// probabilities draws each keep decision from Philox by the probability's
// index, exactly as the CPU does, so the backward regenerates the mask.
//
// Three implementations:
//   tiled:    f32 with head dim D <= 128 (GPT-2 has 64). A block of 256
//             threads owns a 64-row tile; scores come in 64 x 64 tiles held
//             in shared memory, each thread computing a 4 x 4 sub-tile
//             (rows ty + 16a, columns tx + 16b for a, b < 4). D is padded to
//             DMAX in {32, 64, 128} with zeros, so inner loops have fixed trip counts.
//   bf16:     bf16 inputs (mixed precision), D <= 128, on the tensor cores,
//             any strides: attention_bf16.cu.
//   fallback: any D, f32 or f64 (f64 is for gradient checks): one warp per
//             row, scores one key at a time with warp-reduced dot products,
//             accumulating straight into the output row. Slow but plain.
// The backward is three kernels: delta_i = rowsum(dO * O), then dQ over
// query tiles and dK/dV over key tiles, so that no gradient needs atomics and
// results are deterministic. Here each recomputes P (and dP) on its own; the
// bf16 kernels instead keep dS from dK/dV's pass for dQ's.
#include "engine/cuda/attention_common.cuh"

namespace engine::cuda {

namespace {

using attention::kTile;
using attention::load_key_flags;
using attention::load_query_stats;
using attention::probability;
using attention::Problem;
using attention::problem_of;

// ======================= tiled kernels (f32, D <= 128) =======================

constexpr int kSub = 16;                   // threads per tile side: thread (ty, tx) in a 16 x 16 grid
constexpr int kPer = kTile / kSub;         // rows (and score columns) per thread: 4
constexpr int kTileThreads = kSub * kSub;  // 256
constexpr int kScoreLd = kTile + 1;        // +1 word per row: column reads from 16 rows hit 16 banks

template <int DMAX>
struct TileDims {
  static constexpr int ld = DMAX + 1;        // padded row stride of a [64, D] tile in shared memory
  static constexpr int cols = DMAX / kSub;   // output columns per thread: d = tx + 16c
  static constexpr int tile_floats = kTile * ld;
  static constexpr int score_floats = kTile * kScoreLd;
};

// Rows row0 .. row0+63 of a contiguous [rows, D] matrix into a [64, DMAX]
// shared tile, zero-filled past the last row and past D.
template <int DMAX>
__device__ __forceinline__ void load_tile(float* tile, const float* src, int64_t row0, int64_t rows, int64_t D) {
  for (int e = threadIdx.x; e < kTile * DMAX; e += kTileThreads) {
    const int r = e / DMAX, c = e % DMAX;
    const int64_t row = row0 + r;
    tile[r * TileDims<DMAX>::ld + c] = (row < rows && c < D) ? src[row * D + c] : 0.f;
  }
}

// s[a][b] = <A[row ty + 16a], B[row tx + 16b]> over the padded DMAX columns.
template <int DMAX>
__device__ __forceinline__ void tile_scores(float (&s)[kPer][kPer], const float* a_tile, const float* b_tile, int ty,
                                            int tx) {
  constexpr int ld = TileDims<DMAX>::ld;
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

// acc[a][c] += sum_k W[ty + 16a][k] * M[k][tx + 16c]: W a 64 x 64 score-like
// tile (row stride kScoreLd), M a [64, DMAX] tile.
template <int DMAX>
__device__ __forceinline__ void tile_accumulate(float (&acc)[kPer][TileDims<DMAX>::cols], const float* w,
                                                const float* m, int ty, int tx) {
  constexpr int ld = TileDims<DMAX>::ld, cols = TileDims<DMAX>::cols;
#pragma unroll 4
  for (int k = 0; k < kTile; ++k) {
    float x[kPer], y[cols];
#pragma unroll
    for (int a = 0; a < kPer; ++a) x[a] = w[(ty + kSub * a) * kScoreLd + k];
#pragma unroll
    for (int c = 0; c < cols; ++c) y[c] = m[k * ld + tx + kSub * c];
#pragma unroll
    for (int a = 0; a < kPer; ++a)
#pragma unroll
      for (int c = 0; c < cols; ++c) acc[a][c] += x[a] * y[c];
  }
}

// Reductions over the 16 threads (tx) that share a tile row: half a warp.
__device__ __forceinline__ float row_max(float v) { return warp_reduce<kSub>(v, MaxOp{}); }
__device__ __forceinline__ float row_sum(float v) { return warp_reduce<kSub>(v, SumOp{}); }
__device__ __forceinline__ bool row_any(bool v) { return warp_reduce<kSub>(int(v), MaxOp{}) != 0; }

// Writes rows row0 .. row0+63 (those < rows, columns < D) of a [rows, D] output.
template <int DMAX>
__device__ __forceinline__ void store_rows(float* dst, const float (&acc)[kPer][TileDims<DMAX>::cols],
                                           const float (&row_scale)[kPer], int64_t row0, int64_t rows, int64_t D,
                                           int ty, int tx) {
#pragma unroll
  for (int a = 0; a < kPer; ++a) {
    const int64_t row = row0 + ty + kSub * a;
    if (row >= rows) continue;
#pragma unroll
    for (int c = 0; c < TileDims<DMAX>::cols; ++c) {
      const int d = tx + kSub * c;
      if (d < D) dst[row * D + d] = acc[a][c] * row_scale[a];
    }
  }
}

// One block per (batch * head, query tile). Per query row it keeps the
// running max m, the running sum l of exp(s - m), and the output acc under
// the same max; a key tile with a larger max rescales them (as the CPU does).
template <int DMAX>
__global__ void __launch_bounds__(kTileThreads) attention_forward_tiled(Problem p, float scale, float* out, float* lse,
                                                                        const float* q, const float* k,
                                                                        const float* v) {
  using Dims = TileDims<DMAX>;
  extern __shared__ float smem[];
  float* q_tile = smem;
  float* k_tile = q_tile + Dims::tile_floats;
  float* v_tile = k_tile + Dims::tile_floats;
  float* probs = v_tile + Dims::tile_floats;  // [query, key]
  __shared__ bool key_ok[kTile];
  const int tx = threadIdx.x % kSub, ty = threadIdx.x / kSub;
  const int64_t bh = blockIdx.x, i0 = int64_t(blockIdx.y) * kTile;
  const int32_t* mask = p.mask_row(bh);
  load_tile<DMAX>(q_tile, q + bh * p.Tq * p.D, i0, p.Tq, p.D);

  float m[kPer], l[kPer], acc[kPer][Dims::cols];
  bool seen[kPer];  // decided by the mask alone, so NaN scores cannot pass for "no key"
#pragma unroll
  for (int a = 0; a < kPer; ++a) {
    m[a] = -INFINITY, l[a] = 0.f, seen[a] = false;
#pragma unroll
    for (int c = 0; c < Dims::cols; ++c) acc[a][c] = 0.f;
  }

  const int64_t key_end = p.key_end(i0 + kTile);
  for (int64_t j0 = 0; j0 < key_end; j0 += kTile) {
    __syncthreads();  // everyone is done reading the previous tile
    if (!load_key_flags(key_ok, p, mask, j0)) continue;  // all padding: skipped, as the CPU skips it
    load_tile<DMAX>(k_tile, k + bh * p.Tk * p.D, j0, p.Tk, p.D);
    load_tile<DMAX>(v_tile, v + bh * p.Tk * p.D, j0, p.Tk, p.D);
    __syncthreads();

    float s[kPer][kPer];
    tile_scores<DMAX>(s, q_tile, k_tile, ty, tx);
#pragma unroll
    for (int a = 0; a < kPer; ++a) {
      const int64_t i = i0 + ty + kSub * a;
      bool any = false;
      float tile_max = -INFINITY;
#pragma unroll
      for (int b = 0; b < kPer; ++b) {
        const int jl = tx + kSub * b;
        const bool visible = key_ok[jl] && i < p.Tq && p.in_causal_window(i, j0 + jl);
        s[a][b] = visible ? s[a][b] * scale : -INFINITY;
        any |= visible;
        tile_max = MaxOp{}(tile_max, s[a][b]);
      }
      // The shuffles run on all 32 lanes; the branches after them are per row.
      any = row_any(any);
      tile_max = row_max(tile_max);
      const bool grows = any && tile_max > m[a];
      const float new_max = grows ? tile_max : m[a];
      const float rescale = grows ? expf(m[a] - tile_max) : 1.f;  // 0 on the row's first keys (m = -inf)
      float sum = 0.f;
#pragma unroll
      for (int b = 0; b < kPer; ++b) {
        const float prob = any ? expf(s[a][b] - new_max) : 0.f;  // a NaN score makes the row NaN, as it should
        const int jl = tx + kSub * b;
        probs[(ty + kSub * a) * kScoreLd + jl] = prob * p.dropout_factor<float>(bh, i, j0 + jl);
        sum += prob;  // the normaliser counts every probability, dropped or not
      }
      sum = row_sum(sum);
      if (any) {
        seen[a] = true;
        m[a] = new_max;
        l[a] = l[a] * rescale + sum;
#pragma unroll
        for (int c = 0; c < Dims::cols; ++c) acc[a][c] *= rescale;
      }
    }
    __syncthreads();
    tile_accumulate<DMAX>(acc, probs, v_tile, ty, tx);  // acc += P V
  }

  float inverse[kPer];
#pragma unroll
  for (int a = 0; a < kPer; ++a) {
    inverse[a] = seen[a] ? 1.f / l[a] : 0.f;
    const int64_t i = i0 + ty + kSub * a;
    if (tx == 0 && i < p.Tq) lse[bh * p.Tq + i] = seen[a] ? m[a] + logf(l[a]) : -INFINITY;
  }
  store_rows<DMAX>(out + bh * p.Tq * p.D, acc, inverse, i0, p.Tq, p.D, ty, tx);
}

// dQ for one (batch * head, query tile): dQ = dS K, dS = scale * P * (dP - delta),
// dP = dO V^T * F, with F the dropout factors (1 without dropout).
template <int DMAX>
__global__ void __launch_bounds__(kTileThreads)
    attention_backward_dq_tiled(Problem p, float scale, float* dq, const float* dout, const float* q, const float* k,
                                const float* v, const float* lse, const float* delta) {
  using Dims = TileDims<DMAX>;
  extern __shared__ float smem[];
  float* q_tile = smem;
  float* do_tile = q_tile + Dims::tile_floats;
  float* k_tile = do_tile + Dims::tile_floats;
  float* v_tile = k_tile + Dims::tile_floats;
  float* ds_tile = v_tile + Dims::tile_floats;  // [query, key]
  __shared__ bool key_ok[kTile];
  const int tx = threadIdx.x % kSub, ty = threadIdx.x / kSub;
  const int64_t bh = blockIdx.x, i0 = int64_t(blockIdx.y) * kTile;
  const int32_t* mask = p.mask_row(bh);
  load_tile<DMAX>(q_tile, q + bh * p.Tq * p.D, i0, p.Tq, p.D);
  load_tile<DMAX>(do_tile, dout + bh * p.Tq * p.D, i0, p.Tq, p.D);

  float row_lse[kPer], row_delta[kPer], acc[kPer][Dims::cols];
#pragma unroll
  for (int a = 0; a < kPer; ++a) {
    const int64_t i = i0 + ty + kSub * a;
    row_lse[a] = i < p.Tq ? lse[bh * p.Tq + i] : -INFINITY;
    row_delta[a] = i < p.Tq ? delta[bh * p.Tq + i] : 0.f;
#pragma unroll
    for (int c = 0; c < Dims::cols; ++c) acc[a][c] = 0.f;
  }

  const int64_t key_end = p.key_end(i0 + kTile);
  for (int64_t j0 = 0; j0 < key_end; j0 += kTile) {
    __syncthreads();
    if (!load_key_flags(key_ok, p, mask, j0)) continue;
    load_tile<DMAX>(k_tile, k + bh * p.Tk * p.D, j0, p.Tk, p.D);
    load_tile<DMAX>(v_tile, v + bh * p.Tk * p.D, j0, p.Tk, p.D);
    __syncthreads();
    float s[kPer][kPer], dp[kPer][kPer];
    tile_scores<DMAX>(s, q_tile, k_tile, ty, tx);
    tile_scores<DMAX>(dp, do_tile, v_tile, ty, tx);
#pragma unroll
    for (int a = 0; a < kPer; ++a) {
      const int64_t i = i0 + ty + kSub * a;
#pragma unroll
      for (int b = 0; b < kPer; ++b) {
        const int jl = tx + kSub * b;
        const bool visible = key_ok[jl] && i < p.Tq && p.in_causal_window(i, j0 + jl);
        const float prob = probability(visible, s[a][b], scale, row_lse[a]);
        const float factor = p.dropout_factor<float>(bh, i, j0 + jl);
        ds_tile[(ty + kSub * a) * kScoreLd + jl] = scale * prob * (dp[a][b] * factor - row_delta[a]);
      }
    }
    __syncthreads();
    tile_accumulate<DMAX>(acc, ds_tile, k_tile, ty, tx);  // dQ += dS K
  }
  const float one[kPer] = {1.f, 1.f, 1.f, 1.f};
  store_rows<DMAX>(dq + bh * p.Tq * p.D, acc, one, i0, p.Tq, p.D, ty, tx);
}

// dK and dV for one (batch * head, key tile): dV = (P * F)^T dO, dK = dS^T Q. Here
// the thread grid's rows are keys and its score columns are queries, so the
// tiles below hold P^T and dS^T.
template <int DMAX>
__global__ void __launch_bounds__(kTileThreads)
    attention_backward_dkv_tiled(Problem p, float scale, float* dk, float* dv, const float* dout, const float* q,
                                 const float* k, const float* v, const float* lse, const float* delta) {
  using Dims = TileDims<DMAX>;
  extern __shared__ float smem[];
  float* k_tile = smem;
  float* v_tile = k_tile + Dims::tile_floats;
  float* q_tile = v_tile + Dims::tile_floats;
  float* do_tile = q_tile + Dims::tile_floats;
  float* p_tile = do_tile + Dims::tile_floats;  // [key, query]
  float* ds_tile = p_tile + Dims::score_floats;  // [key, query]
  __shared__ bool key_ok[kTile];
  __shared__ float tile_lse[kTile], tile_delta[kTile];
  const int tx = threadIdx.x % kSub, ty = threadIdx.x / kSub;
  const int64_t bh = blockIdx.x, j0 = int64_t(blockIdx.y) * kTile;
  const bool need_ds = dk != nullptr;  // dV alone needs only P
  const int32_t* mask = p.mask_row(bh);

  float dk_acc[kPer][Dims::cols], dv_acc[kPer][Dims::cols];
#pragma unroll
  for (int a = 0; a < kPer; ++a)
#pragma unroll
    for (int c = 0; c < Dims::cols; ++c) dk_acc[a][c] = dv_acc[a][c] = 0.f;

  // A tile of padding keys gets zero gradient without reading any query.
  if (load_key_flags(key_ok, p, mask, j0)) {
    load_tile<DMAX>(k_tile, k + bh * p.Tk * p.D, j0, p.Tk, p.D);
    load_tile<DMAX>(v_tile, v + bh * p.Tk * p.D, j0, p.Tk, p.D);
    // Under causal masking, queries before j0 - shift see none of these keys.
    const int64_t first_query = p.causal ? max64(0, j0 - p.causal_shift) : 0;
    for (int64_t i0 = first_query / kTile * kTile; i0 < p.Tq; i0 += kTile) {
      __syncthreads();  // everyone is done with the previous query tile
      load_tile<DMAX>(q_tile, q + bh * p.Tq * p.D, i0, p.Tq, p.D);
      load_tile<DMAX>(do_tile, dout + bh * p.Tq * p.D, i0, p.Tq, p.D);
      load_query_stats(tile_lse, tile_delta, p, bh, i0, lse, delta);
      __syncthreads();
      float s[kPer][kPer], dp[kPer][kPer];
      tile_scores<DMAX>(s, k_tile, q_tile, ty, tx);                 // s[a][b] = <k_j, q_i>
      if (need_ds) tile_scores<DMAX>(dp, v_tile, do_tile, ty, tx);  // dp[a][b] = <v_j, dO_i>
#pragma unroll
      for (int a = 0; a < kPer; ++a) {
        const int jl = ty + kSub * a;
#pragma unroll
        for (int b = 0; b < kPer; ++b) {
          const int il = tx + kSub * b;
          const int64_t i = i0 + il;
          const bool visible = key_ok[jl] && i < p.Tq && p.in_causal_window(i, j0 + jl);
          const float prob = probability(visible, s[a][b], scale, tile_lse[il]);
          const float factor = p.dropout_factor<float>(bh, i, j0 + jl);
          p_tile[jl * kScoreLd + il] = prob * factor;
          if (need_ds) ds_tile[jl * kScoreLd + il] = scale * prob * (dp[a][b] * factor - tile_delta[il]);
        }
      }
      __syncthreads();
      tile_accumulate<DMAX>(dv_acc, p_tile, do_tile, ty, tx);              // dV += (P * F)^T dO
      if (need_ds) tile_accumulate<DMAX>(dk_acc, ds_tile, q_tile, ty, tx);  // dK += dS^T Q
    }
  }
  const float one[kPer] = {1.f, 1.f, 1.f, 1.f};
  if (dk) store_rows<DMAX>(dk + bh * p.Tk * p.D, dk_acc, one, j0, p.Tk, p.D, ty, tx);
  if (dv) store_rows<DMAX>(dv + bh * p.Tk * p.D, dv_acc, one, j0, p.Tk, p.D, ty, tx);
}

// ======================= fallback kernels (any D, f32 or f64) =======================

constexpr int kFallbackWarps = 4;  // rows per block, one warp each

// <x, y> over D, reduced across the warp (every lane gets the same value).
template <typename T>
__device__ __forceinline__ T warp_dot(const T* x, const T* y, int64_t D) {
  T sum = 0;
  for (int64_t d = threadIdx.x % 32; d < D; d += 32) sum += x[d] * y[d];
  return warp_reduce(sum, SumOp{});
}

__device__ __forceinline__ int64_t fallback_row() {
  return int64_t(blockIdx.y) * kFallbackWarps + threadIdx.x / 32;
}

// One warp per query row; the online softmax is updated key by key.
template <typename T>
__global__ void attention_forward_fallback(Problem p, T scale, T* out, float* lse, const T* q, const T* k,
                                           const T* v) {
  const int64_t bh = blockIdx.x, i = fallback_row();
  const int lane = threadIdx.x % 32;
  if (i >= p.Tq) return;  // whole warps leave
  const int32_t* mask = p.mask_row(bh);
  const T* q_row = q + (bh * p.Tq + i) * p.D;
  T* out_row = out + (bh * p.Tq + i) * p.D;  // holds the running sum of P V until the end
  for (int64_t d = lane; d < p.D; d += 32) out_row[d] = T(0);
  T m = -INFINITY, l = 0;
  bool seen = false;
  const int64_t key_end = p.key_end(i + 1);
  for (int64_t j = 0; j < key_end; ++j) {
    if (!p.key_kept(mask, j)) continue;
    const T s = warp_dot(q_row, k + (bh * p.Tk + j) * p.D, p.D) * scale;
    seen = true;
    if (s > m) {
      const T rescale = math_exp(m - s);
      l *= rescale;
      for (int64_t d = lane; d < p.D; d += 32) out_row[d] *= rescale;
      m = s;
    }
    const T prob = math_exp(s - m);
    l += prob;  // the normaliser counts every probability, dropped or not
    const T used = prob * p.dropout_factor<T>(bh, i, j);
    const T* v_row = v + (bh * p.Tk + j) * p.D;
    for (int64_t d = lane; d < p.D; d += 32) out_row[d] += used * v_row[d];
  }
  const T inverse = seen ? T(1) / l : T(0);
  for (int64_t d = lane; d < p.D; d += 32) out_row[d] *= inverse;
  if (lane == 0) lse[bh * p.Tq + i] = seen ? float(m + math_log(l)) : -INFINITY;
}

// One warp per query row: dQ_i = sum_j dS_ij K_j.
template <typename T>
__global__ void attention_backward_dq_fallback(Problem p, T scale, T* dq, const T* dout, const T* q, const T* k,
                                               const T* v, const float* lse, const T* delta) {
  const int64_t bh = blockIdx.x, i = fallback_row();
  const int lane = threadIdx.x % 32;
  if (i >= p.Tq) return;
  const int32_t* mask = p.mask_row(bh);
  const int64_t row = bh * p.Tq + i;
  const T *q_row = q + row * p.D, *do_row = dout + row * p.D;
  T* dq_row = dq + row * p.D;
  for (int64_t d = lane; d < p.D; d += 32) dq_row[d] = T(0);
  const float row_lse = lse[row];
  if (row_lse == -INFINITY) return;  // sees no key
  for (int64_t j = 0; j < p.key_end(i + 1); ++j) {
    if (!p.key_kept(mask, j)) continue;
    const T *k_row = k + (bh * p.Tk + j) * p.D, *v_row = v + (bh * p.Tk + j) * p.D;
    const T prob = math_exp(warp_dot(q_row, k_row, p.D) * scale - T(row_lse));
    const T factor = p.dropout_factor<T>(bh, i, j);
    const T ds = scale * prob * (warp_dot(do_row, v_row, p.D) * factor - delta[row]);
    for (int64_t d = lane; d < p.D; d += 32) dq_row[d] += ds * k_row[d];
  }
}

// One warp per key row: dV_j = sum_i P_ij F_ij dO_i, dK_j = sum_i dS_ij Q_i.
template <typename T>
__global__ void attention_backward_dkv_fallback(Problem p, T scale, T* dk, T* dv, const T* dout, const T* q,
                                                const T* k, const T* v, const float* lse, const T* delta) {
  const int64_t bh = blockIdx.x, j = fallback_row();
  const int lane = threadIdx.x % 32;
  if (j >= p.Tk) return;
  const int32_t* mask = p.mask_row(bh);
  const T *k_row = k + (bh * p.Tk + j) * p.D, *v_row = v + (bh * p.Tk + j) * p.D;
  T* dk_row = dk ? dk + (bh * p.Tk + j) * p.D : nullptr;
  T* dv_row = dv ? dv + (bh * p.Tk + j) * p.D : nullptr;
  for (int64_t d = lane; d < p.D; d += 32) {
    if (dk_row) dk_row[d] = T(0);
    if (dv_row) dv_row[d] = T(0);
  }
  if (!p.key_kept(mask, j)) return;
  for (int64_t i = p.causal ? max64(0, j - p.causal_shift) : 0; i < p.Tq; ++i) {
    const int64_t row = bh * p.Tq + i;
    const float row_lse = lse[row];
    if (row_lse == -INFINITY) continue;
    const T *q_row = q + row * p.D, *do_row = dout + row * p.D;
    const T prob = math_exp(warp_dot(q_row, k_row, p.D) * scale - T(row_lse));
    const T factor = p.dropout_factor<T>(bh, i, j);
    if (dv_row)
      for (int64_t d = lane; d < p.D; d += 32) dv_row[d] += prob * factor * do_row[d];
    if (dk_row) {
      const T ds = scale * prob * (warp_dot(do_row, v_row, p.D) * factor - delta[row]);
      for (int64_t d = lane; d < p.D; d += 32) dk_row[d] += ds * q_row[d];
    }
  }
}

// ======================= dispatch =======================

bool use_tiled(DType dtype, int64_t D) { return dtype == DType::F32 && D <= 128; }

// Calls fn(std::integral_constant<int, DMAX>) for the smallest padded head size that holds D.
template <typename Fn>
void by_head_size(int64_t D, Fn&& fn) {
  if (D <= 32) fn(std::integral_constant<int, 32>{});
  else if (D <= 64) fn(std::integral_constant<int, 64>{});
  else fn(std::integral_constant<int, 128>{});
}

using attention::grid_fits;

}  // namespace

cudaError_t launch_attention_forward(const LaunchContext& ctx, DType dtype, const AttentionShape& shape, void* out,
                                     float* lse, const void* q, const void* k, const void* v) {
  const Problem p = problem_of(shape);
  const int64_t bh = shape.B * shape.H;
  if (bh == 0 || shape.Tq == 0) return cudaSuccess;
  if (dtype == DType::BF16) {
    using bf16 = __nv_bfloat16;
    return attention::launch_forward_bf16(ctx, shape, out, lse, static_cast<const bf16*>(q),
                                          static_cast<const bf16*>(k), static_cast<const bf16*>(v));
  }
  if (use_tiled(dtype, shape.D)) {
    const int64_t tiles = (shape.Tq + kTile - 1) / kTile;
    if (!grid_fits(bh, tiles)) return cudaErrorInvalidConfiguration;
    cudaError_t status = cudaSuccess;
    by_head_size(shape.D, [&](auto dmax) {
      constexpr int DMAX = decltype(dmax)::value;
      using Dims = TileDims<DMAX>;
      status = attention::launch_with_smem(attention_forward_tiled<DMAX>, dim3(unsigned(bh), unsigned(tiles)),
                                           kTileThreads, sizeof(float) * (3 * Dims::tile_floats + Dims::score_floats),
                                           ctx.stream, p, float(shape.scale), static_cast<float*>(out), lse,
                                           static_cast<const float*>(q), static_cast<const float*>(k),
                                           static_cast<const float*>(v));
    });
    return status;
  }
  const int64_t blocks = (shape.Tq + kFallbackWarps - 1) / kFallbackWarps;
  if (!grid_fits(bh, blocks)) return cudaErrorInvalidConfiguration;
  dispatch_floating(dtype, [&](auto zero) {
    using T = decltype(zero);
    attention_forward_fallback<<<dim3(unsigned(bh), unsigned(blocks)), kFallbackWarps * 32, 0, ctx.stream>>>(
        p, T(shape.scale), static_cast<T*>(out), lse, static_cast<const T*>(q), static_cast<const T*>(k),
        static_cast<const T*>(v));
  });
  return cudaGetLastError();
}

size_t attention_backward_scratch_bytes(DType dtype, const AttentionShape& shape) {
  if (dtype == DType::BF16) return attention::backward_bf16_scratch_bytes(shape);
  return size_t(shape.B * shape.H * shape.Tq) * (dtype == DType::F64 ? 8 : 4);
}

cudaError_t launch_attention_backward(const LaunchContext& ctx, DType dtype, const AttentionShape& shape, void* dq,
                                      void* dk, void* dv, const void* dout, const void* q, const void* k,
                                      const void* v, const void* out, const float* lse, void* scratch,
                                      size_t scratch_bytes) {
  if (dtype == DType::BF16) {
    using bf16 = __nv_bfloat16;
    return attention::launch_backward_bf16(ctx, shape, dq, dk, dv, static_cast<const bf16*>(dout),
                                           static_cast<const bf16*>(q), static_cast<const bf16*>(k),
                                           static_cast<const bf16*>(v), out, lse, scratch, scratch_bytes);
  }
  const Problem p = problem_of(shape);
  const int64_t bh = shape.B * shape.H;
  if (bh == 0 || (!dq && !dk && !dv)) return cudaSuccess;
  const bool tiled = use_tiled(dtype, shape.D);
  const int64_t q_blocks = tiled ? (shape.Tq + kTile - 1) / kTile : (shape.Tq + kFallbackWarps - 1) / kFallbackWarps;
  const int64_t k_blocks = tiled ? (shape.Tk + kTile - 1) / kTile : (shape.Tk + kFallbackWarps - 1) / kFallbackWarps;
  if (!grid_fits(bh, q_blocks) || !grid_fits(bh, k_blocks)) return cudaErrorInvalidConfiguration;

  cudaError_t status = cudaSuccess;
  dispatch_floating(dtype, [&](auto zero) {
    using T = decltype(zero);
    T* delta = static_cast<T*>(scratch);
    const T *tq = static_cast<const T*>(q), *tk = static_cast<const T*>(k), *tv = static_cast<const T*>(v);
    const T* tdout = static_cast<const T*>(dout);
    if (dq || dk)  // dV alone needs no delta
      status = attention::launch_delta(ctx, p, bh, delta, tdout, static_cast<const T*>(out));
    if (status != cudaSuccess) return;
    if constexpr (std::is_same_v<T, float>) {
      if (tiled) {
        by_head_size(shape.D, [&](auto dmax) {
          constexpr int DMAX = decltype(dmax)::value;
          using Dims = TileDims<DMAX>;
          const float scale = float(shape.scale);
          if (dq && q_blocks > 0 && status == cudaSuccess)
            status = attention::launch_with_smem(attention_backward_dq_tiled<DMAX>,
                                                 dim3(unsigned(bh), unsigned(q_blocks)), kTileThreads,
                                                 sizeof(float) * (4 * Dims::tile_floats + Dims::score_floats),
                                                 ctx.stream, p, scale, static_cast<float*>(dq), tdout, tq, tk, tv,
                                                 lse, delta);
          if ((dk || dv) && k_blocks > 0 && status == cudaSuccess)
            status = attention::launch_with_smem(attention_backward_dkv_tiled<DMAX>,
                                                 dim3(unsigned(bh), unsigned(k_blocks)), kTileThreads,
                                                 sizeof(float) * (4 * Dims::tile_floats + 2 * Dims::score_floats),
                                                 ctx.stream, p, scale, static_cast<float*>(dk),
                                                 static_cast<float*>(dv), tdout, tq, tk, tv, lse, delta);
        });
        return;
      }
    }
    const int threads = kFallbackWarps * 32;
    if (dq && q_blocks > 0)
      attention_backward_dq_fallback<<<dim3(unsigned(bh), unsigned(q_blocks)), threads, 0, ctx.stream>>>(
          p, T(shape.scale), static_cast<T*>(dq), tdout, tq, tk, tv, lse, delta);
    if ((dk || dv) && k_blocks > 0)
      attention_backward_dkv_fallback<<<dim3(unsigned(bh), unsigned(k_blocks)), threads, 0, ctx.stream>>>(
          p, T(shape.scale), static_cast<T*>(dk), static_cast<T*>(dv), tdout, tq, tk, tv, lse, delta);
    status = cudaGetLastError();
  });
  return status;
}

}  // namespace engine::cuda
