// Elementwise ops and reductions: forward against naive loops (broadcasting,
// odd shapes, non-contiguous views) and backward against finite differences.
#include "engine/ops.h"
#include "tests/gradcheck.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <functional>

using engine::DType;
using engine::Shape;
using engine::Tensor;
using testing::check_gradients;
using testing::random_f64;

namespace {

// Naive broadcasting reference: element (i...) of the result reads a and b at
// the same index with broadcast dims pinned to 0.
std::vector<double> naive_binary(const Tensor& a, const Tensor& b, const std::function<double(double, double)>& f) {
  Shape shape = engine::broadcast_shapes(a.shape(), b.shape());
  std::vector<double> out;
  std::vector<int64_t> index(shape.size(), 0);
  auto read = [&](const Tensor& t) {
    std::vector<int64_t> sub;
    size_t lead = shape.size() - t.shape().size();
    for (size_t d = 0; d < t.shape().size(); ++d) sub.push_back(t.shape()[d] == 1 ? 0 : index[lead + d]);
    return testing::at(t, sub);
  };
  for (int64_t n = 0; n < engine::numel(shape); ++n) {
    int64_t rest = n;
    for (size_t d = shape.size(); d-- > 0;) {
      index[d] = rest % shape[d];
      rest /= shape[d];
    }
    out.push_back(f(read(a), read(b)));
  }
  return out;
}

}  // namespace

TEST_CASE("binary ops broadcast like NumPy", "[elementwise]") {
  struct Case {
    Shape a, b;
  };
  std::vector<Case> cases = {{{3, 5, 7}, {3, 5, 7}}, {{3, 5, 7}, {7}}, {{3, 1, 7}, {5, 1}}, {{1}, {2, 3}},
                             {{}, {4}},               {{4, 1}, {1, 6}}, {{2, 3, 1, 5}, {3, 4, 1}}};
  for (auto& c : cases) {
    for (DType dtype : {DType::F32, DType::F64}) {
      engine::Generator gen(7);
      Tensor a = Tensor::rand(c.a, gen, 0.5, 2.0, dtype), b = Tensor::rand(c.b, gen, 0.5, 2.0, dtype);
      INFO("shapes " << engine::shape_str(c.a) << " and " << engine::shape_str(c.b));
      testing::require_close(a + b, naive_binary(a, b, [](double x, double y) { return x + y; }), 1e-6);
      testing::require_close(a - b, naive_binary(a, b, [](double x, double y) { return x - y; }), 1e-6);
      testing::require_close(a * b, naive_binary(a, b, [](double x, double y) { return x * y; }), 1e-6);
      testing::require_close(a / b, naive_binary(a, b, [](double x, double y) { return x / y; }), 1e-6);
      testing::require_close(engine::maximum(a, b), naive_binary(a, b, [](double x, double y) { return std::max(x, y); }));
    }
  }
}

TEST_CASE("binary ops read non-contiguous views", "[elementwise]") {
  Tensor a = random_f64({6, 4, 5}, 1, false);
  Tensor b = random_f64({5, 4, 6}, 2, false);
  Tensor at = a.transpose(0, 2);              // [5, 4, 6], strided
  Tensor bs = b.slice(2, 0, 6, 2);            // [5, 4, 3], stepped
  Tensor sum1 = at + b;
  Tensor prod = at.slice(2, 1, 6, 2) * bs;    // both strided
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t j = 0; j < 4; ++j)
      for (int64_t k = 0; k < 3; ++k) {
        REQUIRE(testing::at(sum1, {i, j, 2 * k}) == Approx(testing::at(a, {2 * k, j, i}) + testing::at(b, {i, j, 2 * k})));
        REQUIRE(testing::at(prod, {i, j, k}) ==
                Approx(testing::at(a, {2 * k + 1, j, i}) * testing::at(b, {i, j, 2 * k})));
      }
}

TEST_CASE("mixed floating dtypes meet in the wider one, and gradients come back in each", "[elementwise]") {
  engine::Generator gen(11);
  Tensor wide = Tensor::rand({3, 4}, gen, -1, 1, DType::F32), narrow = Tensor::rand({4}, gen, -1, 1, DType::BF16);
  Tensor d = Tensor::rand({3, 4}, gen, -1, 1, DType::F64);
  wide.set_requires_grad(true), narrow.set_requires_grad(true), d.set_requires_grad(true);
  const Tensor sum = wide + narrow;  // the bf16 values widen exactly
  REQUIRE(sum.dtype() == DType::F32);
  testing::require_close(sum, naive_binary(wide, narrow.to(DType::F32), [](double x, double y) { return x + y; }), 0);
  REQUIRE((narrow * wide).dtype() == DType::F32);
  REQUIRE((wide - d).dtype() == DType::F64);
  REQUIRE((narrow.to(DType::F16) + narrow).dtype() == DType::F32);
  engine::sum(sum * 2.0 + engine::maximum(wide, d)).backward();
  REQUIRE(narrow.grad().dtype() == DType::BF16);  // 2 summed over the broadcast rows: 6
  testing::require_close(narrow.grad(), std::vector<double>(4, 6.0), 0);
  REQUIRE(wide.grad().dtype() == DType::F32);
  REQUIRE(d.grad().dtype() == DType::F64);
}

TEST_CASE("bf16 is stored, not computed in: each op rounds its f32 result once", "[elementwise]") {
  engine::Generator gen(12);
  const Tensor a = Tensor::rand({5, 6}, gen, 0.5, 2, DType::F32).to(DType::BF16);
  const Tensor b = Tensor::rand({6}, gen, 0.5, 2, DType::F32).to(DType::BF16);
  const Tensor a32 = a.to(DType::F32), b32 = b.to(DType::F32);
  auto rounded = [](const Tensor& t) { return t.to(DType::BF16).to(DType::F32).to_vector<double>(); };
  auto same = [&](const Tensor& got, const Tensor& f32) {
    REQUIRE(got.dtype() == DType::BF16);
    testing::require_close(got.to(DType::F32), rounded(f32), 0);
  };
  same(a + b, a32 + b32);
  same(a / b, a32 / b32);
  same(a * 0.3, a32 * 0.3);
  same(engine::exp(a), engine::exp(a32));
  same(engine::sum(a, {1}, false), engine::sum(a32, {1}, false));
  std::vector<float> alternate(30);
  for (size_t i = 0; i < alternate.size(); ++i) alternate[i] = float(i % 2);
  const Tensor mask = Tensor::from_vector(alternate, {5, 6});
  same(engine::where(mask, a, b), engine::where(mask, a32, b32));
  REQUIRE(engine::argmax(a, -1).to_vector<int64_t>() == engine::argmax(a32, -1).to_vector<int64_t>());
  // Layer norm, softmax and the loss widen bf16 to f32 and return f32.
  REQUIRE(engine::softmax(a, -1).dtype() == DType::F32);
  testing::require_close(engine::log_softmax(a, 0), engine::log_softmax(a32, 0).to_vector<double>(), 0);
}

TEST_CASE("unary ops match the C library", "[elementwise]") {
  engine::Generator gen(3);
  Tensor x = Tensor::rand({3, 5, 7}, gen, 0.1, 3.0, DType::F64);
  std::vector<double> v = x.to_vector<double>();
  auto expect = [&](const Tensor& got, const std::function<double(double)>& f) {
    std::vector<double> want;
    for (double e : v) want.push_back(f(e));
    testing::require_close(got, want, 1e-12);
  };
  expect(engine::exp(x), [](double e) { return std::exp(e); });
  expect(engine::log(x), [](double e) { return std::log(e); });
  expect(engine::sqrt(x), [](double e) { return std::sqrt(e); });
  expect(engine::tanh(x), [](double e) { return std::tanh(e); });
  expect(engine::pow(x, 1.7), [](double e) { return std::pow(e, 1.7); });
  expect(engine::square(x), [](double e) { return e * e; });
  expect(-x, [](double e) { return -e; });
  expect(x * 3.0 + 1.0, [](double e) { return e * 3 + 1; });
  expect(x / 4.0 - 2.0, [](double e) { return e / 4 - 2; });
}

TEST_CASE("where and masked_fill", "[elementwise]") {
  Tensor cond = Tensor::from_vector<int32_t>({1, 0, 0, 1, 1, 0}, {2, 3});
  Tensor a = Tensor::arange(0, 6, 1, DType::F32).reshape({2, 3});
  Tensor b = Tensor::full({3}, -1.0);
  CHECK(engine::where(cond, a, b).to_vector<float>() == std::vector<float>{0, -1, -1, 3, 4, -1});
  CHECK(engine::masked_fill(a, cond, 9).to_vector<float>() == std::vector<float>{9, 1, 2, 9, 9, 5});
}

TEST_CASE("reductions over any dims", "[reduce]") {
  Tensor x = random_f64({3, 4, 5}, 4, false);
  auto naive_sum = [&](int64_t keep_dim) {  // sums over the other two dims
    std::vector<double> out(size_t(x.shape()[size_t(keep_dim)]), 0.0);
    for (int64_t i = 0; i < 3; ++i)
      for (int64_t j = 0; j < 4; ++j)
        for (int64_t k = 0; k < 5; ++k) out[size_t(keep_dim == 0 ? i : keep_dim == 1 ? j : k)] += testing::at(x, {i, j, k});
    return out;
  };
  testing::require_close(engine::sum(x, {1, 2}), naive_sum(0), 1e-12);
  testing::require_close(engine::sum(x, {0, -1}), naive_sum(1), 1e-12);
  testing::require_close(engine::sum(x.transpose(0, 2), {1, 2}), naive_sum(2), 1e-12);  // strided input
  CHECK(engine::sum(x, {1}, true).shape() == Shape{3, 1, 5});
  CHECK(engine::sum(x).dim() == 0);
  double total = 0;
  for (double e : x.to_vector<double>()) total += e;
  CHECK(engine::sum(x).item() == Approx(total));
  CHECK(engine::mean(x).item() == Approx(total / 60));

  Tensor m = engine::max(x, 1);
  CHECK(m.shape() == Shape{3, 5});
  Tensor idx = engine::argmax(x, 1);
  CHECK(idx.shape() == Shape{3, 5});
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t k = 0; k < 5; ++k) {
      double best = -1e9;
      int64_t arg = -1;
      for (int64_t j = 0; j < 4; ++j)
        if (testing::at(x, {i, j, k}) > best) best = testing::at(x, {i, j, k}), arg = j;
      REQUIRE(testing::at(m, {i, k}) == best);
      REQUIRE(testing::at(idx, {i, k}) == double(arg));
    }
  CHECK(engine::argmax(x, 0).shape() == Shape{4, 5});
  CHECK(engine::sum(Tensor::zeros({0, 3}), {0}).to_vector<float>() == std::vector<float>{0, 0, 0});
}

TEST_CASE("elementwise gradients match finite differences", "[elementwise][grad]") {
  using V = const std::vector<Tensor>&;
  check_gradients([](V in) { return in[0] + in[1]; }, {random_f64({3, 4}, 1), random_f64({4}, 2)});
  check_gradients([](V in) { return in[0] - in[1]; }, {random_f64({3, 1}, 1), random_f64({1, 5}, 2)});
  check_gradients([](V in) { return in[0] * in[1]; }, {random_f64({2, 3, 4}, 1), random_f64({3, 1}, 2)});
  check_gradients([](V in) { return in[0] / (in[1] + 3.0); }, {random_f64({3, 4}, 1), random_f64({3, 4}, 2)});
  check_gradients([](V in) { return engine::maximum(in[0], in[1]); }, {random_f64({5, 4}, 1), random_f64({4}, 2)});
  check_gradients([](V in) { return engine::exp(in[0]) * 2.0 - 1.0; }, {random_f64({3, 4}, 3)});
  check_gradients([](V in) { return engine::log(in[0] + 2.0); }, {random_f64({3, 4}, 3)});
  check_gradients([](V in) { return engine::sqrt(in[0] + 2.0); }, {random_f64({3, 4}, 3)});
  check_gradients([](V in) { return engine::tanh(in[0]); }, {random_f64({3, 4}, 3)});
  check_gradients([](V in) { return engine::pow(in[0] + 2.0, 2.5); }, {random_f64({3, 4}, 3)});
  check_gradients([](V in) { return engine::square(-in[0]); }, {random_f64({3, 4}, 3)});
  check_gradients([](V in) { return engine::where(in[0] + 0.2, in[1], in[0]); }, {random_f64({3, 4}, 5), random_f64({4}, 6)});
}

TEST_CASE("reduction and view gradients match finite differences", "[reduce][view][grad]") {
  using V = const std::vector<Tensor>&;
  check_gradients([](V in) { return engine::sum(in[0], {1}); }, {random_f64({3, 4, 2}, 1)});
  check_gradients([](V in) { return engine::sum(in[0], {0, 2}, true); }, {random_f64({3, 4, 2}, 1)});
  check_gradients([](V in) { return engine::mean(in[0]); }, {random_f64({3, 4}, 1)});
  check_gradients([](V in) { return engine::max(in[0], 1); }, {random_f64({3, 5}, 1)});
  check_gradients([](V in) { return in[0].transpose(0, 1) * in[1]; }, {random_f64({3, 4}, 1), random_f64({4, 3}, 2)});
  check_gradients([](V in) { return in[0].permute({2, 0, 1}).reshape({4, 6}); }, {random_f64({2, 3, 4}, 1)});
  check_gradients([](V in) { return in[0].slice(1, 1, 5, 2) * 3.0; }, {random_f64({3, 6}, 1)});
  check_gradients([](V in) { return in[0].select(0, 2); }, {random_f64({3, 6}, 1)});
  check_gradients([](V in) { return in[0].expand({4, 3, 5}); }, {random_f64({3, 1}, 1)});
  check_gradients([](V in) { return engine::cat({in[0], in[1] * 2.0, in[0]}, 0); },
                  {random_f64({2, 3}, 1), random_f64({1, 3}, 2)});
  check_gradients([](V in) { return engine::split(in[0], 2, 1)[1] + engine::sum(engine::split(in[0], 2, 1)[2], {1}, true); },
                  {random_f64({3, 6}, 1)});
  check_gradients([](V in) { return in[0].to(DType::F32).to(DType::F64); }, {random_f64({3}, 1)}, 1e-3, 1e-5);
}
