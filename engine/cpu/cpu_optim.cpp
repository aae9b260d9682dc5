// The fused AdamW update on the CPU: one pass over param, grad and both
// moments, in the parameter's own precision (f32 or f64). The arithmetic is
// torch's _single_tensor_adamw, operation for operation: scalars are formed
// in double, cast to T, and every tensor op rounds to T as torch's in-place
// ops do, so f32 results agree with torch to the last bit or two.
#include "engine/cpu/cpu_backend.h"

#include "engine/cpu/parallel.h"

#include <cmath>

namespace engine {

namespace {

template <typename T>
void adamw_range(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v, int64_t n,
                 const AdamWArgs& a) {
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
    const T exp_avg = m[i] * beta1 + one_minus_beta1 * grad;                // mul_(beta1).add_(g, alpha)
    const T exp_avg_sq = v[i] * beta2 + one_minus_beta2 * grad * grad;      // mul_(beta2).addcmul_(g, g, value)
    const T denom = std::sqrt(exp_avg_sq) / bias_correction2_sqrt + eps;  // (sqrt(v) / bc2_sqrt).add_(eps)
    m[i] = exp_avg;
    v[i] = exp_avg_sq;
    p[i] = p[i] * decay + neg_step_size * (exp_avg / denom);  // mul_(decay), then addcdiv_(m, denom, value)
  }
}

}  // namespace

void CpuBackend::adamw_step(const View& param, const View& grad, const View& m, const View& v, const AdamWArgs& args) {
  cpu::dispatch_floating(param.dtype, "adamw_step", [&](auto zero) {
    using T = decltype(zero);
    // Contiguous chunks: each is an independent, vectorisable loop.
    constexpr int64_t kChunk = 1 << 14;
    const int64_t n = param.numel();
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    cpu::parallel_for(chunks, kChunk, [&](int64_t c) {
      const int64_t begin = c * kChunk;
      adamw_range(param.ptr<T>() + begin, grad.ptr<T>() + begin, m.ptr<T>() + begin, v.ptr<T>() + begin,
                  std::min(kChunk, n - begin), args);
    });
  });
}

}  // namespace engine
