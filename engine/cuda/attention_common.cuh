// What the two families of attention kernels share: attention.cu (f32 and
// f64 inputs, CUDA cores) and attention_bf16.cu (bf16 inputs, tensor cores).
// Problem holds one call's geometry and the masking and dropout rules of
// engine/backend.h's AttentionArgs; the launchers below are the bf16 family's
// entry points, which attention.cu's launchers call for bf16 inputs.
#pragma once

#include "engine/cuda/common.cuh"
#include "engine/rng.h"

namespace engine::cuda::attention {

constexpr int kTile = 64;  // queries or keys per block tile

// One call's geometry, passed by value to every kernel.
struct Problem {
  int64_t H, Tq, Tk, D;
  const int32_t* key_mask;  // [B, Tk] or null
  bool causal;
  int64_t causal_shift;   // Tk - Tq: query i sees keys j <= i + causal_shift
  double dropout_p = 0;   // 0: no dropout
  double keep_scale = 1;  // 1 / (1 - dropout_p)
  float keep_scale_f32 = 1;  // keep_scale for the kernels that compute in f32
  uint32_t keep_from = 0;  // uniform_threshold(dropout_p, 16): kept when the 16-bit uniform is at least this
  uint64_t dropout_seed = 0, dropout_offset = 0;
  AttentionStrides strides{};
  bool vector_loads = false;  // bf16 inputs: every row 16-byte aligned (set by their launchers)

  // Where an operand's (batch * head) index bh starts. bh < 2^31 (grid_fits):
  // a 32-bit division is several times cheaper than a 64-bit one.
  __device__ int64_t offset(const HeadStrides& s, int64_t bh) const {
    const uint32_t b = uint32_t(bh) / uint32_t(H), h = uint32_t(bh) - b * uint32_t(H);
    return int64_t(b) * s.batch + int64_t(h) * s.head;
  }

  __device__ const int32_t* mask_row(int64_t bh) const { return key_mask ? key_mask + (bh / H) * Tk : nullptr; }
  __device__ bool key_kept(const int32_t* mask, int64_t j) const { return !mask || mask[j] != 0; }
  __device__ bool in_causal_window(int64_t i, int64_t j) const { return !causal || j <= i + causal_shift; }
  // Keys at or past this index are in the future of every query below `query_end`.
  __device__ int64_t key_end(int64_t query_end) const {
    return causal ? max64(0, min64(Tk, query_end + causal_shift)) : Tk;
  }
  // What probability (i, j) of head bh is multiplied by after the softmax:
  // 1 without dropout, else 1 / (1 - p) if kept and 0 if dropped. Element e of
  // the 16-bit stream (engine/rng.h's philox_uniform16) decides.
  template <typename T>
  __device__ T dropout_factor(int64_t bh, int64_t i, int64_t j) const {
    if (dropout_p <= 0) return T(1);
    const uint64_t element = uint64_t(bh * Tq + i) * uint64_t(Tk) + uint64_t(j);
    const Philox4 block = philox4x32_10(dropout_seed, dropout_offset + element / 8);
    return keep_factor<T>(philox_half(word_of(block, unsigned(element / 2 % 4)), unsigned(element % 2)));
  }
  // The factor of a probability whose 16-bit uniform, as an integer, is `half`.
  template <typename T>
  __device__ T keep_factor(uint32_t half) const {
    if constexpr (std::is_same_v<T, float>) return half >= keep_from ? keep_scale_f32 : 0.f;
    else return half >= keep_from ? T(keep_scale) : T(0);
  }
};

inline Problem problem_of(const AttentionShape& s) {
  Problem p{s.H, s.Tq, s.Tk, s.D, s.key_mask, s.causal, s.Tk - s.Tq};
  p.dropout_p = s.dropout_p;
  p.keep_scale = 1.0 / (1.0 - s.dropout_p);
  p.keep_scale_f32 = float(p.keep_scale);
  p.keep_from = uniform_threshold(s.dropout_p, 16);
  p.dropout_seed = s.dropout_seed;
  p.dropout_offset = s.dropout_offset;
  p.strides = s.strides;
  return p;
}

// Marks which keys of tile j0 are real (not padding, not past Tk); true when
// any is. A block-wide barrier: every thread of the block must call it.
__device__ __forceinline__ bool load_key_flags(bool* key_ok, const Problem& p, const int32_t* mask, int64_t j0) {
  bool kept = false;
  if (threadIdx.x < kTile) {
    const int64_t j = j0 + threadIdx.x;
    kept = j < p.Tk && p.key_kept(mask, j);
    key_ok[threadIdx.x] = kept;
  }
  return __syncthreads_or(kept);
}

// The saved lse and delta of the queries of tile i0 (-inf and 0 past Tq),
// into shared arrays of kTile entries, by the block's first kTile threads.
__device__ __forceinline__ void load_query_stats(float* tile_lse, float* tile_delta, const Problem& p, int64_t bh,
                                                 int64_t i0, const float* lse, const float* delta) {
  if (threadIdx.x >= kTile) return;
  const int64_t i = i0 + threadIdx.x;
  tile_lse[threadIdx.x] = i < p.Tq ? lse[bh * p.Tq + i] : -INFINITY;
  tile_delta[threadIdx.x] = i < p.Tq ? delta[bh * p.Tq + i] : 0.f;
}

// P = exp(scale * s - lse) where query i sees key j, else 0 (also for a
// query that sees no key at all: its lse is -inf).
__device__ __forceinline__ float probability(bool visible, float s, float scale, float row_lse) {
  return visible && row_lse != -INFINITY ? expf(s * scale - row_lse) : 0.f;
}

// delta_i = <dO_i, O_i>, the softmax backward's correction term, for every
// query row i of every head bh (blockIdx.x); one warp per row. dO has the
// kernels' input type, O their output type, and T is the sum's.
template <typename T, typename In, typename Out>
__global__ void delta_kernel(Problem p, T* delta, const In* dout, const Out* out) {
  const int64_t bh = blockIdx.x, i = int64_t(blockIdx.y) * (kThreads / 32) + threadIdx.x / 32;
  if (i >= p.Tq) return;
  const In* g = dout + p.offset(p.strides.dout, bh) + i * p.strides.dout.row;
  const Out* o = out + p.offset(p.strides.out, bh) + i * p.strides.out.row;
  T sum = 0;
  for (int64_t d = threadIdx.x % 32; d < p.D; d += 32) sum += convert<T>(g[d]) * convert<T>(o[d]);
  sum = warp_reduce(sum, SumOp{});
  if (threadIdx.x % 32 == 0) delta[bh * p.Tq + i] = sum;
}

inline bool grid_fits(int64_t bh, int64_t tiles) { return bh <= int64_t(INT32_MAX) && tiles <= 65535; }

// For bh (batch * head) rows of Tq queries.
template <typename T, typename In, typename Out>
cudaError_t launch_delta(const LaunchContext& ctx, const Problem& p, int64_t bh, T* delta, const In* dout,
                         const Out* out) {
  const int64_t query_blocks = (p.Tq + kThreads / 32 - 1) / (kThreads / 32);
  if (bh == 0 || query_blocks == 0) return cudaSuccess;
  if (!grid_fits(bh, query_blocks)) return cudaErrorInvalidConfiguration;
  delta_kernel<<<dim3{unsigned(bh), unsigned(query_blocks)}, kThreads, 0, ctx.stream>>>(p, delta, dout, out);
  return cudaGetLastError();
}

// Dynamic shared memory above 48 KiB must be asked for, per kernel.
template <typename Kernel>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream, auto... args) {
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (status != cudaSuccess) return status;
  kernel<<<grid, threads, smem, stream>>>(args...);
  return cudaGetLastError();
}

// ---- the bf16 tensor-core family (attention_bf16.cu), head dim D <= 128 ----
// q, k, v (and dO) bf16 [B, H, T, D]; out f32 or bf16 (shape.out_bf16); dq,
// dk, dv f32 or bf16 (shape.grads_bf16); all through shape.strides. The
// backward's scratch holds delta (f32 per query) and dS^T, a slice of heads at
// a time: backward_bf16_scratch_bytes is enough for it, and the fewest slices
// its budget allows; with less, each slice holds as many heads as fit.
cudaError_t launch_forward_bf16(const LaunchContext& ctx, const AttentionShape& shape, void* out, float* lse,
                                const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v);
cudaError_t launch_backward_bf16(const LaunchContext& ctx, const AttentionShape& shape, void* dq, void* dk, void* dv,
                                 const __nv_bfloat16* dout, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                 const __nv_bfloat16* v, const void* out, const float* lse, void* scratch,
                                 size_t scratch_bytes);
size_t backward_bf16_scratch_bytes(const AttentionShape& shape);

}  // namespace engine::cuda::attention
