// CUDA random draws and dropout from the Philox stream of engine/rng.h, with
// the CPU backend's element -> word mapping (cpu_backend.cpp, cpu_nn.cpp), so
// both devices draw the same values and the same dropout masks:
//   element i is word i % 4 of block offset + i / 4;
//   normal elements 2j and 2j+1 are Box-Muller on uniforms 2j and 2j+1.
// Uniform fills and dropout are bit-identical to the CPU (the same integer
// and IEEE double arithmetic); normal fills agree up to the last bit of the
// double log/cos/sin before rounding to the output type. The CPU is built
// with -ffp-contract=off, so the affine maps here use __dadd_rn/__dmul_rn:
// nvcc would otherwise fuse them into an FMA and round differently.
#include "engine/cuda/common.cuh"
#include "engine/rng.h"

namespace engine::cuda {

namespace {

// One thread per Philox block: elements 4t .. 4t+3.
template <typename T>
__global__ void fill_uniform_kernel(int64_t n, T* out, uint64_t seed, uint64_t offset, double low, double high) {
  for (int64_t t = grid_index(); t * 4 < n; t += grid_stride()) {
    const Philox4 block = philox4x32_10(seed, offset + uint64_t(t));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = t * 4 + k;
      if (i < n)
        out[i] = from_double<T>(__dadd_rn(low, __dmul_rn(high - low, double(philox_word_to_uniform(block.v[k])))));
    }
  }
}

// One thread per pair (2j, 2j+1); a pair's two uniforms sit in one Philox
// block, since 2j is even and blocks hold four words.
template <typename T>
__global__ void fill_normal_kernel(int64_t n, T* out, uint64_t seed, uint64_t offset, double mean, double std) {
  constexpr double kTwoPi = 2 * 3.14159265358979323846;  // the CPU's 2 * M_PI
  for (int64_t pair = grid_index(); pair * 2 < n; pair += grid_stride()) {
    const uint64_t i = uint64_t(2 * pair);
    const Philox4 block = philox4x32_10(seed, offset + i / 4);
    const double u1 = 1.0 - double(philox_word_to_uniform(block.v[i % 4]));  // in (0, 1], so log is finite
    const double u2 = double(philox_word_to_uniform(block.v[i % 4 + 1]));
    const double radius = sqrt(-2.0 * log(u1));
    const double scaled = __dmul_rn(std, radius);
    out[2 * pair] = from_double<T>(__dadd_rn(mean, __dmul_rn(scaled, cos(kTwoPi * u2))));
    if (2 * pair + 1 < n) out[2 * pair + 1] = from_double<T>(__dadd_rn(mean, __dmul_rn(scaled, sin(kTwoPi * u2))));
  }
}

// out = residual + dropout(in), the residual optional: element i is kept
// iff its uniform >= p (the CPU's test, in integers), scaled by 1 / (1 - p)
// rounded to the compute type C (f32, or f64 for f64), and the sum rounded
// once to Out. In and Out are one dtype, or bf16 and f32 either way (a bf16
// input added to the f32 residual stream; an f32 gradient dropped into a
// bf16 input's). One thread per Philox block; with `packed`, its four
// elements move in one load and one store.
template <typename In, typename Out>
__global__ void dropout_kernel(int64_t n, Out* out, const In* in, const Out* residual, uint32_t keep_from,
                               compute_t<Out> scale, uint64_t seed, uint64_t offset, bool packed) {
  using C = compute_t<Out>;
  for (int64_t t = grid_index(); t * 4 < n; t += grid_stride()) {
    const Philox4 block = philox4x32_10(seed, offset + uint64_t(t));
    auto value = [&](int k, In x, Out r) {
      const C dropped = block.v[k] >> 8 >= keep_from ? product_rn(convert<C>(x), scale) : C(0);
      return convert<Out>(residual ? convert<C>(r) + dropped : dropped);
    };
    if (packed && t * 4 + 4 <= n) {
      const Pack4<In> x = reinterpret_cast<const Pack4<In>*>(in)[t];
      const Pack4<Out> r = residual ? reinterpret_cast<const Pack4<Out>*>(residual)[t] : Pack4<Out>{};
      Pack4<Out> y;
#pragma unroll
      for (int k = 0; k < 4; ++k) y.v[k] = value(k, x.v[k], r.v[k]);
      reinterpret_cast<Pack4<Out>*>(out)[t] = y;
      continue;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = t * 4 + k;
      if (i < n) out[i] = value(k, in[i], residual ? residual[i] : Out{});
    }
  }
}

}  // namespace

cudaError_t launch_fill_uniform(const LaunchContext& ctx, DType dtype, int64_t n, void* out, uint64_t seed,
                                uint64_t offset, double low, double high) {
  if (n == 0) return cudaSuccess;
  dispatch_any(dtype, [&](auto zero) {
    using T = decltype(zero);
    fill_uniform_kernel<<<grid_for(ctx, (n + 3) / 4), kThreads, 0, ctx.stream>>>(n, static_cast<T*>(out), seed, offset,
                                                                                 low, high);
  });
  return cudaGetLastError();
}

cudaError_t launch_fill_normal(const LaunchContext& ctx, DType dtype, int64_t n, void* out, uint64_t seed,
                               uint64_t offset, double mean, double std) {
  if (n == 0) return cudaSuccess;
  dispatch_any(dtype, [&](auto zero) {
    using T = decltype(zero);
    fill_normal_kernel<<<grid_for(ctx, (n + 1) / 2), kThreads, 0, ctx.stream>>>(n, static_cast<T*>(out), seed, offset,
                                                                                mean, std);
  });
  return cudaGetLastError();
}

cudaError_t launch_dropout(const LaunchContext& ctx, DType in_dtype, DType out_dtype, int64_t n, void* out,
                           const void* in, const void* residual, double p, uint64_t seed, uint64_t offset) {
  if (n == 0) return cudaSuccess;
  auto launch = [&](auto in_zero, auto out_zero) {
    using In = decltype(in_zero);
    using Out = decltype(out_zero);
    Out* dst = static_cast<Out*>(out);
    const In* src = static_cast<const In*>(in);
    const Out* res = static_cast<const Out*>(residual);
    const bool packed = pack_aligned(dst) && pack_aligned(src) && (!res || pack_aligned(res));
    dropout_kernel<<<grid_for(ctx, (n + 3) / 4), kThreads, 0, ctx.stream>>>(
        n, dst, src, res, uniform_threshold(p, 24), compute_t<Out>(1.0 / (1.0 - p)), seed, offset, packed);
  };
  if (in_dtype == DType::BF16 && out_dtype == DType::F32) launch(__nv_bfloat16{}, float{});
  else if (in_dtype == DType::F32 && out_dtype == DType::BF16) launch(float{}, __nv_bfloat16{});
  else dispatch_floating_or_bf16(in_dtype, [&](auto zero) { launch(zero, zero); });
  return cudaGetLastError();
}

}  // namespace engine::cuda
