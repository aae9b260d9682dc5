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
// Two implementations:
//   tiled:    head dim D <= 128 (GPT-2 has 64), f32 inputs on the CUDA cores
//             or bf16 inputs on the tensor cores (attention_tiles.cuh), f32
//             outputs either way. A block of 256 threads owns a 64-row tile
//             and folds in 64 x 64 score tiles.
//   fallback: any D, f32 or f64 (f64 is for gradient checks): one warp per
//             row, scores one key at a time with warp-reduced dot products,
//             accumulating straight into the output row. Slow but plain.
// The backward is three kernels: delta_i = rowsum(dO * O), then dQ over
// query tiles and dK/dV over key tiles, each recomputing P (and dP) on its
// own, so that no gradient needs atomics and results are deterministic.
#include "engine/cuda/attention_tiles.cuh"
#include "engine/cuda/common.cuh"
#include "engine/rng.h"

namespace engine::cuda {

namespace {

// One call's geometry, passed by value to every kernel.
struct Problem {
  int64_t H, Tq, Tk, D;
  const int32_t* key_mask;  // [B, Tk] or null
  bool causal;
  int64_t causal_shift;  // Tk - Tq: query i sees keys j <= i + causal_shift
  double dropout_p = 0;     // 0: no dropout
  double keep_scale = 1;    // 1 / (1 - dropout_p)
  uint64_t dropout_seed = 0, dropout_offset = 0;

  __device__ const int32_t* mask_row(int64_t bh) const { return key_mask ? key_mask + (bh / H) * Tk : nullptr; }
  __device__ bool key_kept(const int32_t* mask, int64_t j) const { return !mask || mask[j] != 0; }
  __device__ bool in_causal_window(int64_t i, int64_t j) const { return !causal || j <= i + causal_shift; }
  // Keys at or past this index are in the future of every query below `query_end`.
  __device__ int64_t key_end(int64_t query_end) const {
    return causal ? max64(0, min64(Tk, query_end + causal_shift)) : Tk;
  }
  // What probability (i, j) of head bh is multiplied by after the softmax:
  // 1 without dropout, else 1 / (1 - p) if kept and 0 if dropped.
  template <typename T>
  __device__ T dropout_factor(int64_t bh, int64_t i, int64_t j) const {
    if (dropout_p <= 0) return T(1);
    const uint64_t element = uint64_t(bh * Tq + i) * uint64_t(Tk) + uint64_t(j);
    return double(philox_uniform(dropout_seed, dropout_offset, element)) >= dropout_p ? T(keep_scale) : T(0);
  }
};

Problem problem_of(const AttentionShape& s) {
  Problem p{s.H, s.Tq, s.Tk, s.D, s.key_mask, s.causal, s.Tk - s.Tq};
  p.dropout_p = s.dropout_p;
  p.keep_scale = 1.0 / (1.0 - s.dropout_p);
  p.dropout_seed = s.dropout_seed;
  p.dropout_offset = s.dropout_offset;
  return p;
}

// ======================= tiled kernels (f32 or bf16 inputs, D <= 128) =======================

using attention::kPer;
using attention::kSub;
using attention::kTile;
using attention::kTileThreads;
using attention::load_tile;
using attention::row_any;
using attention::row_max;
using attention::row_sum;
using attention::SmemCursor;
using attention::Tiles;

// Marks which keys of tile j0 are real (not padding, not past Tk); true when any is.
__device__ __forceinline__ bool load_key_flags(bool* key_ok, const Problem& p, const int32_t* mask, int64_t j0) {
  bool kept = false;
  if (threadIdx.x < kTile) {
    const int64_t j = j0 + threadIdx.x;
    kept = j < p.Tk && p.key_kept(mask, j);
    key_ok[threadIdx.x] = kept;
  }
  return __syncthreads_or(kept);
}

// Writes rows row0 .. row0+63 (those < rows, columns < D) of a [rows, D] output.
template <int DMAX>
__device__ __forceinline__ void store_rows(float* dst, const float (&acc)[kPer][DMAX / kSub],
                                           const float (&row_scale)[kPer], int64_t row0, int64_t rows, int64_t D,
                                           int ty, int tx) {
#pragma unroll
  for (int a = 0; a < kPer; ++a) {
    const int64_t row = row0 + ty + kSub * a;
    if (row >= rows) continue;
#pragma unroll
    for (int c = 0; c < DMAX / kSub; ++c) {
      const int d = tx + kSub * c;
      if (d < D) dst[row * D + d] = acc[a][c] * row_scale[a];
    }
  }
}

// One block per (batch * head, query tile). Per query row it keeps the
// running max m, the running sum l of exp(s - m), and the output acc under
// the same max; a key tile with a larger max rescales them (as the CPU does).
template <typename In, int DMAX>
__global__ void __launch_bounds__(kTileThreads) attention_forward_tiled(Problem p, float scale, float* out, float* lse,
                                                                        const In* q, const In* k, const In* v) {
  using T = Tiles<In, DMAX>;
  extern __shared__ __align__(128) unsigned char smem[];
  SmemCursor<In, DMAX> cursor{smem};
  In* q_tile = cursor.tile();
  In* k_tile = cursor.tile();
  In* v_tile = cursor.tile();
  typename T::Weight* probs = cursor.weight_tile();  // [query, key]
  float* scratch = cursor.scratch();
  __shared__ bool key_ok[kTile];
  const int tx = threadIdx.x % kSub, ty = threadIdx.x / kSub;
  const int64_t bh = blockIdx.x, i0 = int64_t(blockIdx.y) * kTile;
  const int32_t* mask = p.mask_row(bh);
  load_tile<In, DMAX>(q_tile, q + bh * p.Tq * p.D, i0, p.Tq, p.D);

  float m[kPer], l[kPer], acc[kPer][T::cols];
  bool seen[kPer];  // decided by the mask alone, so NaN scores cannot pass for "no key"
#pragma unroll
  for (int a = 0; a < kPer; ++a) {
    m[a] = -INFINITY, l[a] = 0.f, seen[a] = false;
#pragma unroll
    for (int c = 0; c < T::cols; ++c) acc[a][c] = 0.f;
  }

  const int64_t key_end = p.key_end(i0 + kTile);
  for (int64_t j0 = 0; j0 < key_end; j0 += kTile) {
    __syncthreads();  // everyone is done reading the previous tile
    if (!load_key_flags(key_ok, p, mask, j0)) continue;  // all padding: skipped, as the CPU skips it
    load_tile<In, DMAX>(k_tile, k + bh * p.Tk * p.D, j0, p.Tk, p.D);
    load_tile<In, DMAX>(v_tile, v + bh * p.Tk * p.D, j0, p.Tk, p.D);
    __syncthreads();

    float s[kPer][kPer];
    T::scores(s, q_tile, k_tile, ty, tx, scratch);
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
        probs[(ty + kSub * a) * T::weight_ld + jl] = T::weight(prob * p.dropout_factor<float>(bh, i, j0 + jl));
        sum += prob;  // the normaliser counts every probability, dropped or not
      }
      sum = row_sum(sum);
      if (any) {
        seen[a] = true;
        m[a] = new_max;
        l[a] = l[a] * rescale + sum;
#pragma unroll
        for (int c = 0; c < T::cols; ++c) acc[a][c] *= rescale;
      }
    }
    __syncthreads();
    T::accumulate(acc, probs, v_tile, ty, tx, scratch);  // acc += P V
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

// P = exp(scale * s - lse) where query i sees key j, else 0 (also for a
// query that sees no key at all: its lse is -inf).
__device__ __forceinline__ float probability(bool visible, float s, float scale, float row_lse) {
  return visible && row_lse != -INFINITY ? expf(s * scale - row_lse) : 0.f;
}

// dQ for one (batch * head, query tile): dQ = dS K, dS = scale * P * (dP - delta),
// dP = dO V^T * F, with F the dropout factors (1 without dropout).
template <typename In, int DMAX>
__global__ void __launch_bounds__(kTileThreads)
    attention_backward_dq_tiled(Problem p, float scale, float* dq, const In* dout, const In* q, const In* k,
                                const In* v, const float* lse, const float* delta) {
  using T = Tiles<In, DMAX>;
  extern __shared__ __align__(128) unsigned char smem[];
  SmemCursor<In, DMAX> cursor{smem};
  In* q_tile = cursor.tile();
  In* do_tile = cursor.tile();
  In* k_tile = cursor.tile();
  In* v_tile = cursor.tile();
  typename T::Weight* ds_tile = cursor.weight_tile();  // [query, key]
  float* scratch = cursor.scratch();
  __shared__ bool key_ok[kTile];
  const int tx = threadIdx.x % kSub, ty = threadIdx.x / kSub;
  const int64_t bh = blockIdx.x, i0 = int64_t(blockIdx.y) * kTile;
  const int32_t* mask = p.mask_row(bh);
  load_tile<In, DMAX>(q_tile, q + bh * p.Tq * p.D, i0, p.Tq, p.D);
  load_tile<In, DMAX>(do_tile, dout + bh * p.Tq * p.D, i0, p.Tq, p.D);

  float row_lse[kPer], row_delta[kPer], acc[kPer][T::cols];
#pragma unroll
  for (int a = 0; a < kPer; ++a) {
    const int64_t i = i0 + ty + kSub * a;
    row_lse[a] = i < p.Tq ? lse[bh * p.Tq + i] : -INFINITY;
    row_delta[a] = i < p.Tq ? delta[bh * p.Tq + i] : 0.f;
#pragma unroll
    for (int c = 0; c < T::cols; ++c) acc[a][c] = 0.f;
  }

  const int64_t key_end = p.key_end(i0 + kTile);
  for (int64_t j0 = 0; j0 < key_end; j0 += kTile) {
    __syncthreads();
    if (!load_key_flags(key_ok, p, mask, j0)) continue;
    load_tile<In, DMAX>(k_tile, k + bh * p.Tk * p.D, j0, p.Tk, p.D);
    load_tile<In, DMAX>(v_tile, v + bh * p.Tk * p.D, j0, p.Tk, p.D);
    __syncthreads();
    float s[kPer][kPer], dp[kPer][kPer];
    T::scores(s, q_tile, k_tile, ty, tx, scratch);
    T::scores(dp, do_tile, v_tile, ty, tx, scratch);
#pragma unroll
    for (int a = 0; a < kPer; ++a) {
      const int64_t i = i0 + ty + kSub * a;
#pragma unroll
      for (int b = 0; b < kPer; ++b) {
        const int jl = tx + kSub * b;
        const bool visible = key_ok[jl] && i < p.Tq && p.in_causal_window(i, j0 + jl);
        const float prob = probability(visible, s[a][b], scale, row_lse[a]);
        const float factor = p.dropout_factor<float>(bh, i, j0 + jl);
        ds_tile[(ty + kSub * a) * T::weight_ld + jl] = T::weight(scale * prob * (dp[a][b] * factor - row_delta[a]));
      }
    }
    __syncthreads();
    T::accumulate(acc, ds_tile, k_tile, ty, tx, scratch);  // dQ += dS K
  }
  const float one[kPer] = {1.f, 1.f, 1.f, 1.f};
  store_rows<DMAX>(dq + bh * p.Tq * p.D, acc, one, i0, p.Tq, p.D, ty, tx);
}

// dK and dV for one (batch * head, key tile): dV = (P * F)^T dO, dK = dS^T Q. Here
// the thread grid's rows are keys and its score columns are queries, so the
// tiles below hold P^T and dS^T.
template <typename In, int DMAX>
__global__ void __launch_bounds__(kTileThreads)
    attention_backward_dkv_tiled(Problem p, float scale, float* dk, float* dv, const In* dout, const In* q,
                                 const In* k, const In* v, const float* lse, const float* delta) {
  using T = Tiles<In, DMAX>;
  extern __shared__ __align__(128) unsigned char smem[];
  SmemCursor<In, DMAX> cursor{smem};
  In* k_tile = cursor.tile();
  In* v_tile = cursor.tile();
  In* q_tile = cursor.tile();
  In* do_tile = cursor.tile();
  typename T::Weight* p_tile = cursor.weight_tile();   // [key, query]
  typename T::Weight* ds_tile = cursor.weight_tile();  // [key, query]
  float* scratch = cursor.scratch();
  __shared__ bool key_ok[kTile];
  __shared__ float tile_lse[kTile], tile_delta[kTile];
  const int tx = threadIdx.x % kSub, ty = threadIdx.x / kSub;
  const int64_t bh = blockIdx.x, j0 = int64_t(blockIdx.y) * kTile;
  const bool need_ds = dk != nullptr;  // dV alone needs only P
  const int32_t* mask = p.mask_row(bh);

  float dk_acc[kPer][T::cols], dv_acc[kPer][T::cols];
#pragma unroll
  for (int a = 0; a < kPer; ++a)
#pragma unroll
    for (int c = 0; c < T::cols; ++c) dk_acc[a][c] = dv_acc[a][c] = 0.f;

  // A tile of padding keys gets zero gradient without reading any query.
  if (load_key_flags(key_ok, p, mask, j0)) {
    load_tile<In, DMAX>(k_tile, k + bh * p.Tk * p.D, j0, p.Tk, p.D);
    load_tile<In, DMAX>(v_tile, v + bh * p.Tk * p.D, j0, p.Tk, p.D);
    // Under causal masking, queries before j0 - shift see none of these keys.
    const int64_t first_query = p.causal ? max64(0, j0 - p.causal_shift) : 0;
    for (int64_t i0 = first_query / kTile * kTile; i0 < p.Tq; i0 += kTile) {
      __syncthreads();  // everyone is done with the previous query tile
      load_tile<In, DMAX>(q_tile, q + bh * p.Tq * p.D, i0, p.Tq, p.D);
      load_tile<In, DMAX>(do_tile, dout + bh * p.Tq * p.D, i0, p.Tq, p.D);
      if (threadIdx.x < kTile) {
        const int64_t i = i0 + threadIdx.x;
        tile_lse[threadIdx.x] = i < p.Tq ? lse[bh * p.Tq + i] : -INFINITY;
        tile_delta[threadIdx.x] = i < p.Tq ? delta[bh * p.Tq + i] : 0.f;
      }
      __syncthreads();
      float s[kPer][kPer], dp[kPer][kPer];
      T::scores(s, k_tile, q_tile, ty, tx, scratch);                 // s[a][b] = <k_j, q_i>
      if (need_ds) T::scores(dp, v_tile, do_tile, ty, tx, scratch);  // dp[a][b] = <v_j, dO_i>
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
          p_tile[jl * T::weight_ld + il] = T::weight(prob * factor);
          if (need_ds)
            ds_tile[jl * T::weight_ld + il] = T::weight(scale * prob * (dp[a][b] * factor - tile_delta[il]));
        }
      }
      __syncthreads();
      T::accumulate(dv_acc, p_tile, do_tile, ty, tx, scratch);              // dV += (P * F)^T dO
      if (need_ds) T::accumulate(dk_acc, ds_tile, q_tile, ty, tx, scratch);  // dK += dS^T Q
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

// delta_i = <dO_i, O_i>, the softmax backward's correction term; one warp per
// row. dO is the kernels' input type, O their output type.
template <typename In, typename T>
__global__ void attention_delta_kernel(int64_t rows, int64_t D, T* delta, const In* dout, const T* out) {
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  T sum = 0;
  for (int64_t d = threadIdx.x % 32; d < D; d += 32) sum += T(dout[row * D + d]) * out[row * D + d];
  sum = warp_reduce(sum, SumOp{});
  if (threadIdx.x % 32 == 0) delta[row] = sum;
}

// ======================= dispatch =======================

// bf16 inputs always take the tiled kernels: CudaBackend widens them to f32 for D > 128.
bool use_tiled(DType dtype, int64_t D) { return (dtype == DType::F32 || dtype == DType::BF16) && D <= 128; }

// Calls fn(In{}, std::integral_constant<int, DMAX>{}) for the input type and
// the smallest padded head size that holds D.
template <typename Fn>
void dispatch_tiled(DType dtype, int64_t D, Fn&& fn) {
  auto by_head_size = [&](auto in) {
    if (D <= 32) fn(in, std::integral_constant<int, 32>{});
    else if (D <= 64) fn(in, std::integral_constant<int, 64>{});
    else fn(in, std::integral_constant<int, 128>{});
  };
  if (dtype == DType::BF16) by_head_size(__nv_bfloat16{});
  else by_head_size(float{});
}

// Dynamic shared memory above 48 KiB must be asked for, per kernel.
template <typename Kernel>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, auto... args) {
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (status != cudaSuccess) return status;
  kernel<<<grid, kTileThreads, smem, stream>>>(args...);
  return cudaGetLastError();
}

bool grid_fits(int64_t bh, int64_t tiles) { return bh <= int64_t(INT32_MAX) && tiles <= 65535; }

}  // namespace

cudaError_t launch_attention_forward(const LaunchContext& ctx, DType dtype, const AttentionShape& shape, void* out,
                                     float* lse, const void* q, const void* k, const void* v) {
  const Problem p = problem_of(shape);
  const int64_t bh = shape.B * shape.H;
  if (bh == 0 || shape.Tq == 0) return cudaSuccess;
  if (use_tiled(dtype, shape.D)) {
    const int64_t tiles = (shape.Tq + kTile - 1) / kTile;
    if (!grid_fits(bh, tiles)) return cudaErrorInvalidConfiguration;
    cudaError_t status = cudaSuccess;
    dispatch_tiled(dtype, shape.D, [&](auto in, auto dmax) {
      using In = decltype(in);
      constexpr int DMAX = decltype(dmax)::value;
      status = launch_with_smem(attention_forward_tiled<In, DMAX>, dim3(unsigned(bh), unsigned(tiles)),
                                attention::smem_bytes<In, DMAX>(3, 1), ctx.stream, p, float(shape.scale),
                                static_cast<float*>(out), lse, static_cast<const In*>(q), static_cast<const In*>(k),
                                static_cast<const In*>(v));
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
  return size_t(shape.B * shape.H * shape.Tq) * (dtype == DType::F64 ? 8 : 4);
}

cudaError_t launch_attention_backward(const LaunchContext& ctx, DType dtype, const AttentionShape& shape, void* dq,
                                      void* dk, void* dv, const void* dout, const void* q, const void* k,
                                      const void* v, const void* out, const float* lse, void* scratch) {
  const Problem p = problem_of(shape);
  const int64_t bh = shape.B * shape.H;
  if (bh == 0 || (!dq && !dk && !dv)) return cudaSuccess;
  const bool tiled = use_tiled(dtype, shape.D);
  const int64_t q_blocks = tiled ? (shape.Tq + kTile - 1) / kTile : (shape.Tq + kFallbackWarps - 1) / kFallbackWarps;
  const int64_t k_blocks = tiled ? (shape.Tk + kTile - 1) / kTile : (shape.Tk + kFallbackWarps - 1) / kFallbackWarps;
  if (!grid_fits(bh, q_blocks) || !grid_fits(bh, k_blocks)) return cudaErrorInvalidConfiguration;
  const int64_t rows = bh * shape.Tq;
  const unsigned delta_blocks = unsigned((rows + kThreads / 32 - 1) / (kThreads / 32));
  const bool need_delta = rows > 0 && (dq || dk);  // dV alone needs no delta

  if (tiled) {
    cudaError_t status = cudaSuccess;
    dispatch_tiled(dtype, shape.D, [&](auto in, auto dmax) {
      using In = decltype(in);
      constexpr int DMAX = decltype(dmax)::value;
      const In *tq = static_cast<const In*>(q), *tk = static_cast<const In*>(k), *tv = static_cast<const In*>(v);
      const In* tdout = static_cast<const In*>(dout);
      float* delta = static_cast<float*>(scratch);
      const float scale = float(shape.scale);
      if (need_delta) {
        attention_delta_kernel<<<delta_blocks, kThreads, 0, ctx.stream>>>(rows, shape.D, delta, tdout,
                                                                          static_cast<const float*>(out));
        status = cudaGetLastError();
      }
      if (dq && q_blocks > 0 && status == cudaSuccess)
        status = launch_with_smem(attention_backward_dq_tiled<In, DMAX>, dim3(unsigned(bh), unsigned(q_blocks)),
                                  attention::smem_bytes<In, DMAX>(4, 1), ctx.stream, p, scale,
                                  static_cast<float*>(dq), tdout, tq, tk, tv, lse, delta);
      if ((dk || dv) && k_blocks > 0 && status == cudaSuccess)
        status = launch_with_smem(attention_backward_dkv_tiled<In, DMAX>, dim3(unsigned(bh), unsigned(k_blocks)),
                                  attention::smem_bytes<In, DMAX>(4, 2), ctx.stream, p, scale,
                                  static_cast<float*>(dk), static_cast<float*>(dv), tdout, tq, tk, tv, lse, delta);
    });
    return status;
  }

  dispatch_floating(dtype, [&](auto zero) {
    using T = decltype(zero);
    T* delta = static_cast<T*>(scratch);
    const T *tq = static_cast<const T*>(q), *tk = static_cast<const T*>(k), *tv = static_cast<const T*>(v);
    const T* tdout = static_cast<const T*>(dout);
    if (need_delta)
      attention_delta_kernel<<<delta_blocks, kThreads, 0, ctx.stream>>>(rows, shape.D, delta, tdout,
                                                                        static_cast<const T*>(out));
    const int threads = kFallbackWarps * 32;
    if (dq && q_blocks > 0)
      attention_backward_dq_fallback<<<dim3(unsigned(bh), unsigned(q_blocks)), threads, 0, ctx.stream>>>(
          p, T(shape.scale), static_cast<T*>(dq), tdout, tq, tk, tv, lse, delta);
    if ((dk || dv) && k_blocks > 0)
      attention_backward_dkv_fallback<<<dim3(unsigned(bh), unsigned(k_blocks)), threads, 0, ctx.stream>>>(
          p, T(shape.scale), static_cast<T*>(dk), static_cast<T*>(dv), tdout, tq, tk, tv, lse, delta);
  });
  return cudaGetLastError();
}

}  // namespace engine::cuda
