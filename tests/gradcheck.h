// Test helpers: a finite-difference gradient check (central differences in
// f64) and naive reference utilities. Any op's backward is checked by
// comparing d/dx sum(f(x) * w) for a fixed random w against numerics.
#pragma once

#include "engine/ops.h"
#include "engine/rng.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <functional>
#include <vector>

namespace testing {

using engine::Tensor;

// A random f64 tensor with values in [-1, 1), seeded so failures reproduce.
inline Tensor random_f64(const engine::Shape& shape, uint64_t seed, bool requires_grad = true) {
  engine::Generator gen(seed);
  Tensor t = Tensor::rand(shape, gen, -1.0, 1.0, engine::DType::F64);
  t.set_requires_grad(requires_grad);
  return t;
}

// Checks the gradient of every input that requires grad. `f` may return any
// shape; a random projection turns it into a scalar.
inline void check_gradients(const std::function<Tensor(const std::vector<Tensor>&)>& f, std::vector<Tensor> inputs,
                            double eps = 1e-6, double tolerance = 1e-6) {
  Tensor probe = f(inputs);
  Tensor weights = random_f64(probe.shape(), 12345, false);
  auto objective = [&]() {
    engine::NoGradGuard no_grad;
    return engine::sum(engine::mul(f(inputs), weights)).item();
  };
  for (Tensor& t : inputs) t.zero_grad();
  engine::sum(engine::mul(probe, weights)).backward();

  for (size_t i = 0; i < inputs.size(); ++i) {
    Tensor& x = inputs[i];
    if (!x.requires_grad()) continue;
    REQUIRE(x.dtype() == engine::DType::F64);
    REQUIRE(x.is_contiguous());
    Tensor analytic = x.grad();
    REQUIRE(analytic.defined());
    std::vector<double> grad = analytic.to_vector<double>();
    double* data = x.data<double>();
    for (int64_t j = 0; j < x.numel(); ++j) {
      const double saved = data[j];
      data[j] = saved + eps;
      const double plus = objective();
      data[j] = saved - eps;
      const double minus = objective();
      data[j] = saved;
      const double numeric = (plus - minus) / (2 * eps);
      INFO("input " << i << " element " << j << ": analytic " << grad[size_t(j)] << " numeric " << numeric);
      REQUIRE(std::abs(grad[size_t(j)] - numeric) <= tolerance * (1 + std::abs(numeric)));
    }
  }
}

// Element-by-element comparison with a combined absolute/relative tolerance.
inline void require_close(const Tensor& actual, const std::vector<double>& expected, double tolerance = 1e-6) {
  REQUIRE(actual.numel() == int64_t(expected.size()));
  std::vector<double> got = actual.to_vector<double>();
  for (size_t i = 0; i < expected.size(); ++i) {
    INFO("element " << i << ": got " << got[i] << " expected " << expected[i]);
    REQUIRE(std::abs(got[i] - expected[i]) <= tolerance * (1 + std::abs(expected[i])));
  }
}

// Reads element `index` (a multi-index) of any tensor through its strides.
inline double at(const Tensor& t, const std::vector<int64_t>& index) {
  std::vector<double> all = t.contiguous().to_vector<double>();
  int64_t flat = 0;
  for (size_t d = 0; d < index.size(); ++d) flat = flat * t.shape()[d] + index[d];
  return all[size_t(flat)];
}

}  // namespace testing
