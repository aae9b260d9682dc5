// CUDA softmax / log-softmax over the last dim, and cross-entropy fused with
// log-softmax; the formulas of engine/cpu/cpu_nn.cpp. Rows up to 1024 wide
// get one warp each (attention-sized and classifier rows); wider rows (the
// 50257-word vocabulary) get a block of 512 threads each. Every row is
// stable: its max is subtracted before exp. Sums of exponentials run in the
// tensor's type in trees (the CPU sums in double): f32 agrees to a few ulps.
#include "engine/cuda/common.cuh"

namespace engine::cuda {

namespace {

constexpr int kWideThreads = 512;   // threads per row for rows wider than 1024
constexpr int64_t kWarpRowMax = 1024;

// The threads that share one row: a warp (Group = 32) or the whole block.
template <int Group>
struct RowGroup {
  int64_t row;
  int thread;  // this thread's index within the group

  __device__ RowGroup() {
    if constexpr (Group == 32) {
      row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
      thread = threadIdx.x % 32;
    } else {
      row = blockIdx.x;
      thread = threadIdx.x;
    }
  }

  template <typename T, typename Op>
  __device__ T reduce(T v, Op op, T identity) const {
    if constexpr (Group == 32) {
      return warp_reduce(v, op);
    } else {
      __shared__ T shared[32];
      return block_reduce(v, op, identity, shared);
    }
  }
};

template <typename T, int Group>
__global__ void softmax_forward_kernel(int64_t rows, int64_t cols, T* y, const T* x, bool log) {
  const RowGroup<Group> g;
  if (g.row >= rows) return;  // only whole warps leave: a block-wide group always has its row
  const T* xr = x + g.row * cols;
  T* yr = y + g.row * cols;
  T row_max = T(-INFINITY);
  for (int64_t c = g.thread; c < cols; c += Group) row_max = MaxOp{}(row_max, xr[c]);
  row_max = g.reduce(row_max, MaxOp{}, T(-INFINITY));
  T sum = 0;
  for (int64_t c = g.thread; c < cols; c += Group) {
    const T e = math_exp(xr[c] - row_max);
    yr[c] = e;
    sum += e;
  }
  sum = g.reduce(sum, SumOp{}, T(0));
  if (log) {
    // (x - max) - log(sum): for logits in the thousands, x - (max + log(sum)) rounds the log away.
    const T log_sum = math_log(sum);
    for (int64_t c = g.thread; c < cols; c += Group) yr[c] = (xr[c] - row_max) - log_sum;
  } else {
    const T inverse = T(1) / sum;
    for (int64_t c = g.thread; c < cols; c += Group) yr[c] *= inverse;  // this thread's own writes above
  }
}

// softmax: dx = y * (dy - sum(dy * y));  log_softmax: dx = dy - exp(y) * sum(dy).
template <typename T, int Group>
__global__ void softmax_backward_kernel(int64_t rows, int64_t cols, T* dx, const T* dy, const T* y, bool log) {
  const RowGroup<Group> g;
  if (g.row >= rows) return;
  const T *yr = y + g.row * cols, *dyr = dy + g.row * cols;
  T* dxr = dx + g.row * cols;
  T dot = 0;
  for (int64_t c = g.thread; c < cols; c += Group) dot += log ? dyr[c] : dyr[c] * yr[c];
  dot = g.reduce(dot, SumOp{}, T(0));
  for (int64_t c = g.thread; c < cols; c += Group)
    dxr[c] = log ? dyr[c] - math_exp(yr[c]) * dot : yr[c] * (dyr[c] - dot);
}

// loss = lse - logits[target] (0 for ignore_index), lse = max + log(sum(exp(x - max))).
template <typename T, typename I, int Group>
__global__ void cross_entropy_forward_kernel(int64_t rows, int64_t cols, T* loss, T* lse, const T* logits,
                                             const I* targets, int64_t ignore_index) {
  const RowGroup<Group> g;
  if (g.row >= rows) return;
  const T* xr = logits + g.row * cols;
  T row_max = T(-INFINITY);
  for (int64_t c = g.thread; c < cols; c += Group) row_max = MaxOp{}(row_max, xr[c]);
  row_max = g.reduce(row_max, MaxOp{}, T(-INFINITY));
  T sum = 0;
  for (int64_t c = g.thread; c < cols; c += Group) sum += math_exp(xr[c] - row_max);
  sum = g.reduce(sum, SumOp{}, T(0));
  if (g.thread == 0) {
    const T log_sum = math_log(sum);
    const int64_t target = int64_t(targets[g.row]);
    lse[g.row] = row_max + log_sum;
    loss[g.row] = target == ignore_index ? T(0) : (row_max - xr[target]) + log_sum;  // as in log_softmax
  }
}

// dlogits = dloss * (exp(x - lse) - onehot(target)); ignored rows get zeros.
template <typename T, typename I, int Group>
__global__ void cross_entropy_backward_kernel(int64_t rows, int64_t cols, T* dlogits, const T* dloss, const T* logits,
                                              const T* lse, const I* targets, int64_t ignore_index) {
  const RowGroup<Group> g;
  if (g.row >= rows) return;
  const T* xr = logits + g.row * cols;
  T* dr = dlogits + g.row * cols;
  const int64_t target = int64_t(targets[g.row]);
  const bool ignored = target == ignore_index;
  const T scale = dloss[g.row], row_lse = lse[g.row];
  for (int64_t c = g.thread; c < cols; c += Group) {
    T d = ignored ? T(0) : scale * math_exp(xr[c] - row_lse);
    if (!ignored && c == target) d -= scale;
    dr[c] = d;
  }
}

// Launches kernel<Group> with the row mapping that fits `cols`.
template <typename Launch>
void by_row_width(int64_t rows, int64_t cols, Launch&& launch) {
  if (cols <= kWarpRowMax) {
    const int64_t rows_per_block = kThreads / 32;
    launch(std::integral_constant<int, 32>{}, unsigned((rows + rows_per_block - 1) / rows_per_block), kThreads);
  } else {
    launch(std::integral_constant<int, kWideThreads>{}, unsigned(rows), kWideThreads);
  }
}

}  // namespace

cudaError_t launch_softmax_forward(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols, void* y,
                                   const void* x, bool log) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  dispatch_floating(dtype, [&](auto zero) {
    using T = decltype(zero);
    by_row_width(rows, cols, [&](auto group, unsigned blocks, int threads) {
      softmax_forward_kernel<T, decltype(group)::value><<<blocks, threads, 0, ctx.stream>>>(
          rows, cols, static_cast<T*>(y), static_cast<const T*>(x), log);
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_softmax_backward(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols, void* dx,
                                    const void* dy, const void* y, bool log) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  dispatch_floating(dtype, [&](auto zero) {
    using T = decltype(zero);
    by_row_width(rows, cols, [&](auto group, unsigned blocks, int threads) {
      softmax_backward_kernel<T, decltype(group)::value><<<blocks, threads, 0, ctx.stream>>>(
          rows, cols, static_cast<T*>(dx), static_cast<const T*>(dy), static_cast<const T*>(y), log);
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_cross_entropy_forward(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols,
                                         void* loss, void* lse, const void* logits, const void* targets,
                                         DType target_dtype, int64_t ignore_index) {
  if (rows == 0) return cudaSuccess;
  dispatch_floating(dtype, [&](auto zero) {
    using T = decltype(zero);
    dispatch_index(target_dtype, [&](auto izero) {
      using I = decltype(izero);
      by_row_width(rows, cols, [&](auto group, unsigned blocks, int threads) {
        cross_entropy_forward_kernel<T, I, decltype(group)::value><<<blocks, threads, 0, ctx.stream>>>(
            rows, cols, static_cast<T*>(loss), static_cast<T*>(lse), static_cast<const T*>(logits),
            static_cast<const I*>(targets), ignore_index);
      });
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_cross_entropy_backward(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols,
                                          void* dlogits, const void* dloss, const void* logits, const void* lse,
                                          const void* targets, DType target_dtype, int64_t ignore_index) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  dispatch_floating(dtype, [&](auto zero) {
    using T = decltype(zero);
    dispatch_index(target_dtype, [&](auto izero) {
      using I = decltype(izero);
      by_row_width(rows, cols, [&](auto group, unsigned blocks, int threads) {
        cross_entropy_backward_kernel<T, I, decltype(group)::value><<<blocks, threads, 0, ctx.stream>>>(
            rows, cols, static_cast<T*>(dlogits), static_cast<const T*>(dloss), static_cast<const T*>(logits),
            static_cast<const T*>(lse), static_cast<const I*>(targets), ignore_index);
      });
    });
  });
  return cudaGetLastError();
}

}  // namespace engine::cuda
