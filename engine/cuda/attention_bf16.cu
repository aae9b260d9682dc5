// Attention on the tensor cores for bf16 inputs (mixed precision): the
// flash-attention algorithm of attention.cu, with every product made by the
// mma.sync instruction (m16n8k16, bf16 operands, f32 accumulation), and an
// output and gradients in f32 or bf16. Every operand is read and written through
// its strides (GPT-2's q, k and v are views of one [B, T, 3, H, D] tensor).
//
// A block of 4 warps owns a 64-row tile (queries in the forward and in dQ,
// keys in dK/dV) and warp w owns its rows 16w .. 16w+15. A warp's scores,
// softmax and accumulators live in registers, in the layout mma.sync gives
// them (see attention_mma.cuh), and never touch shared memory: only the block's
// K/V (or Q/dO) tiles do, which ldmatrix reads straight into operands. As in
// FlashAttention-2, a score tile turns into the next product's left operand in
// registers: the accumulator layout of two 8-column tiles is exactly the
// operand layout of one 16-deep k-step.
//
// The backward makes the scores once: the dK/dV kernel also writes dS (bf16,
// a slice of heads at a time through the scratch), and dQ's kernel only
// multiplies it by K. FlashAttention-2 adds dQ up by atomics instead; this way
// each gradient is a fixed sum, the same on every run.
//
// P and dS are rounded to bf16 before they are multiplied, as flash attention
// does; so the exponentials use the fast ex2.approx, whose few-ulp error is far
// below bf16's 2^-9. Head dims up to 128 are padded with zeros to DMAX in
// {32, 64, 128}; engine/cuda/cuda_backend.cpp widens larger ones to f32 for
// attention.cu.
#include "engine/cuda/attention_mma.cuh"

namespace engine::cuda::attention {

namespace {

// 2^x on the special function unit (ex2.approx, a few ulp): __expf is this
// after a multiply by log2(e), which the kernels fold into the score scale.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

// Heaviest first: under causal masking the last query tile sees the most
// keys. Blocks start in index order, so giving the long ones out first
// leaves short ones to fill the last wave.
__device__ __forceinline__ int64_t query_tile_start() { return int64_t(gridDim.y - 1 - blockIdx.y) * kTile; }

// Whether a warp's 16 query rows from row0 against the 64 keys from j0 need
// no masking at all: every key real and, under causal masking, every key in
// every row's window. Rows past Tq only need their results dropped at the store.
__device__ __forceinline__ bool tile_unmasked(const Problem& p, bool all_keys_kept, int64_t row0, int64_t j0) {
  return all_keys_kept && (!p.causal || j0 + kTile - 1 <= row0 + p.causal_shift);
}

// Marks which keys of tile j0 are real (not padding, not past Tk) and returns
// how many are. A block-wide barrier: every thread of the block must call it.
// (attention_common.cuh's load_key_flags, for the f32 kernels, only says
// whether any is: merging the two waits for a device run.)
__device__ __forceinline__ int count_key_flags(bool* key_ok, const Problem& p, const int32_t* mask, int64_t j0) {
  bool kept = false;
  if (threadIdx.x < kTile) {
    const int64_t j = j0 + threadIdx.x;
    kept = j < p.Tk && p.key_kept(mask, j);
    key_ok[threadIdx.x] = kept;
  }
  return __syncthreads_count(kept);
}

// ---- dropout: one Philox block for eight scores ----
// A block's eight 16-bit uniforms are eight consecutive keys of one query
// when every query's keys start a block (Tk % 8 == 0): word w holds keys 2w
// (low half) and 2w + 1. The mma layout spreads a block over four lanes (rows
// are queries: the forward and dQ) or eight (rows are keys: dK/dV). So for a
// pair of score tiles n, n + 1 each lane draws one block and the lanes trade
// words by shuffles: lane x's s-th shuffle (xor s) brings word x of block x ^ s.
// Other lengths draw a block per score. Every lane of the warp must call.

// Reorders words[s] (block x ^ s's) to words[b] (block b's): xor-ing an index
// by x is one swap per set bit of x, with static indices throughout.
template <int N>
__device__ __forceinline__ void unxor(uint32_t (&words)[N], int x) {
#pragma unroll
  for (int bit = 1; bit < N; bit *= 2)
#pragma unroll
    for (int b = 0; b < N; ++b)
      if (!(b & bit) && (x & bit)) {
        const uint32_t held = words[b];
        words[b] = words[b + bit];
        words[b + bit] = held;
      }
}

// The factors f[z][e] of a lane's scores [n + z][e] where rows are queries:
// query i (e = 0, 1) and i + 8 (e = 2, 3); keys j, j + 1 (z = 0, j the lane's
// first column in tile n) and j + 8, j + 9 (z = 1).
__device__ __forceinline__ void query_row_factors(float (&f)[2][4], const Problem& p, int64_t bh, int64_t i, int64_t j,
                                                  int lane) {
  if (p.Tk % 8 != 0) {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      f[e / 4][e % 4] = p.dropout_factor<float>(bh, i + 8 * (e % 4 / 2), j + 8 * (e / 4) + e % 2);
    return;
  }
  // Lane t of a quad holds keys 2t, 2t + 1 of each 8-key group: word t of
  // blocks b = 0..3 (query i + 8 (b % 2), keys of tile n + b / 2). It draws block t.
  const int t = lane % 4;
  const uint64_t element =
      uint64_t(bh * p.Tq + i + 8 * (t % 2)) * uint64_t(p.Tk) + uint64_t(j - 2 * t + 8 * (t / 2));
  const Philox4 block = philox4x32_10(p.dropout_seed, p.dropout_offset + element / 8);
  uint32_t words[4];
#pragma unroll
  for (int s = 0; s < 4; ++s)
    words[s] = s == 0 ? word_of(block, t) : __shfl_xor_sync(0xffffffffu, word_of(block, t ^ s), s);
  unxor(words, t);
#pragma unroll
  for (int e = 0; e < 8; ++e) f[e / 4][e % 4] = p.keep_factor<float>(philox_half(words[e / 2], e % 2));
}

// The factors f[z][e] of a lane's scores [n + z][e] where rows are keys: key
// j (e = 0, 1) and j + 8 (e = 2, 3); queries i, i + 1 (z = 0, i the lane's
// first column in tile n) and i + 8, i + 9 (z = 1).
__device__ __forceinline__ void key_row_factors(float (&f)[2][4], const Problem& p, int64_t bh, int64_t j, int64_t i,
                                                int lane) {
  if (p.Tk % 8 != 0) {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      f[e / 4][e % 4] = p.dropout_factor<float>(bh, i + 8 * (e / 4) + e % 2, j + 8 * (e % 4 / 2));
    return;
  }
  // Lane g of a column's eight (lane 4g + t) holds keys g and g + 8 of the
  // warp's 16, which start at j - g: half g % 2 of word g / 2 of blocks
  // b = 0..7 (query i + b % 2 + 8 (b / 4), keys from j - g + 8 (b / 2 % 2)). It draws block g.
  const int g = lane / 4;
  const uint64_t element =
      uint64_t(bh * p.Tq + i + g % 2 + 8 * (g / 4)) * uint64_t(p.Tk) + uint64_t(j - g + 8 * (g / 2 % 2));
  const Philox4 block = philox4x32_10(p.dropout_seed, p.dropout_offset + element / 8);
  uint32_t words[8];
#pragma unroll
  for (int s = 0; s < 8; ++s)
    words[s] = s == 0 ? word_of(block, g / 2) : __shfl_xor_sync(0xffffffffu, word_of(block, (g ^ s) / 2), 4 * s);
  unxor(words, g);
#pragma unroll
  for (int e = 0; e < 8; ++e) f[e / 4][e % 4] = p.keep_factor<float>(philox_half(words[e], g % 2));
}

// One block per (batch * head, query tile); the online softmax of attention.cu,
// per warp, with each lane keeping the running max and sum of its two rows.
// Three blocks per SM: 159 registers (D <= 64), no spills.
template <int DMAX, typename Out>
__global__ void __launch_bounds__(kBlockThreads, 3)
    forward_kernel(Problem p, float scale, Out* out, float* lse, const bf16* q, const bf16* k, const bf16* v) {
  extern __shared__ __align__(128) bf16 smem[];
  bf16* q_tile = smem;
  __shared__ bool key_ok[kTile];
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int64_t bh = blockIdx.x, tile0 = query_tile_start(), i0 = tile0 + warp * kRows;  // the warp's first query
  const int32_t* mask = p.mask_row(bh);
  const TileStream<DMAX> kv{smem + kTileElems<DMAX>, rows_of(p, k, p.strides.k, bh), rows_of(p, v, p.strides.v, bh),
                            p.Tk};
  const int64_t key_end = p.key_end(tile0 + kTile);
  const float scale_log2 = scale * kLog2e;  // scores in base 2: exp2 needs no multiply
  load_tile<DMAX>(q_tile, rows_of(p, q, p.strides.q, bh), tile0, p.Tq, p);
  kv.fetch(0, 0, key_end, p);  // one group with Q
  const bf16* q_rows = q_tile + warp * kRows * kLd<DMAX>;

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, acc[DMAX / 8][4];
  bool seen[2] = {false, false};  // decided by the mask alone, so NaN scores cannot pass for "no key"
  zero<DMAX>(acc);

  int buffer = 0;
  for (int64_t j0 = 0; j0 < key_end; j0 += kTile, buffer ^= 1) {
    __syncthreads();  // every warp is done with the other buffer and with key_ok
    kv.fetch(buffer ^ 1, j0 + kTile, key_end, p);
    cp_async_wait<1>();  // all but that newest group: this tile has landed
    const int kept = count_key_flags(key_ok, p, mask, j0);  // a barrier: the tile is the block's
    if (kept == 0) continue;  // all padding: skipped, as the CPU skips it
    const bf16 *k_tile = kv.tile(buffer, 0), *v_tile = kv.tile(buffer, 1);

    Scores s;
    warp_scores<DMAX>(s, q_rows, k_tile, lane);
    // Most tiles need no mask: only those on the causal diagonal or holding
    // padding keys take the second pass (the branch is the same for the whole warp).
    const bool unmasked = tile_unmasked(p, kept == kTile, i0, j0);
    bool any[2] = {true, true};
#pragma unroll
    for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] *= scale_log2;
    if (!unmasked) {
      any[0] = any[1] = false;
#pragma unroll
      for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int jl = score_col(lane, n, e);
          const bool visible = key_ok[jl] && p.in_causal_window(i0 + score_row(lane, e), j0 + jl);
          if (!visible) s[n][e] = -INFINITY;
          any[e / 2] |= visible;
        }
#pragma unroll
      for (int h = 0; h < 2; ++h) any[h] = quad_sum(float(any[h])) > 0.f;
    }
    float tile_max[2] = {-INFINITY, -INFINITY}, rescale[2];
#pragma unroll
    for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) tile_max[e / 2] = MaxOp{}(tile_max[e / 2], s[n][e]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = quad_max(tile_max[h]);
      const bool grows = any[h] && tile_max[h] > m[h];
      rescale[h] = grows ? fast_exp2(m[h] - tile_max[h]) : 1.f;  // 0 on the row's first keys (m = -inf)
      if (grows) m[h] = tile_max[h];
    }
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2;
        const float prob = any[h] ? fast_exp2(s[n][e] - m[h]) : 0.f;  // a NaN score makes the row NaN, as it should
        sum[h] += prob;  // the normaliser counts every probability, dropped or not
        s[n][e] = prob;
      }
    if (p.dropout_p > 0) {
#pragma unroll
      for (int n = 0; n < kTile / 8; n += 2) {
        float f[2][4];
        query_row_factors(f, p, bh, i0 + score_row(lane, 0), j0 + score_col(lane, n, 0), lane);
#pragma unroll
        for (int e = 0; e < 8; ++e) s[n + e / 4][e % 4] *= f[e / 4][e % 4];
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float row_sum = quad_sum(sum[h]);  // every lane shuffles, before the branch on its own rows
      if (!any[h]) continue;
      seen[h] = true;
      l[h] = l[h] * rescale[h] + row_sum;
#pragma unroll
      for (int n = 0; n < DMAX / 8; ++n) acc[n][2 * h] *= rescale[h], acc[n][2 * h + 1] *= rescale[h];
    }
    warp_accumulate<DMAX>(acc, s, v_tile, lane);  // acc += P V
  }
  cp_async_wait<0>();  // no copy outlives the loop, even when it never ran

  const int64_t rows = p.Tq - i0;
  if (rows <= 0) return;
  float inverse[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    inverse[h] = seen[h] ? 1.f / l[h] : 0.f;
    const int r = score_row(lane, 2 * h);
    if (lane % 4 == 0 && r < rows) lse[bh * p.Tq + i0 + r] = seen[h] ? m[h] * kLn2 + logf(l[h]) : -INFINITY;
  }
  store_rows<DMAX>(rows_of(p, out, p.strides.out, bh).from(i0), acc, inverse, rows, p.D, lane);
}

// One element of the softmax backward: from the raw score s and dp = <dO_i, v_j>,
// leaves P F (what dV needs) in s and dS = scale * P * (dP F - delta) in dp.
// Exponents in base 2, as in the forward: lse2 is the row's lse times log2(e).
__device__ __forceinline__ void softmax_grad(float& s, float& dp, bool visible, float scale_log2, float lse2,
                                             float delta, float scale, float factor) {
  const float prob = visible && lse2 != -INFINITY ? fast_exp2(s * scale_log2 - lse2) : 0.f;
  s = prob * factor;
  dp = scale * prob * (dp * factor - delta);
}

// dS^T of a slice of heads, bf16 [heads, Tk, Tq] with both lengths padded to
// whole tiles: row j holds key j's score gradients against every query, as
// the dK/dV kernel computes them. dQ's kernel multiplies them by K, so the
// scores are made once and dQ needs neither atomics nor a second dropout draw.
struct ScoreGradients {
  bf16* data;        // null: dQ is not wanted
  int64_t first_bh;  // the slice's first (batch * head): blockIdx.x counts from it
  int64_t rows, ld;  // Tk and Tq, padded
  __device__ Rows<bf16> head(int64_t bh) const { return {data + (bh - first_bh) * rows * ld, ld}; }
};

// dK and dV for one (batch * head, key tile): dV = (P F)^T dO, dK = dS^T Q;
// and dS^T into ds, for dQ. Here a warp's rows are keys and its score columns
// queries: it makes P^T and dS^T directly, as K Q^T and V dO^T.
template <int DMAX, typename Grad>
__global__ void __launch_bounds__(kBlockThreads)
    dkv_kernel(Problem p, float scale, ScoreGradients ds, Grad* dk, Grad* dv, const bf16* dout, const bf16* q,
               const bf16* k, const bf16* v, const float* lse, const float* delta) {
  extern __shared__ __align__(128) bf16 smem[];
  bf16 *k_tile = smem, *v_tile = smem + kTileElems<DMAX>;
  __shared__ bool key_ok[kTile];
  __shared__ float tile_lse[kTile], tile_delta[kTile];
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int64_t bh = ds.first_bh + blockIdx.x, tile0 = int64_t(blockIdx.y) * kTile;
  const int64_t j0 = tile0 + warp * kRows;  // the warp's first key
  const bool need_ds = dk != nullptr || ds.data != nullptr;  // dV alone needs only P
  const float scale_log2 = scale * kLog2e;
  const int32_t* mask = p.mask_row(bh);
  float dk_acc[DMAX / 8][4], dv_acc[DMAX / 8][4];
  zero<DMAX>(dk_acc);
  zero<DMAX>(dv_acc);

  // A tile of padding keys gets zero gradient without reading any query.
  const int kept = count_key_flags(key_ok, p, mask, tile0);
  if (kept > 0) {
    const TileStream<DMAX> qdo{smem + 2 * kTileElems<DMAX>, rows_of(p, q, p.strides.q, bh),
                               rows_of(p, dout, p.strides.dout, bh), p.Tq};
    // Under causal masking, queries before tile0 - shift see none of these keys.
    const int64_t first_query = (p.causal ? max64(0, tile0 - p.causal_shift) : 0) / kTile * kTile;
    load_tile<DMAX>(k_tile, rows_of(p, k, p.strides.k, bh), tile0, p.Tk, p);
    load_tile<DMAX>(v_tile, rows_of(p, v, p.strides.v, bh), tile0, p.Tk, p);
    qdo.fetch(0, first_query, p.Tq, p);  // one group with K and V
    const bf16 *k_rows = k_tile + warp * kRows * kLd<DMAX>, *v_rows = v_tile + warp * kRows * kLd<DMAX>;
    const bool* warp_keys_ok = key_ok + warp * kRows;
    int buffer = 0;
    for (int64_t q0 = first_query; q0 < p.Tq; q0 += kTile, buffer ^= 1) {
      __syncthreads();  // every warp is done with the other buffer and the query stats
      qdo.fetch(buffer ^ 1, q0 + kTile, p.Tq, p);
      load_query_stats(tile_lse, tile_delta, p, bh, q0, lse, delta);
      if (threadIdx.x < kTile) tile_lse[threadIdx.x] *= kLog2e;  // the thread that loaded it
      cp_async_wait<1>();
      __syncthreads();
      const bf16 *q_tile = qdo.tile(buffer, 0), *do_tile = qdo.tile(buffer, 1);
      Scores s, dp = {};
      warp_scores<DMAX>(s, k_rows, q_tile, lane);                 // s = K Q^T
      if (need_ds) warp_scores<DMAX>(dp, v_rows, do_tile, lane);  // dp = V dO^T
      // Unmasked: every key real and, under causal masking, every query of
      // the tile sees the warp's last key (rows are keys here). Queries past
      // Tq need no mask: their lse is -inf, so their P is 0.
      const bool unmasked = kept == kTile && (!p.causal || j0 + kRows - 1 <= q0 + p.causal_shift);
#pragma unroll
      for (int n = 0; n < kTile / 8; n += 2) {
        float f[2][4] = {{1.f, 1.f, 1.f, 1.f}, {1.f, 1.f, 1.f, 1.f}};
        if (p.dropout_p > 0) key_row_factors(f, p, bh, j0 + score_row(lane, 0), q0 + score_col(lane, n, 0), lane);
#pragma unroll
        for (int z = 0; z < 2; ++z)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = score_row(lane, e), c = score_col(lane, n + z, e);
            const bool visible = unmasked || (warp_keys_ok[r] && p.in_causal_window(q0 + c, j0 + r));
            softmax_grad(s[n + z][e], dp[n + z][e], visible, scale_log2, tile_lse[c], tile_delta[c], scale, f[z][e]);
          }
      }
      if (ds.data) {  // rounded as dK's product rounds it, so dQ and dK see one dS
        const Rows<bf16> keys = ds.head(bh).from(j0);
#pragma unroll
        for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            *reinterpret_cast<uint32_t*>(keys.row(score_row(lane, 2 * h)) + q0 + score_col(lane, n, 0)) =
                pack_bf16(dp[n][2 * h], dp[n][2 * h + 1]);
      }
      if (dv) warp_accumulate<DMAX>(dv_acc, s, do_tile, lane);  // dV += (P F)^T dO
      if (dk) warp_accumulate<DMAX>(dk_acc, dp, q_tile, lane);  // dK += dS^T Q
    }
    cp_async_wait<0>();  // no copy outlives the loop, even when it never ran
  }
  if (j0 >= p.Tk) return;
  const float one[2] = {1.f, 1.f};
  if (dk) store_rows<DMAX>(rows_of(p, dk, p.strides.dk, bh).from(j0), dk_acc, one, p.Tk - j0, p.D, lane);
  if (dv) store_rows<DMAX>(rows_of(p, dv, p.strides.dv, bh).from(j0), dv_acc, one, p.Tk - j0, p.D, lane);
}

// dQ for one (batch * head, query tile): dQ = dS K, with the dS the dK/dV
// kernel wrote. It reads the key tiles that kernel visited and no others:
// those with a real key and, under causal masking, in some query's window.
template <int DMAX, typename Grad>
__global__ void __launch_bounds__(kBlockThreads) dq_kernel(Problem p, ScoreGradients ds, Grad* dq, const bf16* k) {
  extern __shared__ __align__(128) bf16 smem[];  // two buffers, each a K tile then a dS^T tile
  __shared__ bool key_ok[kTile];
  constexpr int kBuffer = kTileElems<DMAX> + kTileElems<kTile>;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int64_t bh = ds.first_bh + blockIdx.x, tile0 = query_tile_start(), i0 = tile0 + warp * kRows;
  const int32_t* mask = p.mask_row(bh);
  const Rows<const bf16> k_rows = rows_of(p, k, p.strides.k, bh), ds_rows{ds.head(bh).base + tile0, ds.ld};
  const int64_t key_end = p.key_end(tile0 + kTile);
  auto fetch = [&](int buffer, int64_t j0) {  // closes a cp.async group either way, one per tile
    if (j0 < key_end) {
      load_tile<DMAX>(smem + buffer * kBuffer, k_rows, j0, p.Tk, p);
      load_rows<kTile>(smem + buffer * kBuffer + kTileElems<DMAX>, ds_rows, j0, ds.rows, kTile, true);
    }
    cp_async_commit();
  };
  fetch(0, 0);
  float acc[DMAX / 8][4];
  zero<DMAX>(acc);

  int buffer = 0;
  for (int64_t j0 = 0; j0 < key_end; j0 += kTile, buffer ^= 1) {
    __syncthreads();  // every warp is done with the other buffer and with key_ok
    fetch(buffer ^ 1, j0 + kTile);
    cp_async_wait<1>();
    if (count_key_flags(key_ok, p, mask, j0) == 0) continue;  // all padding: dK/dV skipped it, wrote nothing
    const bf16 *k_tile = smem + buffer * kBuffer, *ds_tile = k_tile + kTileElems<DMAX>;
#pragma unroll
    for (int step = 0; step < kTile / 16; ++step) {
      // The warp's dS [16 queries, 16 keys], read transposed out of the [keys, queries] tile.
      uint32_t a[4];
      ldmatrix_transposed(a, ds_tile + (step * 16 + b_row(lane)) * kLd<kTile> + warp * kRows + b_col(lane));
      accumulate_step<DMAX>(acc, a, k_tile, step, lane);
    }
  }
  cp_async_wait<0>();  // no copy outlives the loop, even when it never ran
  const float one[2] = {1.f, 1.f};
  if (i0 < p.Tq) store_rows<DMAX>(rows_of(p, dq, p.strides.dq, bh).from(i0), acc, one, p.Tq - i0, p.D, lane);
}

// Calls fn(std::integral_constant<int, DMAX>) for the smallest padded head size that holds D.
template <typename Fn>
void by_head_size(int64_t D, Fn&& fn) {
  if (D <= 32) fn(std::integral_constant<int, 32>{});
  else if (D <= 64) fn(std::integral_constant<int, 64>{});
  else fn(std::integral_constant<int, 128>{});
}

int64_t tiles_of(int64_t rows) { return (rows + kTile - 1) / kTile; }

// Whether every row of the operand starts 16 bytes aligned, for cp.async.
bool rows_aligned(const void* data, const HeadStrides& s, int64_t D) {
  return reinterpret_cast<uintptr_t>(data) % 16 == 0 && s.batch % 8 == 0 && s.head % 8 == 0 && s.row % 8 == 0 &&
         D % 8 == 0;
}

}  // namespace

cudaError_t launch_forward_bf16(const LaunchContext& ctx, const AttentionShape& shape, void* out, float* lse,
                                const bf16* q, const bf16* k, const bf16* v) {
  Problem p = problem_of(shape);
  const AttentionStrides& s = shape.strides;
  p.vector_loads = rows_aligned(q, s.q, p.D) && rows_aligned(k, s.k, p.D) && rows_aligned(v, s.v, p.D);
  const int64_t bh = shape.B * shape.H, tiles = tiles_of(shape.Tq);
  if (bh == 0 || tiles == 0) return cudaSuccess;
  if (!grid_fits(bh, tiles)) return cudaErrorInvalidConfiguration;
  cudaError_t status = cudaSuccess;
  by_head_size(shape.D, [&](auto dmax) {
    constexpr int DMAX = decltype(dmax)::value;
    const dim3 grid{unsigned(bh), unsigned(tiles)};
    const size_t smem = 5 * kTileElems<DMAX> * sizeof(bf16);
    const float scale = float(shape.scale);
    status = shape.out_bf16 ? launch_with_smem(forward_kernel<DMAX, bf16>, grid, kBlockThreads, smem, ctx.stream, p,
                                               scale, static_cast<bf16*>(out), lse, q, k, v)
                            : launch_with_smem(forward_kernel<DMAX, float>, grid, kBlockThreads, smem, ctx.stream, p,
                                               scale, static_cast<float*>(out), lse, q, k, v);
  });
  return status;
}

namespace {

size_t score_gradient_bytes_per_head(const AttentionShape& shape) {
  return size_t(tiles_of(shape.Tk) * kTile) * size_t(tiles_of(shape.Tq) * kTile) * sizeof(bf16);
}

size_t delta_bytes_aligned(const AttentionShape& shape) {
  return (size_t(shape.B * shape.H * shape.Tq) * sizeof(float) + 255) / 256 * 256;
}

// dS for as many heads as this holds, one at least. gpt2-large's training
// step (640 heads at T 256) needs 84 MB: one slice.
constexpr size_t kScoreGradientBudget = size_t(256) << 20;

}  // namespace

size_t backward_bf16_scratch_bytes(const AttentionShape& shape) {
  const size_t head = score_gradient_bytes_per_head(shape);
  const int64_t heads = head == 0 ? 0 : max64(1, min64(shape.B * shape.H, int64_t(kScoreGradientBudget / head)));
  return delta_bytes_aligned(shape) + size_t(heads) * head;
}

cudaError_t launch_backward_bf16(const LaunchContext& ctx, const AttentionShape& shape, void* dq, void* dk, void* dv,
                                 const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const void* out,
                                 const float* lse, void* scratch, size_t scratch_bytes) {
  Problem p = problem_of(shape);
  const AttentionStrides& s = shape.strides;
  p.vector_loads = rows_aligned(q, s.q, p.D) && rows_aligned(k, s.k, p.D) && rows_aligned(v, s.v, p.D) &&
                   rows_aligned(dout, s.dout, p.D);
  const int64_t bh = shape.B * shape.H, q_tiles = tiles_of(shape.Tq), k_tiles = tiles_of(shape.Tk);
  if (bh == 0 || (!dq && !dk && !dv)) return cudaSuccess;
  if (!grid_fits(bh, q_tiles) || !grid_fits(bh, k_tiles)) return cudaErrorInvalidConfiguration;
  // The scratch: delta (f32 per query), then dS^T for `heads` heads at a time.
  float* delta = static_cast<float*>(scratch);
  const size_t delta_bytes = delta_bytes_aligned(shape), head_bytes = score_gradient_bytes_per_head(shape);
  const bool need_ds = dq && q_tiles > 0 && k_tiles > 0;
  const int64_t heads = !need_ds ? bh
                        : scratch_bytes > delta_bytes ? min64(bh, int64_t((scratch_bytes - delta_bytes) / head_bytes))
                                                      : 0;
  if (heads == 0) return cudaErrorInvalidValue;  // no room for even one head's dS
  bf16* ds_data = need_ds ? reinterpret_cast<bf16*>(static_cast<char*>(scratch) + delta_bytes) : nullptr;

  cudaError_t status = cudaSuccess;
  if (dq || dk)  // dV alone needs no delta
    status = shape.out_bf16 ? launch_delta(ctx, p, bh, delta, dout, static_cast<const bf16*>(out))
                            : launch_delta(ctx, p, bh, delta, dout, static_cast<const float*>(out));
  const float scale = float(shape.scale);
  // The gradients in f32, or in bf16 for bf16 inputs; dK/dV then dQ, a slice of heads at a time.
  auto launch = [&](auto dmax, auto* grad_type) {
    constexpr int DMAX = decltype(dmax)::value;
    using Grad = std::remove_pointer_t<decltype(grad_type)>;
    const size_t dkv_smem = 6 * kTileElems<DMAX> * sizeof(bf16);
    const size_t dq_smem = 2 * (kTileElems<DMAX> + kTileElems<kTile>) * sizeof(bf16);
    for (int64_t first = 0; first < bh && status == cudaSuccess; first += heads) {
      const ScoreGradients ds{ds_data, first, k_tiles * kTile, q_tiles * kTile};
      const unsigned slice = unsigned(min64(heads, bh - first));
      if (k_tiles > 0)
        status = launch_with_smem(dkv_kernel<DMAX, Grad>, dim3{slice, unsigned(k_tiles)}, kBlockThreads, dkv_smem,
                                  ctx.stream, p, scale, ds, static_cast<Grad*>(dk), static_cast<Grad*>(dv), dout, q, k,
                                  v, lse, delta);
      if (dq && q_tiles > 0 && status == cudaSuccess)
        status = launch_with_smem(dq_kernel<DMAX, Grad>, dim3{slice, unsigned(q_tiles)}, kBlockThreads, dq_smem,
                                  ctx.stream, p, ds, static_cast<Grad*>(dq), k);
    }
  };
  if (status == cudaSuccess)
    by_head_size(shape.D, [&](auto dmax) {
      if (shape.grads_bf16) launch(dmax, static_cast<bf16*>(nullptr));
      else launch(dmax, static_cast<float*>(nullptr));
    });
  return status;
}

}  // namespace engine::cuda::attention
