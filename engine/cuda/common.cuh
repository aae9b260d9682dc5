// Device-side helpers the .cu files share: DType -> C++ type dispatch, the
// casts (with the CPU backend's rounding), grid sizing, strided offsets, and
// warp/block reductions. Included only by nvcc.
#pragma once

#include "engine/cuda/kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace engine::cuda {

// ---- dtype dispatch (host side of the .cu files) ----

// Calls fn(T{}) with the CUDA type of `dtype`.
template <typename Fn>
void dispatch_any(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::F32: fn(float{}); return;
    case DType::F64: fn(double{}); return;
    case DType::BF16: fn(__nv_bfloat16{}); return;
    case DType::F16: fn(__half{}); return;
    case DType::I32: fn(int32_t{}); return;
    case DType::I64: fn(int64_t{}); return;
  }
}

// f32 or f64; CudaBackend has already rejected every other dtype.
template <typename Fn>
void dispatch_floating(DType dtype, Fn&& fn) {
  if (dtype == DType::F64) fn(double{});
  else fn(float{});
}

// f32, f64 or bf16 storage (the kernel computes in compute_t of it).
template <typename Fn>
void dispatch_floating_or_bf16(DType dtype, Fn&& fn) {
  if (dtype == DType::BF16) fn(__nv_bfloat16{});
  else dispatch_floating(dtype, fn);
}

// i32 or i64 index tensors.
template <typename Fn>
void dispatch_index(DType dtype, Fn&& fn) {
  if (dtype == DType::I32) fn(int32_t{});
  else fn(int64_t{});
}

// ---- casts, as engine/cpu/cpu_backend.cpp's convert() ----
// f32 <-> bf16/f16 directly (round to nearest even); everything else through
// double, and double -> bf16/f16 through float, exactly as the CPU does.

template <typename T>
__device__ __forceinline__ double to_double(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return double(__bfloat162float(x));
  else if constexpr (std::is_same_v<T, __half>) return double(__half2float(x));
  else return double(x);
}

template <typename To>
__device__ __forceinline__ To from_double(double x) {
  if constexpr (std::is_same_v<To, __nv_bfloat16>) return __float2bfloat16_rn(float(x));
  else if constexpr (std::is_same_v<To, __half>) return __float2half_rn(float(x));
  else return To(x);
}

template <typename To, typename From>
__device__ __forceinline__ To convert(From x) {
  if constexpr (std::is_same_v<To, From>) return x;
  else if constexpr (std::is_same_v<From, float> && std::is_same_v<To, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else if constexpr (std::is_same_v<From, __nv_bfloat16> && std::is_same_v<To, float>) return __bfloat162float(x);
  else if constexpr (std::is_same_v<From, float> && std::is_same_v<To, __half>) return __float2half_rn(x);
  else if constexpr (std::is_same_v<From, __half> && std::is_same_v<To, float>) return __half2float(x);
  else return from_double<To>(to_double(x));
}

// The type a kernel computes in for storage type T: bf16 and f16 values are
// widened to f32 (exactly) and rounded once when stored.
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// std::min is host-only in device code without --expt-relaxed-constexpr.
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ---- math with one name for float and double (libdevice, IEEE-rounded where exact) ----

__device__ __forceinline__ float math_exp(float x) { return expf(x); }
__device__ __forceinline__ double math_exp(double x) { return exp(x); }
__device__ __forceinline__ float math_log(float x) { return logf(x); }
__device__ __forceinline__ double math_log(double x) { return log(x); }
__device__ __forceinline__ float math_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double math_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float math_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double math_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float math_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double math_abs(double x) { return fabs(x); }
__device__ __forceinline__ float math_pow(float x, float y) { return powf(x, y); }
__device__ __forceinline__ double math_pow(double x, double y) { return pow(x, y); }

// x * y rounded on its own, so that nvcc cannot fuse it with an add that
// follows into an FMA: a fused kernel's sum then equals the composed ops' (and
// the CPU's, built with -ffp-contract=off, which makes no FMAs either).
__device__ __forceinline__ float product_rn(float x, float y) { return __fmul_rn(x, y); }
__device__ __forceinline__ double product_rn(double x, double y) { return __dmul_rn(x, y); }

// Four elements that one load or store moves (16 bytes of f32), for kernels
// that walk memory four elements at a time from a suitably aligned pointer.
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename T>
bool pack_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack4<T>) == 0;
}

// ---- launch geometry ----

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n items: enough to fill every
// multiprocessor several times over, never more than the items need.
inline unsigned grid_for(const LaunchContext& ctx, int64_t n, int threads = kThreads) {
  const int64_t needed = (n + threads - 1) / threads;
  const int64_t cap = int64_t(ctx.sm_count) * 32;
  return unsigned(std::max<int64_t>(1, std::min(needed, cap)));
}

// The first index and the stride of a 1-D grid-stride loop.
__device__ __forceinline__ int64_t grid_index() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

// Offsets (in elements) of every operand at linear index `index` of the
// layout's shape, unravelled from the innermost dim outwards; the outermost
// dim takes what is left, so a 1-D layout costs no division. Index is
// uint32_t when the element count allows it: 32-bit division is several
// times cheaper, and this division is most of a strided kernel's work.
template <int N, typename Index>
__device__ __forceinline__ void strided_offsets(const StridedLayout<N>& layout, Index index, int64_t (&offsets)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) offsets[k] = 0;
  for (int d = layout.rank - 1; d >= 0; --d) {
    Index coordinate = index;
    if (d > 0) {
      const Index size = Index(layout.shape[d]);
      coordinate = index % size;
      index /= size;
    }
#pragma unroll
    for (int k = 0; k < N; ++k) offsets[k] += int64_t(coordinate) * layout.strides[k][d];
  }
}

// The offset of element `index` of a row-major shape with the given strides
// (a single operand; the reductions' kept and reduced index spaces).
__device__ __forceinline__ int64_t unravel_offset(int64_t index, int rank, const int64_t* shape,
                                                  const int64_t* strides) {
  int64_t offset = 0;
  for (int d = rank - 1; d > 0; --d) {
    offset += (index % shape[d]) * strides[d];
    index /= shape[d];
  }
  return rank > 0 ? offset + index * strides[0] : 0;
}

// ---- reductions within a warp and a block ----

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
// Like fmax, a NaN operand loses (as in the CPU kernels' std::max loops);
// a NaN input still reaches the result through the exp/sum that follow.
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return (b > a || a != a) ? b : a; }
};

// Combines v over `width` consecutive lanes (a power of two <= 32); every
// lane of the group gets the result.
template <int width = 32, typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Combines v over the whole block (blockDim.x a multiple of 32, at most 1024);
// every thread gets the result. `shared` holds 32 values; the call ends with
// a barrier, so it may be reused at once.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_reduce(v, op);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : identity;
  v = warp_reduce(v, op);
  __syncthreads();
  return v;
}

}  // namespace engine::cuda
