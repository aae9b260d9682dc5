// CUDA reductions: sum and max over any set of dims, and argmax over the last
// dim. Sums accumulate in the tensor's own type (f32 for f32, f64 for f64),
// in trees of warps, whose error grows with log(n) rather than n; the CPU
// accumulates in double, so the two agree to a few f32 ulps, not bit for bit.
//
// Two thread mappings keep the loads coalesced:
//   columns: the kept dims are innermost in memory (sum over rows, a bias
//            gradient): 32 consecutive outputs per block row, 8 threads down
//            the reduced dims, combined in shared memory.
//   rows:    otherwise (sum over the last dim, or over everything): one warp
//            per output, its lanes striding the reduced elements.
// When there are too few outputs to fill the GPU, the reduced range is split
// into S slices that write partial results, and a second kernel adds each
// output's S partials in slice order, so results never depend on timing.
#include "engine/cuda/common.cuh"

#include <cmath>

namespace engine::cuda {

namespace {

// Max as the CPU takes it: a NaN anywhere makes the result NaN.
struct MaxKeepNan {
  template <typename T>
  __device__ __forceinline__ T operator()(T acc, T v) const { return (v > acc || v != v) ? v : acc; }
};

__device__ __forceinline__ int64_t kept_in_offset(const ReduceLayout& l, int64_t o) {
  return unravel_offset(o, l.kept_rank, l.kept_shape, l.kept_in_strides);
}
__device__ __forceinline__ int64_t kept_out_offset(const ReduceLayout& l, int64_t o) {
  return unravel_offset(o, l.kept_rank, l.kept_shape, l.kept_out_strides);
}
__device__ __forceinline__ int64_t reduced_offset(const ReduceLayout& l, int64_t r) {
  return unravel_offset(r, l.reduced_rank, l.reduced_shape, l.reduced_strides);
}

constexpr int kColumnsX = 32, kColumnsY = 8;  // columns mapping: block shape
constexpr int kRowsWarps = 8;                 // rows mapping: warps (outputs) per block

struct ReducePlan {
  bool columns = false;
  int64_t slices = 1;  // S: splits of each output's reduced range
  int64_t chunk = 0;   // reduced elements per slice
};

ReducePlan plan(const LaunchContext& ctx, const ReduceLayout& l) {
  ReducePlan p;
  const bool reduced_contiguous = l.reduced_rank > 0 && l.reduced_strides[l.reduced_rank - 1] == 1;
  const bool kept_contiguous = l.kept_rank > 0 && l.kept_in_strides[l.kept_rank - 1] == 1;
  p.columns = kept_contiguous && !reduced_contiguous;
  // Aim for about 64 warps per multiprocessor, but give each slice enough
  // elements (per thread, at least 16) that the partials stay a small extra.
  const int64_t target_warps = int64_t(ctx.sm_count) * 64;
  const int64_t busy_warps = p.columns ? (l.outputs + kColumnsX - 1) / kColumnsX * kColumnsY : l.outputs;
  const int64_t min_chunk = p.columns ? 16 * kColumnsY : 16 * 32;
  const int64_t max_slices = std::max<int64_t>(1, l.block / min_chunk);
  p.slices = std::clamp<int64_t>((target_warps + busy_warps - 1) / busy_warps, 1, max_slices);
  p.chunk = (l.block + p.slices - 1) / p.slices;
  p.slices = (l.block + p.chunk - 1) / p.chunk;  // no empty slice
  return p;
}

// Writes the result of output o, or its slice's partial when there are several slices.
template <typename T>
__device__ __forceinline__ void store_result(const ReduceLayout& l, T* out, T* partial, int64_t slice, int64_t slices,
                                             int64_t o, T value) {
  if (slices == 1) out[kept_out_offset(l, o)] = value;
  else partial[slice * l.outputs + o] = value;
}

template <typename T, typename Op>
__global__ void reduce_columns_kernel(ReduceLayout l, Op op, T identity, const T* in, T* out, T* partial,
                                      int64_t chunk) {
  __shared__ T shared[kColumnsY][kColumnsX + 1];
  const int64_t o = int64_t(blockIdx.x) * kColumnsX + threadIdx.x;
  const int64_t slice = blockIdx.y, begin = slice * chunk, end = min64(l.block, begin + chunk);
  T acc = identity;
  if (o < l.outputs) {
    const T* base = in + kept_in_offset(l, o);
    for (int64_t r = begin + threadIdx.y; r < end; r += kColumnsY) acc = op(acc, base[reduced_offset(l, r)]);
  }
  shared[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || o >= l.outputs) return;
  for (int y = 1; y < kColumnsY; ++y) acc = op(acc, shared[y][threadIdx.x]);
  store_result(l, out, partial, slice, int64_t(gridDim.y), o, acc);
}

// Work item w of outputs * slices is output w % outputs, slice w / outputs.
template <typename T, typename Op>
__global__ void reduce_rows_kernel(ReduceLayout l, Op op, T identity, const T* in, T* out, T* partial,
                                   int64_t slices, int64_t chunk) {
  const int lane = threadIdx.x % 32;
  const int64_t item = int64_t(blockIdx.x) * kRowsWarps + threadIdx.x / 32;
  if (item >= l.outputs * slices) return;  // a whole warp leaves together
  const int64_t o = item % l.outputs, slice = item / l.outputs;
  const int64_t begin = slice * chunk, end = min64(l.block, begin + chunk);
  const T* base = in + kept_in_offset(l, o);
  T acc = identity;
  for (int64_t r = begin + lane; r < end; r += 32) acc = op(acc, base[reduced_offset(l, r)]);
  acc = warp_reduce(acc, op);
  if (lane == 0) store_result(l, out, partial, slice, slices, o, acc);
}

template <typename T, typename Op>
__global__ void combine_slices_kernel(ReduceLayout l, Op op, T identity, const T* partial, int64_t slices, T* out) {
  for (int64_t o = grid_index(); o < l.outputs; o += grid_stride()) {
    T acc = identity;
    for (int64_t s = 0; s < slices; ++s) acc = op(acc, partial[s * l.outputs + o]);
    out[kept_out_offset(l, o)] = acc;
  }
}

template <typename T, typename Op>
cudaError_t run_reduce(const LaunchContext& ctx, const ReduceLayout& l, Op op, T identity, const T* in, T* out,
                       T* partial) {
  const ReducePlan p = plan(ctx, l);
  if (p.columns) {
    const dim3 grid(unsigned((l.outputs + kColumnsX - 1) / kColumnsX), unsigned(p.slices));
    reduce_columns_kernel<<<grid, dim3(kColumnsX, kColumnsY), 0, ctx.stream>>>(l, op, identity, in, out, partial,
                                                                               p.chunk);
  } else {
    const int64_t blocks = (l.outputs * p.slices + kRowsWarps - 1) / kRowsWarps;
    reduce_rows_kernel<<<unsigned(blocks), kRowsWarps * 32, 0, ctx.stream>>>(l, op, identity, in, out, partial,
                                                                             p.slices, p.chunk);
  }
  if (p.slices > 1)
    combine_slices_kernel<<<grid_for(ctx, l.outputs), kThreads, 0, ctx.stream>>>(l, op, identity, partial, p.slices,
                                                                               out);
  return cudaGetLastError();
}

// ---- argmax over the last dim ----
// The CPU keeps the first index whose value beats every earlier one with
// `>`: the first maximum among the non-NaN values, except that a NaN in
// column 0 is never beaten and wins. Each thread finds the first maximum of
// its strided share, skipping NaN (index -1: none yet); the block keeps the
// larger value, then the smaller index.

template <typename T>
struct Candidate {
  T value;
  int64_t index;
};

template <typename T>
__device__ __forceinline__ Candidate<T> better(Candidate<T> a, Candidate<T> b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

constexpr int kArgmaxThreads = 256;

template <typename T>
__global__ void argmax_last_kernel(int64_t cols, const T* in, int64_t* out) {
  __shared__ Candidate<T> shared[kArgmaxThreads];
  const T* row = in + int64_t(blockIdx.x) * cols;
  Candidate<T> best{T(0), -1};
  for (int64_t c = threadIdx.x; c < cols; c += kArgmaxThreads) {
    const T v = row[c];
    if (v == v && (best.index < 0 || v > best.value)) best = {v, c};
  }
  shared[threadIdx.x] = best;
  __syncthreads();
  for (int width = kArgmaxThreads / 2; width > 0; width /= 2) {
    if (int(threadIdx.x) < width) shared[threadIdx.x] = better(shared[threadIdx.x], shared[threadIdx.x + width]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const Candidate<T> winner = shared[0];
    out[blockIdx.x] = (row[0] != row[0] || winner.index < 0) ? 0 : winner.index;
  }
}

}  // namespace

size_t reduce_scratch_bytes(const LaunchContext& ctx, DType dtype, const ReduceLayout& layout) {
  const ReducePlan p = plan(ctx, layout);
  return p.slices > 1 ? size_t(p.slices * layout.outputs) * (dtype == DType::F64 ? 8 : 4) : 0;
}

cudaError_t launch_reduce(const LaunchContext& ctx, ReduceOp op, DType dtype, const ReduceLayout& layout, void* out,
                          const void* in, void* scratch) {
  if (layout.outputs == 0 || layout.block == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch_floating(dtype, [&](auto zero) {
    using T = decltype(zero);
    const T* x = static_cast<const T*>(in);
    T* y = static_cast<T*>(out);
    T* partial = static_cast<T*>(scratch);
    if (op == ReduceOp::Sum) status = run_reduce(ctx, layout, SumOp{}, T(0), x, y, partial);
    else status = run_reduce(ctx, layout, MaxKeepNan{}, T(-INFINITY), x, y, partial);
  });
  return status;
}

cudaError_t launch_argmax_last(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols, int64_t* out,
                               const void* in) {
  if (rows == 0) return cudaSuccess;
  if (rows > int64_t(INT32_MAX)) return cudaErrorInvalidValue;
  dispatch_floating(dtype, [&](auto zero) {
    using T = decltype(zero);
    argmax_last_kernel<T><<<unsigned(rows), kArgmaxThreads, 0, ctx.stream>>>(cols, static_cast<const T*>(in), out);
  });
  return cudaGetLastError();
}

}  // namespace engine::cuda
