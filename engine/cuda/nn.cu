// CUDA kernels of the fused nn ops: index validation, row gather and
// scatter-add (embedding, index_select), layer norm (also with the dropout
// and residual add before it, both ways) and gelu_new. Same
// formulas as engine/cpu/cpu_nn.cpp; sums run in the tensor's type (f32 or
// f64, as the CPU's layer norm does) but in warp trees, so f32 results agree
// with the CPU to a few ulps rather than bit for bit.
#include "engine/cuda/common.cuh"
#include "engine/rng.h"

namespace engine::cuda {

namespace {

// ---- index validation ----
// Kernels cannot throw, so the host runs this before any kernel that trusts
// its indices, reads the flag back and raises engine::Error naming the position.

template <typename I>
__global__ void find_bad_index_kernel(const I* index, int64_t n, int64_t rows, bool has_ignore, int64_t ignore,
                                      unsigned long long* first_bad) {
  for (int64_t i = grid_index(); i < n; i += grid_stride()) {
    const int64_t id = int64_t(index[i]);
    if (!(has_ignore && id == ignore) && (id < 0 || id >= rows)) atomicMin(first_bad, (unsigned long long)i);
  }
}

// ---- gather and scatter-add of rows ----

// Copies rows as units of sizeof(Unit) bytes (16 when sizes and pointers allow).
template <typename Unit, typename I>
__global__ void index_select_kernel(int64_t n, int64_t units_per_row, Unit* out, const Unit* table, const I* index) {
  const int64_t total = n * units_per_row;
  for (int64_t e = grid_index(); e < total; e += grid_stride()) {
    const int64_t row = e / units_per_row, unit = e - row * units_per_row;
    out[e] = table[int64_t(index[row]) * units_per_row + unit];
  }
}

template <typename T, typename I>
__global__ void index_add_kernel(int64_t n, int64_t cols, T* table, const I* index, const T* grad) {
  const int64_t total = n * cols;
  for (int64_t e = grid_index(); e < total; e += grid_stride()) {
    const int64_t row = e / cols, col = e - row * cols;
    atomicAdd(table + int64_t(index[row]) * cols + col, grad[e]);
  }
}

// ---- layer norm ----
// One warp per row. The variance is taken about the mean in a second pass
// over the row (from L1 by then), as the CPU does, to avoid cancellation.

constexpr int kRowsPerBlock = kThreads / 32;

__device__ __forceinline__ int64_t warp_row() { return int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32; }

inline unsigned row_blocks(int64_t rows) { return unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock); }

// Y: the output's storage, T or (for f32) bf16, rounded once.
template <typename T, typename Y>
__global__ void layer_norm_forward_kernel(int64_t rows, int64_t cols, Y* y, int64_t y_ld, T* mean, T* rstd,
                                          const T* x, const T* weight, const T* bias, T eps) {
  const int64_t row = warp_row();
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* xr = x + row * cols;
  Y* yr = y + row * y_ld;
  T sum = 0;
  for (int64_t c = lane; c < cols; c += 32) sum += xr[c];
  const T mu = warp_reduce(sum, SumOp{}) / T(cols);
  T squares = 0;
  for (int64_t c = lane; c < cols; c += 32) squares += (xr[c] - mu) * (xr[c] - mu);
  const T rs = T(1) / math_sqrt(warp_reduce(squares, SumOp{}) / T(cols) + eps);  // biased variance, as torch
  for (int64_t c = lane; c < cols; c += 32) yr[c] = convert<Y>((xr[c] - mu) * rs * weight[c] + bias[c]);
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight, xhat = (x - mean) * rstd.
// G: dy's storage, as Y of the forward.
template <typename T, typename G>
__global__ void layer_norm_backward_input_kernel(int64_t rows, int64_t cols, T* dx, const G* dy, const T* x,
                                                 const T* weight, const T* mean, const T* rstd, const T* residual) {
  const int64_t row = warp_row();
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* xr = x + row * cols;
  const G* dyr = dy + row * cols;
  T* dxr = dx + row * cols;
  const T mu = mean[row], rs = rstd[row];
  T sum_g = 0, sum_g_xhat = 0;
  for (int64_t c = lane; c < cols; c += 32) {
    const T g = convert<T>(dyr[c]) * weight[c];
    sum_g += g;
    sum_g_xhat += g * (xr[c] - mu) * rs;
  }
  const T mean_g = warp_reduce(sum_g, SumOp{}) / T(cols);
  const T mean_g_xhat = warp_reduce(sum_g_xhat, SumOp{}) / T(cols);
  for (int64_t c = lane; c < cols; c += 32) {
    const T d = product_rn(rs, convert<T>(dyr[c]) * weight[c] - mean_g - (xr[c] - mu) * rs * mean_g_xhat);
    dxr[c] = residual ? residual[row * cols + c] + d : d;
  }
}

// ---- layer norm with the row in registers ----
// For f32 rows of up to 2048 columns in packs of four on 16-byte boundaries
// (GPT-2's widths): each lane loads its packs (lane, lane + 32, ...) once,
// all loads in flight together, and keeps them in registers for both passes
// of the statistics and for the output; the loop above reloads the row three
// times, one element at a time. kPacks per lane covers 128 kPacks columns.

// Calls fn(std::integral_constant<int, K>{}) for the first K of a few widths
// with 32 K >= packs, so that a row takes few more registers than it needs;
// false when the row is wider than all of them.
template <typename Fn>
bool with_packs_per_lane(int64_t packs, Fn&& fn) {
  return [&]<int... K>(std::integer_sequence<int, K...>) {
    return ((packs <= 32 * K ? (fn(std::integral_constant<int, K>{}), true) : false) || ...);
  }(std::integer_sequence<int, 2, 4, 6, 8, 10, 12, 16>{});
}

// Where the rows kernel's input comes from, pack by pack (index into the
// whole [rows, cols] matrix): x itself ...
struct PacksOf {
  const float* x;
  __device__ Pack4<float> operator()(int64_t pack) const { return reinterpret_cast<const Pack4<float>*>(x)[pack]; }
};

// The dropout kernel's terms (engine/cuda/random.cu) for elements 4 pack ..
// 4 pack + 3 of a contiguous tensor: one Philox block, the same test and the
// same rounded product, so a layer norm kernel that drops on the way in or
// out keeps exactly the values the dropout kernel would.
struct DropoutTerms {
  uint32_t keep_from;
  float scale;
  uint64_t seed, offset;
  __device__ Pack4<float> dropped(int64_t pack, const Pack4<float>& v) const {
    const Philox4 block = philox4x32_10(seed, offset + uint64_t(pack));
    Pack4<float> out;
#pragma unroll
    for (int k = 0; k < 4; ++k) out.v[k] = block.v[k] >> 8 >= keep_from ? product_rn(v.v[k], scale) : 0.f;
    return out;
  }
};

DropoutTerms dropout_terms(double p, uint64_t seed, uint64_t offset) {
  return {uniform_threshold(p, 24), float(1.0 / (1.0 - p)), seed, offset};
}

// ... or r = residual + dropout(in), which it also writes out.
template <typename In>
struct PacksOfDropoutAdd {
  float* r;
  const In* in;
  const float* residual;
  DropoutTerms dropout;
  __device__ Pack4<float> operator()(int64_t pack) const {
    const Pack4<In> x = reinterpret_cast<const Pack4<In>*>(in)[pack];
    Pack4<float> wide;
#pragma unroll
    for (int k = 0; k < 4; ++k) wide.v[k] = convert<float>(x.v[k]);
    const Pack4<float> d = dropout.dropped(pack, wide);
    Pack4<float> sum = reinterpret_cast<const Pack4<float>*>(residual)[pack];
#pragma unroll
    for (int k = 0; k < 4; ++k) sum.v[k] += d.v[k];
    reinterpret_cast<Pack4<float>*>(r)[pack] = sum;
    return sum;
  }
};

template <int kPacks, typename Y, typename Source>
__global__ void layer_norm_forward_rows_kernel(int64_t rows, int64_t packs, Y* y, int64_t y_ld, float* mean,
                                               float* rstd, Source x, const float* weight, const float* bias,
                                               float eps) {
  const int64_t row = warp_row();
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  Pack4<float> v[kPacks];
  float sum = 0;
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
    v[i] = lane + 32 * i < packs ? x(row * packs + lane + 32 * i) : Pack4<float>{};
    for (float e : v[i].v) sum += e;
  }
  const float cols = float(packs * 4);
  const float mu = warp_reduce(sum, SumOp{}) / cols;
  float squares = 0;
#pragma unroll
  for (int i = 0; i < kPacks; ++i)
    if (lane + 32 * i < packs)
      for (float e : v[i].v) squares += (e - mu) * (e - mu);
  const float rs = 1.0f / sqrtf(warp_reduce(squares, SumOp{}) / cols + eps);  // biased variance, as torch
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
    const int64_t p = lane + 32 * i;
    if (p >= packs) continue;
    const Pack4<float> w = reinterpret_cast<const Pack4<float>*>(weight)[p];
    const Pack4<float> b = reinterpret_cast<const Pack4<float>*>(bias)[p];
    Pack4<Y> out;
    for (int k = 0; k < 4; ++k) out.v[k] = convert<Y>((v[i].v[k] - mu) * rs * w.v[k] + b.v[k]);
    reinterpret_cast<Pack4<Y>*>(y + row * y_ld)[p] = out;
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// Keeps only x in registers: the second pass reads dy again (from L2, where
// the first pass has just brought it) and recomputes g and xhat, which
// leaves room for twice the warps that keeping g and xhat allowed.
// Where the backward rows kernel's dx packs go: dx itself ...
struct PacksInto {
  float* dx;
  __device__ void operator()(int64_t pack, const Pack4<float>& v) const {
    reinterpret_cast<Pack4<float>*>(dx)[pack] = v;
  }
};

// ... and dropout(dx) into `dropped` as well: the gradient that the
// dropout_add which made x hands its own input (ops/dropout.cpp).
template <typename Out>
struct PacksIntoAndDropped {
  float* dx;
  Out* dropped;
  DropoutTerms dropout;
  __device__ void operator()(int64_t pack, const Pack4<float>& v) const {
    reinterpret_cast<Pack4<float>*>(dx)[pack] = v;
    const Pack4<float> d = dropout.dropped(pack, v);
    Pack4<Out> out;
#pragma unroll
    for (int k = 0; k < 4; ++k) out.v[k] = convert<Out>(d.v[k]);
    reinterpret_cast<Pack4<Out>*>(dropped)[pack] = out;
  }
};

template <int kPacks, typename G, typename Sink>
__global__ void layer_norm_backward_rows_kernel(int64_t rows, int64_t packs, Sink dx, const G* dy, const float* x,
                                                const float* weight, const float* mean, const float* rstd,
                                                const float* residual) {
  const int64_t row = warp_row();
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float mu = mean[row], rs = rstd[row];
  const auto* w = reinterpret_cast<const Pack4<float>*>(weight);
  const auto* dy_row = reinterpret_cast<const Pack4<G>*>(dy) + row * packs;
  Pack4<float> xv[kPacks];
  float sum_g = 0, sum_g_xhat = 0;
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
    const int64_t p = lane + 32 * i;
    if (p >= packs) continue;
    xv[i] = reinterpret_cast<const Pack4<float>*>(x)[row * packs + p];
    const Pack4<G> dv = dy_row[p];
    const Pack4<float> wv = w[p];
    for (int k = 0; k < 4; ++k) {
      const float g = convert<float>(dv.v[k]) * wv.v[k];
      sum_g += g;
      sum_g_xhat += g * ((xv[i].v[k] - mu) * rs);
    }
  }
  const float cols = float(packs * 4);
  const float mean_g = warp_reduce(sum_g, SumOp{}) / cols;
  const float mean_g_xhat = warp_reduce(sum_g_xhat, SumOp{}) / cols;
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
    const int64_t p = lane + 32 * i;
    if (p >= packs) continue;
    Pack4<float> out = residual ? reinterpret_cast<const Pack4<float>*>(residual)[row * packs + p] : Pack4<float>{};
    const Pack4<G> dv = dy_row[p];
    const Pack4<float> wv = w[p];
    for (int k = 0; k < 4; ++k) {
      const float g = convert<float>(dv.v[k]) * wv.v[k], xhat = (xv[i].v[k] - mu) * rs;
      const float d = product_rn(rs, g - mean_g - xhat * mean_g_xhat);
      out.v[k] = residual ? out.v[k] + d : d;
    }
    dx(row * packs + p, out);
  }
}

// dweight[c] = sum_r dy * xhat, dbias[c] = sum_r dy: column sums, laid out as
// the reductions' "columns" mapping (32 columns x 8 rows per block). Row
// slices (blockIdx.y) write partials that a second kernel adds in order.
constexpr int kParamColumns = 32, kParamRows = 8;

struct ParamsPlan {
  int64_t slices = 1, chunk = 0;
};

ParamsPlan params_plan(const LaunchContext& ctx, int64_t rows, int64_t cols) {
  const int64_t column_blocks = (cols + kParamColumns - 1) / kParamColumns;
  const int64_t target_blocks = int64_t(ctx.sm_count) * 4;
  const int64_t max_slices = std::max<int64_t>(1, rows / (16 * kParamRows));  // >= 16 rows per thread
  ParamsPlan p;
  p.slices = std::clamp<int64_t>((target_blocks + column_blocks - 1) / column_blocks, 1, max_slices);
  p.chunk = (rows + p.slices - 1) / p.slices;
  p.slices = (rows + p.chunk - 1) / p.chunk;
  return p;
}

template <typename T, typename G>
__global__ void layer_norm_params_kernel(int64_t rows, int64_t cols, int64_t chunk, T* dweight, T* dbias,
                                         const G* dy, const T* x, const T* mean, const T* rstd) {
  __shared__ T shared_w[kParamRows][kParamColumns + 1], shared_b[kParamRows][kParamColumns + 1];
  const int64_t c = int64_t(blockIdx.x) * kParamColumns + threadIdx.x;
  const int64_t slice = blockIdx.y, begin = slice * chunk, end = min64(rows, begin + chunk);
  T dw = 0, db = 0;
  if (c < cols) {
    for (int64_t r = begin + threadIdx.y; r < end; r += kParamRows) {
      const T g = convert<T>(dy[r * cols + c]);
      if (dweight) dw += g * (x[r * cols + c] - mean[r]) * rstd[r];
      db += g;
    }
  }
  shared_w[threadIdx.y][threadIdx.x] = dw;
  shared_b[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y != 0 || c >= cols) return;
  for (int y = 1; y < kParamRows; ++y) {
    dw += shared_w[y][threadIdx.x];
    db += shared_b[y][threadIdx.x];
  }
  // With one slice these are the outputs; otherwise row `slice` of the partials.
  if (dweight) dweight[slice * cols + c] = dw;
  if (dbias) dbias[slice * cols + c] = db;
}

template <typename T>
__global__ void sum_slices_kernel(int64_t slices, int64_t cols, const T* partial, T* out) {
  for (int64_t c = grid_index(); c < cols; c += grid_stride()) {
    T acc = 0;
    for (int64_t s = 0; s < slices; ++s) acc += partial[s * cols + c];
    out[c] = acc;
  }
}

// Calls fn(T{}, S{}): T the compute type of `dtype`, S the storage of layer
// norm's output (or its gradient), T itself or, for f32 with `bf16`, bf16.
template <typename Fn>
void dispatch_layer_norm(DType dtype, bool bf16, Fn&& fn) {
  dispatch_floating(dtype, [&](auto zero) {
    using T = decltype(zero);
    if constexpr (std::is_same_v<T, float>)
      if (bf16) return fn(T{}, __nv_bfloat16{});
    fn(T{}, T{});
  });
}

// ---- gelu_new ----
// 0.5 x (1 + tanh(u)) computed as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3),
// as the CPU computes it; derivative s + x s (1 - s) 2u'.

constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kGeluCubic = 0.044715;

template <typename C>
__device__ __forceinline__ C gelu_value(C v) {
  const C two_u = C(2 * kSqrt2OverPi) * (v + C(kGeluCubic) * v * v * v);
  return v / (C(1) + math_exp(-two_u));
}

template <typename C>
__device__ __forceinline__ C gelu_slope(C v) {
  const C two_u = C(2 * kSqrt2OverPi) * (v + C(kGeluCubic) * v * v * v);
  const C two_du = C(2 * kSqrt2OverPi) * (C(1) + C(3 * kGeluCubic) * v * v);
  const C s = C(1) / (C(1) + math_exp(-two_u));
  return s + v * s * (C(1) - s) * two_du;
}

// y = gelu(x), or with dy given, dx = dy * gelu'(x): the first `packs` groups
// of four elements by one load and store each, the rest one at a time.
template <typename T>
__global__ void gelu_kernel(int64_t n, int64_t packs, T* out, const T* dy, const T* x) {
  using C = compute_t<T>;
  auto at = [&](C v, C g) { return convert<T>(dy ? g * gelu_slope(v) : gelu_value(v)); };
  for (int64_t p = grid_index(); p < packs; p += grid_stride()) {
    const Pack4<T> xv = reinterpret_cast<const Pack4<T>*>(x)[p];
    const Pack4<T> gv = dy ? reinterpret_cast<const Pack4<T>*>(dy)[p] : xv;
    Pack4<T> r;
#pragma unroll
    for (int k = 0; k < 4; ++k) r.v[k] = at(convert<C>(xv.v[k]), convert<C>(gv.v[k]));
    reinterpret_cast<Pack4<T>*>(out)[p] = r;
  }
  for (int64_t i = 4 * packs + grid_index(); i < n; i += grid_stride())
    out[i] = at(convert<C>(x[i]), dy ? convert<C>(dy[i]) : C(0));
}

template <typename T>
cudaError_t launch_gelu(const LaunchContext& ctx, int64_t n, void* out, const void* dy, const void* x) {
  T* o = static_cast<T*>(out);
  const T *g = static_cast<const T*>(dy), *v = static_cast<const T*>(x);
  const bool aligned = pack_aligned(o) && pack_aligned(v) && (!g || pack_aligned(g));
  const int64_t packs = aligned ? n / 4 : 0;
  gelu_kernel<<<grid_for(ctx, std::max<int64_t>(packs, n - 4 * packs)), kThreads, 0, ctx.stream>>>(n, packs, o, g, v);
  return cudaGetLastError();
}

}  // namespace

// ---- launchers ----

cudaError_t launch_find_bad_index(const LaunchContext& ctx, const void* index, DType index_dtype, int64_t n,
                                  int64_t rows, bool has_ignore, int64_t ignore, unsigned long long* first_bad) {
  if (n == 0) return cudaSuccess;
  dispatch_index(index_dtype, [&](auto zero) {
    using I = decltype(zero);
    find_bad_index_kernel<<<grid_for(ctx, n), kThreads, 0, ctx.stream>>>(static_cast<const I*>(index), n, rows,
                                                                          has_ignore, ignore, first_bad);
  });
  return cudaGetLastError();
}

cudaError_t launch_index_select_rows(const LaunchContext& ctx, int64_t n, size_t row_bytes, void* out,
                                     const void* table, const void* index, DType index_dtype) {
  if (n == 0 || row_bytes == 0) return cudaSuccess;
  // The widest unit that divides the row and both base addresses.
  size_t unit = 16;
  while (unit > 1 && (row_bytes % unit || reinterpret_cast<uintptr_t>(out) % unit ||
                      reinterpret_cast<uintptr_t>(table) % unit))
    unit /= 2;
  const int64_t units = int64_t(row_bytes / unit);
  dispatch_index(index_dtype, [&](auto zero) {
    using I = decltype(zero);
    const I* ids = static_cast<const I*>(index);
    const unsigned grid = grid_for(ctx, n * units);
    auto run = [&](auto unit_zero) {
      using U = decltype(unit_zero);
      index_select_kernel<<<grid, kThreads, 0, ctx.stream>>>(n, units, static_cast<U*>(out),
                                                             static_cast<const U*>(table), ids);
    };
    switch (unit) {
      case 16: run(uint4{}); break;
      case 8: run(uint2{}); break;
      case 4: run(uint32_t{}); break;
      case 2: run(uint16_t{}); break;
      default: run(uint8_t{}); break;
    }
  });
  return cudaGetLastError();
}

cudaError_t launch_index_add_rows(const LaunchContext& ctx, DType dtype, int64_t n, int64_t cols, void* table,
                                  const void* index, DType index_dtype, const void* grad) {
  if (n == 0 || cols == 0) return cudaSuccess;
  dispatch_floating(dtype, [&](auto zero) {
    using T = decltype(zero);
    dispatch_index(index_dtype, [&](auto izero) {
      using I = decltype(izero);
      index_add_kernel<<<grid_for(ctx, n * cols), kThreads, 0, ctx.stream>>>(
          n, cols, static_cast<T*>(table), static_cast<const I*>(index), static_cast<const T*>(grad));
    });
  });
  return cudaGetLastError();
}

namespace {

// The rows-in-registers kernels' terms for f32 rows: four-column packs, every
// pointer on a 16-byte boundary.
bool rows_fit_registers(int64_t cols, std::initializer_list<const void*> pointers) {
  if (cols % 4 != 0) return false;
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace

cudaError_t launch_layer_norm_forward(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols, void* y,
                                      int64_t y_ld, bool y_bf16, void* mean, void* rstd, const void* x,
                                      const void* weight, const void* bias, double eps) {
  if (rows == 0) return cudaSuccess;
  dispatch_layer_norm(dtype, y_bf16, [&](auto zero, auto y_zero) {
    using T = decltype(zero);
    using Y = decltype(y_zero);
    if constexpr (std::is_same_v<T, float>) {
      const bool fits = rows_fit_registers(cols, {y, x, weight, bias}) && y_ld % 4 == 0 &&
                        with_packs_per_lane(cols / 4, [&](auto packs) {
                          layer_norm_forward_rows_kernel<packs()><<<row_blocks(rows), kThreads, 0, ctx.stream>>>(
                              rows, cols / 4, static_cast<Y*>(y), y_ld, static_cast<float*>(mean),
                              static_cast<float*>(rstd), PacksOf{static_cast<const float*>(x)},
                              static_cast<const float*>(weight), static_cast<const float*>(bias), float(eps));
                        });
      if (fits) return;
    }
    layer_norm_forward_kernel<<<row_blocks(rows), kThreads, 0, ctx.stream>>>(
        rows, cols, static_cast<Y*>(y), y_ld, static_cast<T*>(mean), static_cast<T*>(rstd), static_cast<const T*>(x),
        static_cast<const T*>(weight), static_cast<const T*>(bias), T(eps));
  });
  return cudaGetLastError();
}

bool layer_norm_rows_fit(int64_t cols, std::initializer_list<const void*> pointers) {
  return rows_fit_registers(cols, pointers) && with_packs_per_lane(cols / 4, [](auto) {});
}

cudaError_t launch_dropout_add_layer_norm(const LaunchContext& ctx, DType in_dtype, int64_t rows, int64_t cols,
                                          void* r, const void* in, const void* residual, double p, uint64_t seed,
                                          uint64_t offset, void* y, int64_t y_ld, bool y_bf16, void* mean,
                                          void* rstd, const void* weight, const void* bias, double eps) {
  if (rows == 0) return cudaSuccess;
  const bool in_fits = in_dtype == DType::F32 || in_dtype == DType::BF16;
  if (!in_fits || !layer_norm_rows_fit(cols, {r, in, residual, y, weight, bias}) || y_ld % 4 != 0)
    return cudaErrorInvalidValue;
  auto launch = [&](auto in_zero, auto y_zero) {
    using In = decltype(in_zero);
    using Y = decltype(y_zero);
    const PacksOfDropoutAdd<In> source{static_cast<float*>(r), static_cast<const In*>(in),
                                       static_cast<const float*>(residual), dropout_terms(p, seed, offset)};
    return with_packs_per_lane(cols / 4, [&](auto packs) {
      layer_norm_forward_rows_kernel<packs()><<<row_blocks(rows), kThreads, 0, ctx.stream>>>(
          rows, cols / 4, static_cast<Y*>(y), y_ld, static_cast<float*>(mean), static_cast<float*>(rstd), source,
          static_cast<const float*>(weight), static_cast<const float*>(bias), float(eps));
    });
  };
  if (in_dtype == DType::BF16) y_bf16 ? launch(__nv_bfloat16{}, __nv_bfloat16{}) : launch(__nv_bfloat16{}, float{});
  else y_bf16 ? launch(float{}, __nv_bfloat16{}) : launch(float{}, float{});
  return cudaGetLastError();
}

cudaError_t launch_layer_norm_backward_input(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols,
                                             void* dx, const void* dy, bool dy_bf16, const void* x,
                                             const void* weight, const void* mean, const void* rstd,
                                             const void* residual) {
  if (rows == 0) return cudaSuccess;
  dispatch_layer_norm(dtype, dy_bf16, [&](auto zero, auto g_zero) {
    using T = decltype(zero);
    using G = decltype(g_zero);
    if constexpr (std::is_same_v<T, float>) {
      const bool fits = rows_fit_registers(cols, {dx, dy, x, weight, residual}) &&
                        with_packs_per_lane(cols / 4, [&](auto packs) {
                          layer_norm_backward_rows_kernel<packs()><<<row_blocks(rows), kThreads, 0, ctx.stream>>>(
                              rows, cols / 4, PacksInto{static_cast<float*>(dx)}, static_cast<const G*>(dy),
                              static_cast<const float*>(x), static_cast<const float*>(weight),
                              static_cast<const float*>(mean), static_cast<const float*>(rstd),
                              static_cast<const float*>(residual));
                        });
      if (fits) return;
    }
    layer_norm_backward_input_kernel<<<row_blocks(rows), kThreads, 0, ctx.stream>>>(
        rows, cols, static_cast<T*>(dx), static_cast<const G*>(dy), static_cast<const T*>(x),
        static_cast<const T*>(weight), static_cast<const T*>(mean), static_cast<const T*>(rstd),
        static_cast<const T*>(residual));
  });
  return cudaGetLastError();
}

cudaError_t launch_layer_norm_backward_dropout(const LaunchContext& ctx, int64_t rows, int64_t cols, void* dx,
                                               const void* dy, bool dy_bf16, const void* x, const void* weight,
                                               const void* mean, const void* rstd, const void* residual,
                                               void* dropped, bool dropped_bf16, double p, uint64_t seed,
                                               uint64_t offset) {
  if (rows == 0) return cudaSuccess;
  if (!layer_norm_rows_fit(cols, {dx, dy, x, weight, residual, dropped})) return cudaErrorInvalidValue;
  auto launch = [&](auto g_zero, auto out_zero) {
    using G = decltype(g_zero);
    using Out = decltype(out_zero);
    const PacksIntoAndDropped<Out> sink{static_cast<float*>(dx), static_cast<Out*>(dropped),
                                        dropout_terms(p, seed, offset)};
    with_packs_per_lane(cols / 4, [&](auto packs) {
      layer_norm_backward_rows_kernel<packs()><<<row_blocks(rows), kThreads, 0, ctx.stream>>>(
          rows, cols / 4, sink, static_cast<const G*>(dy), static_cast<const float*>(x),
          static_cast<const float*>(weight), static_cast<const float*>(mean), static_cast<const float*>(rstd),
          static_cast<const float*>(residual));
    });
  };
  using bf16 = __nv_bfloat16;
  if (dy_bf16) dropped_bf16 ? launch(bf16{}, bf16{}) : launch(bf16{}, float{});
  else dropped_bf16 ? launch(float{}, bf16{}) : launch(float{}, float{});
  return cudaGetLastError();
}

size_t layer_norm_params_scratch_bytes(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols) {
  const ParamsPlan p = params_plan(ctx, rows, cols);
  return p.slices > 1 ? 2 * size_t(p.slices * cols) * (dtype == DType::F64 ? 8 : 4) : 0;
}

cudaError_t launch_layer_norm_backward_params(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols,
                                              void* dweight, void* dbias, const void* dy, bool dy_bf16,
                                              const void* x, const void* mean, const void* rstd, void* scratch) {
  if (cols == 0 || (!dweight && !dbias)) return cudaSuccess;
  const ParamsPlan p = params_plan(ctx, rows, cols);
  dispatch_layer_norm(dtype, dy_bf16, [&](auto zero, auto g_zero) {
    using T = decltype(zero);
    using G = decltype(g_zero);
    T *w_out = static_cast<T*>(dweight), *b_out = static_cast<T*>(dbias);
    // With several slices the kernel writes partials into scratch, [slices, cols] for each output.
    T* w_partial = p.slices > 1 && w_out ? static_cast<T*>(scratch) : w_out;
    T* b_partial = p.slices > 1 && b_out ? static_cast<T*>(scratch) + p.slices * cols : b_out;
    const dim3 grid(unsigned((cols + kParamColumns - 1) / kParamColumns), unsigned(p.slices));
    layer_norm_params_kernel<<<grid, dim3(kParamColumns, kParamRows), 0, ctx.stream>>>(
        rows, cols, p.chunk, w_partial, b_partial, static_cast<const G*>(dy), static_cast<const T*>(x),
        static_cast<const T*>(mean), static_cast<const T*>(rstd));
    if (p.slices > 1) {
      if (w_out) sum_slices_kernel<<<grid_for(ctx, cols), kThreads, 0, ctx.stream>>>(p.slices, cols, w_partial, w_out);
      if (b_out) sum_slices_kernel<<<grid_for(ctx, cols), kThreads, 0, ctx.stream>>>(p.slices, cols, b_partial, b_out);
    }
  });
  return cudaGetLastError();
}

cudaError_t launch_gelu_forward(const LaunchContext& ctx, DType dtype, int64_t n, void* y, const void* x) {
  if (n == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch_floating_or_bf16(dtype, [&](auto zero) { status = launch_gelu<decltype(zero)>(ctx, n, y, nullptr, x); });
  return status;
}

cudaError_t launch_gelu_backward(const LaunchContext& ctx, DType dtype, int64_t n, void* dx, const void* dy,
                                 const void* x) {
  if (n == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch_floating_or_bf16(dtype, [&](auto zero) { status = launch_gelu<decltype(zero)>(ctx, n, dx, dy, x); });
  return status;
}

}  // namespace engine::cuda
