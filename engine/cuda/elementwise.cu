// CUDA copies with dtype casts, fills, and the unary / binary / where maps,
// over any strides (broadcast operands have stride 0). Each op is a small
// functor applied at every element's offsets; one grid-stride kernel walks a
// contiguous layout by a plain index and a strided one by unravelling it.
// The arithmetic is the CPU backend's (cpu_elementwise.cpp), op for op; bf16
// is computed in f32 and rounded once, as the CPU does on f32 copies.
#include "engine/cuda/common.cuh"

#include <cstdint>
#include <optional>

namespace engine::cuda {

namespace {

// ---- the two map kernels ----

template <int N, typename Fn>
__global__ void contiguous_map_kernel(int64_t n, Fn fn) {
  for (int64_t i = grid_index(); i < n; i += grid_stride()) {
    int64_t offsets[N];
#pragma unroll
    for (int k = 0; k < N; ++k) offsets[k] = i;
    fn(offsets);
  }
}

template <int N, typename Index, typename Fn>
__global__ void strided_map_kernel(StridedLayout<N> layout, Fn fn) {
  for (int64_t i = grid_index(); i < layout.numel; i += grid_stride()) {
    int64_t offsets[N];
    strided_offsets(layout, Index(i), offsets);
    fn(offsets);
  }
}

template <int N, typename Fn>
cudaError_t launch_map(const LaunchContext& ctx, const StridedLayout<N>& layout, const Fn& fn) {
  if (layout.numel == 0) return cudaSuccess;
  const unsigned grid = grid_for(ctx, layout.numel);
  if (layout.contiguous)
    contiguous_map_kernel<N><<<grid, kThreads, 0, ctx.stream>>>(layout.numel, fn);
  else if (layout.numel <= int64_t(UINT32_MAX))
    strided_map_kernel<N, uint32_t><<<grid, kThreads, 0, ctx.stream>>>(layout, fn);
  else
    strided_map_kernel<N, uint64_t><<<grid, kThreads, 0, ctx.stream>>>(layout, fn);
  return cudaGetLastError();
}

// ---- copies and binary maps, four elements at a time ----
// When the innermost dim has unit stride for every operand and everything else
// lines up on 4 elements, a thread moves a pack of 4 with one load and one
// store per operand (an f32 -> bf16 cast reads 16 bytes and writes 8), and a
// strided layout unravels its index once per pack. The layout is counted in packs.

template <typename D, typename S, typename Index>
__global__ void copy4_kernel(StridedLayout<2> packs, D* dst, const S* src) {
  for (int64_t i = grid_index(); i < packs.numel; i += grid_stride()) {
    int64_t o[2];
    strided_offsets(packs, Index(i), o);
    const Pack4<S> x = reinterpret_cast<const Pack4<S>*>(src)[o[1]];
    Pack4<D> y;
#pragma unroll
    for (int k = 0; k < 4; ++k) y.v[k] = convert<D>(x.v[k]);
    reinterpret_cast<Pack4<D>*>(dst)[o[0]] = y;
  }
}

// The layout in packs of 4, or nothing when it does not line up (or a pointer is off a pack
// boundary, or the packs are too many for 32-bit indexing). An operand broadcast across rows
// (stride 0 there) packs too; one broadcast along the innermost dim does not.
template <int N>
std::optional<StridedLayout<N>> in_packs(const StridedLayout<N>& layout, bool pointers_aligned) {
  const int inner = layout.rank - 1;
  if (!pointers_aligned || inner < 0 || layout.shape[inner] % 4 != 0 || layout.numel / 4 > int64_t(UINT32_MAX))
    return std::nullopt;
  StridedLayout<N> packs = layout;
  packs.numel = layout.numel / 4;
  packs.shape[inner] /= 4;
  for (int k = 0; k < N; ++k) {
    if (layout.strides[k][inner] != 1) return std::nullopt;
    for (int d = 0; d < inner; ++d) {
      if (layout.strides[k][d] % 4 != 0) return std::nullopt;
      packs.strides[k][d] /= 4;
    }
  }
  return packs;
}

template <typename T>
__device__ __forceinline__ T apply_unary(UnaryOp op, T x, T s) {
  switch (op) {
    case UnaryOp::Neg: return -x;
    case UnaryOp::Exp: return math_exp(x);
    case UnaryOp::Log: return math_log(x);
    case UnaryOp::Sqrt: return math_sqrt(x);
    case UnaryOp::Rsqrt: return T(1) / math_sqrt(x);  // not rsqrtf: the CPU divides, and so must we to agree
    case UnaryOp::Tanh: return math_tanh(x);
    case UnaryOp::Abs: return math_abs(x);
    case UnaryOp::Square: return x * x;
    case UnaryOp::Pow: return math_pow(x, s);
    case UnaryOp::AddScalar: return x + s;
    case UnaryOp::MulScalar: return x * s;
    case UnaryOp::Relu: return x > T(0) ? x : T(0);
    case UnaryOp::Sigmoid: return T(1) / (T(1) + math_exp(-x));
  }
  return x;
}

template <typename T>
__device__ __forceinline__ T apply_binary(BinaryOp op, T a, T b) {
  switch (op) {
    case BinaryOp::Add: return a + b;
    case BinaryOp::Sub: return a - b;
    case BinaryOp::Mul: return a * b;
    case BinaryOp::Div: return a / b;
    case BinaryOp::Maximum: return a >= b ? a : b;
    case BinaryOp::Minimum: return a <= b ? a : b;
    case BinaryOp::Equal: return a == b ? T(1) : T(0);
    case BinaryOp::Greater: return a > b ? T(1) : T(0);
  }
  return a;
}

// A condition element of any dtype as a truth value; +-0 is false in every float type.
template <typename C>
__device__ __forceinline__ bool truth(C c) {
  if constexpr (std::is_same_v<C, __nv_bfloat16>) return (__bfloat16_as_ushort(c) & 0x7fff) != 0;
  else if constexpr (std::is_same_v<C, __half>) return (__half_as_ushort(c) & 0x7fff) != 0;
  else return c != C(0);
}

// Elementwise math in the compute type of T (f32 for bf16 storage), rounded once.
template <typename T>
__device__ __forceinline__ T unary_at(UnaryOp op, T x, compute_t<T> s) {
  return convert<T>(apply_unary(op, convert<compute_t<T>>(x), s));
}
// The operands may be narrower than the result (bf16 into f32): they widen exactly.
template <typename T, typename A, typename B>
__device__ __forceinline__ T binary_at(BinaryOp op, A a, B b) {
  using C = compute_t<T>;
  return convert<T>(apply_binary(op, convert<C>(a), convert<C>(b)));
}

template <typename T, typename A, typename B, typename Index>
__global__ void binary4_kernel(StridedLayout<3> packs, BinaryOp op, T* out, const A* a, const B* b) {
  for (int64_t i = grid_index(); i < packs.numel; i += grid_stride()) {
    int64_t o[3];
    strided_offsets(packs, Index(i), o);
    const Pack4<A> x = reinterpret_cast<const Pack4<A>*>(a)[o[1]];
    const Pack4<B> y = reinterpret_cast<const Pack4<B>*>(b)[o[2]];
    Pack4<T> z;
#pragma unroll
    for (int k = 0; k < 4; ++k) z.v[k] = binary_at<T>(op, x.v[k], y.v[k]);
    reinterpret_cast<Pack4<T>*>(out)[o[0]] = z;  // out may be a or b: each pack is read before it is written
  }
}

// ---- the functors ----

template <typename D, typename S>
struct CopyFn {
  D* dst;
  const S* src;
  __device__ void operator()(const int64_t (&o)[2]) const { dst[o[0]] = convert<D>(src[o[1]]); }
};

template <typename Bits>
struct FillFn {
  Bits* dst;
  Bits value;
  __device__ void operator()(const int64_t (&o)[1]) const { dst[o[0]] = value; }
};

template <typename T>
struct UnaryFn {
  UnaryOp op;
  T* out;
  const T* in;
  compute_t<T> scalar;
  __device__ void operator()(const int64_t (&o)[2]) const { out[o[0]] = unary_at(op, in[o[1]], scalar); }
};

template <typename T, typename A, typename B>
struct BinaryFn {
  BinaryOp op;
  T* out;
  const A* a;
  const B* b;
  __device__ void operator()(const int64_t (&o)[3]) const { out[o[0]] = binary_at<T>(op, a[o[1]], b[o[2]]); }
};

template <typename T, typename C>
struct WhereFn {
  T* out;
  const C* condition;
  const T *a, *b;
  __device__ void operator()(const int64_t (&o)[4]) const { out[o[0]] = truth(condition[o[1]]) ? a[o[2]] : b[o[3]]; }
};

}  // namespace

// ---- launchers ----

cudaError_t launch_copy(const LaunchContext& ctx, DType dst_dtype, DType src_dtype, const StridedLayout<2>& layout,
                        void* dst, const void* src) {
  cudaError_t status = cudaSuccess;
  dispatch_any(dst_dtype, [&](auto d) {
    using D = decltype(d);
    dispatch_any(src_dtype, [&](auto s) {
      using S = decltype(s);
      D* d_ptr = static_cast<D*>(dst);
      const S* s_ptr = static_cast<const S*>(src);
      if (const auto packs = in_packs(layout, pack_aligned(d_ptr) && pack_aligned(s_ptr))) {
        copy4_kernel<D, S, uint32_t><<<grid_for(ctx, packs->numel), kThreads, 0, ctx.stream>>>(*packs, d_ptr, s_ptr);
        status = cudaGetLastError();
      } else {
        status = launch_map(ctx, layout, CopyFn<D, S>{d_ptr, s_ptr});
      }
    });
  });
  return status;
}

cudaError_t launch_fill(const LaunchContext& ctx, size_t elem_size, const StridedLayout<1>& layout, void* dst,
                        uint64_t bits) {
  switch (elem_size) {
    case 1: return launch_map(ctx, layout, FillFn<uint8_t>{static_cast<uint8_t*>(dst), uint8_t(bits)});
    case 2: return launch_map(ctx, layout, FillFn<uint16_t>{static_cast<uint16_t*>(dst), uint16_t(bits)});
    case 4: return launch_map(ctx, layout, FillFn<uint32_t>{static_cast<uint32_t*>(dst), uint32_t(bits)});
    case 8: return launch_map(ctx, layout, FillFn<uint64_t>{static_cast<uint64_t*>(dst), bits});
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_unary(const LaunchContext& ctx, UnaryOp op, DType dtype, const StridedLayout<2>& layout, void* out,
                         const void* in, double scalar) {
  cudaError_t status = cudaSuccess;
  dispatch_floating_or_bf16(dtype, [&](auto zero) {
    using T = decltype(zero);
    status = launch_map(ctx, layout,
                        UnaryFn<T>{op, static_cast<T*>(out), static_cast<const T*>(in), compute_t<T>(scalar)});
  });
  return status;
}

namespace {

template <typename T, typename A, typename B>
cudaError_t launch_binary_typed(const LaunchContext& ctx, BinaryOp op, const StridedLayout<3>& layout, T* out,
                                const A* a, const B* b) {
  if (const auto packs = in_packs(layout, pack_aligned(out) && pack_aligned(a) && pack_aligned(b))) {
    binary4_kernel<T, A, B, uint32_t><<<grid_for(ctx, packs->numel), kThreads, 0, ctx.stream>>>(*packs, op, out, a, b);
    return cudaGetLastError();
  }
  return launch_map(ctx, layout, BinaryFn<T, A, B>{op, out, a, b});
}

// f32 or bf16, for an f32 result's operands.
template <typename Fn>
void dispatch_f32_or_bf16(DType dtype, Fn&& fn) {
  if (dtype == DType::BF16) fn(__nv_bfloat16{});
  else fn(float{});
}

}  // namespace

cudaError_t launch_binary(const LaunchContext& ctx, BinaryOp op, DType out_dtype, DType a_dtype, DType b_dtype,
                          const StridedLayout<3>& layout, void* out, const void* a, const void* b) {
  cudaError_t status = cudaSuccess;
  if (a_dtype == out_dtype && b_dtype == out_dtype) {
    dispatch_floating_or_bf16(out_dtype, [&](auto zero) {
      using T = decltype(zero);
      status = launch_binary_typed(ctx, op, layout, static_cast<T*>(out), static_cast<const T*>(a),
                                   static_cast<const T*>(b));
    });
    return status;
  }
  dispatch_f32_or_bf16(a_dtype, [&](auto x) {
    dispatch_f32_or_bf16(b_dtype, [&](auto y) {
      using A = decltype(x);
      using B = decltype(y);
      status = launch_binary_typed(ctx, op, layout, static_cast<float*>(out), static_cast<const A*>(a),
                                   static_cast<const B*>(b));
    });
  });
  return status;
}

cudaError_t launch_where(const LaunchContext& ctx, DType dtype, DType condition_dtype, const StridedLayout<4>& layout,
                         void* out, const void* condition, const void* a, const void* b) {
  cudaError_t status = cudaSuccess;
  dispatch_floating(dtype, [&](auto zero) {
    using T = decltype(zero);
    dispatch_any(condition_dtype, [&](auto c) {
      using C = decltype(c);
      status = launch_map(ctx, layout,
                          WhereFn<T, C>{static_cast<T*>(out), static_cast<const C*>(condition),
                                        static_cast<const T*>(a), static_cast<const T*>(b)});
    });
  });
  return status;
}

}  // namespace engine::cuda
