// The fused AdamW update on the CPU: one pass over param, grad and both
// moments, in the parameter's own precision (f32 or f64). The arithmetic is
// torch 1.13's _single_tensor_adamw as its vectorised CPU kernels run it:
// scalars formed in double and cast to T, each tensor op rounded to T, and a
// fused multiply-add where those kernels use one (add_ with alpha calls
// vec::fmadd; addcmul's `self + value * t1 * t2` is contracted by the
// compiler). The result agrees with torch bit for bit on AVX2 machines.
//
// That needs every other a*b+c left unfused, which GCC does not promise: it
// contracts across statements by default. Hence the pragma, first in the file
// so that inline library functions get it too. (-ffp-contract=off on the
// command line makes it redundant; -fno-math-errno there lets the sqrt vectorise.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include "engine/cpu/cpu_backend.h"

#include "engine/cpu/parallel.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace engine {

namespace {

// On x86-64 the kernel is compiled twice: with FMA instructions (picked at
// load time where the CPU has them) and for the baseline, where std::fma is
// a slower but equally exact library call.
#if defined(__x86_64__)
#define ENGINE_FMA_CLONES gnu::target_clones("fma", "default")
#else
#define ENGINE_FMA_CLONES
#endif

template <typename T>
[[gnu::always_inline]] inline void adamw_range(T* __restrict p, const T* __restrict g, T* __restrict m,
                                               T* __restrict v, int64_t n, const AdamWArgs& a) {
  const double bias_correction1 = 1 - std::pow(a.beta1, double(a.step));
  const double bias_correction2 = 1 - std::pow(a.beta2, double(a.step));
  const T decay = T(1 - a.lr * a.weight_decay);
  const T beta1 = T(a.beta1), one_minus_beta1 = T(1 - a.beta1);
  const T beta2 = T(a.beta2), one_minus_beta2 = T(1 - a.beta2);
  const T neg_step_size = T(-(a.lr / bias_correction1));
  const T bias_correction2_sqrt = T(std::sqrt(bias_correction2));
  const T eps = T(a.eps);
  for (int64_t i = 0; i < n; ++i) {
    const T grad = g[i];
    const T exp_avg = std::fma(grad, one_minus_beta1, m[i] * beta1);             // mul_(b1).add_(g, alpha=1-b1)
    const T exp_avg_sq = std::fma(one_minus_beta2 * grad, grad, v[i] * beta2);  // mul_(b2).addcmul_(g, g, 1-b2)
    const T denom = std::sqrt(exp_avg_sq) / bias_correction2_sqrt + eps;       // (sqrt(v) / bc2_sqrt).add_(eps)
    const T decayed = p[i] * decay;                                             // mul_(1 - lr * wd)
    p[i] = decayed + neg_step_size * exp_avg / denom;                           // addcdiv_(m, denom, -step_size)
    m[i] = exp_avg;
    v[i] = exp_avg_sq;
  }
}

[[ENGINE_FMA_CLONES]] void adamw_f32(float* p, const float* g, float* m, float* v, int64_t n, const AdamWArgs& a) {
  adamw_range(p, g, m, v, n, a);
}

[[ENGINE_FMA_CLONES]] void adamw_f64(double* p, const double* g, double* m, double* v, int64_t n,
                                     const AdamWArgs& a) {
  adamw_range(p, g, m, v, n, a);
}

}  // namespace

void CpuBackend::adamw_step(std::span<const AdamWTensors> tensors, const AdamWArgs& args) {
  for (const AdamWTensors& t : tensors) {
    cpu::dispatch_floating(t.param.dtype, "adamw_step", [&](auto zero) {
      using T = decltype(zero);
      // Contiguous chunks: each is an independent, vectorisable loop.
      constexpr int64_t kChunk = 1 << 14;
      const int64_t n = t.param.numel();
      const int64_t chunks = (n + kChunk - 1) / kChunk;
      cpu::parallel_for(chunks, kChunk, [&](int64_t c) {
        const int64_t begin = c * kChunk;
        const int64_t count = std::min(kChunk, n - begin);
        T *p = t.param.ptr<T>() + begin, *m = t.m.ptr<T>() + begin, *v = t.v.ptr<T>() + begin;
        const T* g = t.grad.ptr<T>() + begin;
        if constexpr (std::is_same_v<T, float>) adamw_f32(p, g, m, v, count, args);
        else adamw_f64(p, g, m, v, count, args);
      });
    });
  }
}

}  // namespace engine
