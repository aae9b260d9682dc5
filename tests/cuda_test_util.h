// What the CUDA parity tests share: random inputs, the same tensor on both
// devices, element-by-element comparison with a named tolerance, the padding
// masks of the attention tests, and the skip (exit 77) without a GPU.
#pragma once

#include <catch2/catch.hpp>

#include "engine/backend.h"
#include "engine/ops.h"
#include "engine/rng.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace cuda_test {

using engine::Device;
using engine::DType;
using engine::Shape;
using engine::Tensor;

// The body of each GPU test executable's main().
inline int run_or_skip(int argc, char** argv) {
  if (!engine::cuda_available()) {
    std::fprintf(stderr, "SKIP: no CUDA device\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}

inline const Device kGpu = Device::cuda(0);
inline const Device kCpu = Device::cpu();
constexpr double kF32Eps = 1.0 / (1 << 23);

inline Tensor random(const Shape& shape, uint64_t seed, DType dtype = DType::F32, double low = -1, double high = 1) {
  engine::Generator gen(seed);
  return Tensor::rand(shape, gen, low, high, dtype);
}

// A leaf on the GPU holding a CPU leaf's values, requiring grad as it does.
inline Tensor gpu_leaf(const Tensor& cpu) {
  Tensor g = cpu.detach().to(kGpu);
  if (cpu.requires_grad()) g.set_requires_grad(true);
  return g;
}

// The same base data on both devices, then the same view of each: the GPU
// kernels see the view's strides (Tensor::to would make it contiguous).
inline std::pair<Tensor, Tensor> both(const Tensor& base, const std::function<Tensor(const Tensor&)>& view) {
  return {view(base), view(base.to(kGpu))};
}

// gpu (on cuda) against cpu, element by element: |g - c| <= allowed(c, scale),
// where scale is the largest finite |c|, or 1 when every c is 0 (an exactly
// zero gradient, e.g. dq at T = 1: then rounding noise is judged absolutely). NaN must meet NaN
// and infinities must agree. One REQUIRE per tensor, naming the first bad element.
inline void compare(const Tensor& gpu, const Tensor& cpu, const std::function<double(double, double)>& allowed,
             const std::string& what) {
  INFO(what);
  REQUIRE(gpu.defined());
  REQUIRE(cpu.defined());
  REQUIRE(gpu.device() == kGpu);
  REQUIRE(gpu.shape() == cpu.shape());
  const std::vector<double> g = gpu.to_vector<double>(), c = cpu.to_vector<double>();
  double scale = 0;
  for (double x : c)
    if (std::isfinite(x)) scale = std::max(scale, std::abs(x));
  if (scale == 0) scale = 1;
  int64_t bad = -1;
  for (size_t i = 0; i < c.size() && bad < 0; ++i) {
    const bool ok = std::isnan(c[i]) ? std::isnan(g[i])
                    : std::isinf(c[i]) ? g[i] == c[i]
                                       : std::abs(g[i] - c[i]) <= allowed(c[i], scale);
    if (!ok) bad = int64_t(i);
  }
  INFO("first mismatch at flat index " << bad << ": gpu " << (bad >= 0 ? g[size_t(bad)] : 0.0) << ", cpu "
                                       << (bad >= 0 ? c[size_t(bad)] : 0.0) << " (scale " << scale << ")");
  REQUIRE(bad == -1);
}

// Relative to the tensor's largest value: for results of sums and products,
// whose rounding error scales with the magnitudes involved, not with each result.
inline void require_near(const Tensor& gpu, const Tensor& cpu, double tolerance, const std::string& what) {
  compare(gpu, cpu, [&](double, double scale) { return tolerance * scale; }, what);
}
// Relative to each element: for elementwise maps.
inline void require_close_each(const Tensor& gpu, const Tensor& cpu, double tolerance, const std::string& what) {
  compare(gpu, cpu, [&](double c, double) { return tolerance * std::abs(c); }, what);
}
inline void require_within(const Tensor& gpu, const Tensor& cpu, double tolerance, const std::string& what) {
  compare(gpu, cpu, [&](double, double) { return tolerance; }, what);
}
inline void require_equal(const Tensor& gpu, const Tensor& cpu, const std::string& what) {
  compare(gpu, cpu, [](double, double) { return 0.0; }, what);
}

// The two backends, for kernels no public op reaches (Rsqrt, Relu, Equal, ...).
inline engine::Backend& gpu_backend() { return engine::backend_for(kGpu); }
inline engine::Backend& cpu_backend() { return engine::backend_for(kCpu); }

enum class Padding { None, Left, Right, Holes, FullRow };

inline Tensor make_mask(Padding kind, int64_t B, int64_t T) {
  if (kind == Padding::None) return Tensor();
  std::vector<int32_t> mask(size_t(B * T), 1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t pad = std::min(T, 2 * b + 1);
      bool keep = true;
      if (kind == Padding::Left) keep = t >= pad;
      if (kind == Padding::Right) keep = t < T - pad;
      if (kind == Padding::Holes) keep = (b + 3 * t) % 4 != 0;
      if (kind == Padding::FullRow) keep = b != B - 1 && t != 0;
      mask[size_t(b * T + t)] = keep ? 1 : 0;
    }
  return Tensor::from_vector(mask, {B, T});
}

}  // namespace cuda_test
