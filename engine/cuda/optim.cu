// The fused AdamW update on CUDA: one pass over param, grad and both moments,
// one thread per element. It is engine/cpu/cpu_optim.cpp's arithmetic op for
// op: every operation is rounded to T on its own, with a fused multiply-add
// exactly where the CPU (and torch) use one. nvcc would contract other
// a * b + c into FMAs, so each step is written with an explicitly rounded
// intrinsic (__fmul_rn, __fadd_rn, ...), which it never fuses. The result is
// bit-identical to the CPU backend.
#include "engine/cuda/common.cuh"

namespace engine::cuda {

namespace {

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

template <typename T>
struct Scalars {
  T decay, beta1, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps;
};

template <typename T>
__global__ void adamw_kernel(int64_t n, T* param, const T* grad, T* m, T* v, Scalars<T> s) {
  for (int64_t i = grid_index(); i < n; i += grid_stride()) {
    const T g = grad[i];
    const T exp_avg = fma_rn(g, s.one_minus_beta1, mul_rn(m[i], s.beta1));                   // mul_(b1).add_(g, 1-b1)
    const T exp_avg_sq = fma_rn(mul_rn(s.one_minus_beta2, g), g, mul_rn(v[i], s.beta2));     // addcmul_(g, g, 1-b2)
    const T denom = add_rn(div_rn(sqrt_rn(exp_avg_sq), s.bias_correction2_sqrt), s.eps);     // (sqrt(v)/bc2).add_(eps)
    const T decayed = mul_rn(param[i], s.decay);                                             // mul_(1 - lr * wd)
    param[i] = add_rn(decayed, div_rn(mul_rn(s.neg_step_size, exp_avg), denom));            // addcdiv_(m, denom, -step)
    m[i] = exp_avg;
    v[i] = exp_avg_sq;
  }
}

}  // namespace

cudaError_t launch_adamw(const LaunchContext& ctx, DType dtype, int64_t n, void* param, const void* grad, void* m,
                         void* v, const AdamWScalars& a) {
  if (n == 0) return cudaSuccess;
  dispatch_floating(dtype, [&](auto zero) {
    using T = decltype(zero);
    const Scalars<T> s{T(a.decay),         T(a.beta1),         T(a.one_minus_beta1),         T(a.beta2),
                       T(a.one_minus_beta2), T(a.neg_step_size), T(a.bias_correction2_sqrt), T(a.eps)};
    adamw_kernel<<<grid_for(ctx, n), kThreads, 0, ctx.stream>>>(n, static_cast<T*>(param), static_cast<const T*>(grad),
                                                                static_cast<T*>(m), static_cast<T*>(v), s);
  });
  return cudaGetLastError();
}

}  // namespace engine::cuda
