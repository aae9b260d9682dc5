// The fused AdamW update on CUDA: one pass over param, grad and both moments,
// for a whole list of parameters per launch (an adapter has dozens of small
// ones, and a launch each would cost more than the update). It is
// engine/cpu/cpu_optim.cpp's arithmetic op for op: every operation is
// rounded to T on its own, with a fused multiply-add
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

// Up to kMaxTensors parameters per launch: their pointers travel in the
// kernel's arguments (under the 4 KiB limit), and each block updates
// kPerBlock consecutive elements of one of them. first_block[t] is the first
// block of tensor t, so a block finds its tensor by scanning at most 48 entries.
constexpr int kMaxTensors = 48;
constexpr int64_t kPerBlock = 4 * kThreads;

template <typename T>
struct TensorList {
  int count;
  int64_t first_block[kMaxTensors + 1];
  int64_t n[kMaxTensors];
  T* param[kMaxTensors];
  const T* grad[kMaxTensors];
  T* m[kMaxTensors];
  T* v[kMaxTensors];
};

template <typename T>
__global__ void adamw_kernel(TensorList<T> list, Scalars<T> s) {
  int t = 0;
  while (t + 1 < list.count && list.first_block[t + 1] <= int64_t(blockIdx.x)) ++t;
  const int64_t begin = (int64_t(blockIdx.x) - list.first_block[t]) * kPerBlock;
  const int64_t end = min64(begin + kPerBlock, list.n[t]);
  T *param = list.param[t], *m = list.m[t], *v = list.v[t];
  const T* grad = list.grad[t];
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
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

cudaError_t launch_adamw(const LaunchContext& ctx, DType dtype, const std::vector<AdamWBuffers>& tensors,
                         const AdamWScalars& a) {
  cudaError_t status = cudaSuccess;
  dispatch_floating(dtype, [&](auto zero) {
    using T = decltype(zero);
    const Scalars<T> s{T(a.decay),         T(a.beta1),         T(a.one_minus_beta1),         T(a.beta2),
                       T(a.one_minus_beta2), T(a.neg_step_size), T(a.bias_correction2_sqrt), T(a.eps)};
    TensorList<T> list{};
    auto launch = [&] {
      const int64_t blocks = list.first_block[list.count];
      if (blocks > 0 && status == cudaSuccess) {
        if (blocks > int64_t(INT32_MAX)) {
          status = cudaErrorInvalidConfiguration;
          return;
        }
        adamw_kernel<<<unsigned(blocks), kThreads, 0, ctx.stream>>>(list, s);
        status = cudaGetLastError();
      }
      list.count = 0;
      list.first_block[0] = 0;
    };
    for (const AdamWBuffers& b : tensors) {
      if (b.n == 0) continue;
      const int t = list.count++;
      list.n[t] = b.n;
      list.param[t] = static_cast<T*>(b.param);
      list.grad[t] = static_cast<const T*>(b.grad);
      list.m[t] = static_cast<T*>(b.m);
      list.v[t] = static_cast<T*>(b.v);
      list.first_block[t + 1] = list.first_block[t] + (b.n + kPerBlock - 1) / kPerBlock;
      if (list.count == kMaxTensors) launch();
    }
    if (list.count > 0) launch();
  });
  return status;
}

}  // namespace engine::cuda
