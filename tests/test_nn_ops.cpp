// Tests of the fused neural-network ops (index_select, embedding, layer_norm,
// gelu_new, softmax, log_softmax, cross_entropy, dropout): forwards against
// naive loops written here, backwards against finite differences, and errors.
#include "engine/cpu/cpu_backend.h"
#include "engine/ops.h"
#include "engine/rng.h"
#include "tests/gradcheck.h"
#include "tests/residual_chain.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

using engine::DType;
using engine::Generator;
using engine::Reduction;
using engine::Shape;
using engine::Tensor;
using testing::check_gradients;
using testing::random_f64;
using testing::require_close;

namespace {

// A tensor's values in row-major order with a multi-index accessor, for the
// naive references below.
struct Dense {
  std::vector<double> values;
  Shape shape;

  explicit Dense(const Tensor& t) : values(t.to_vector<double>()), shape(t.shape()) {}
  double at(const std::vector<int64_t>& index) const {
    int64_t flat = 0;
    for (size_t d = 0; d < index.size(); ++d) flat = flat * shape[d] + index[d];
    return values[size_t(flat)];
  }
};

// Calls fn(multi_index) for every index of `shape`, in row-major order.
template <typename Fn>
void for_each_index(const Shape& shape, Fn&& fn) {
  std::vector<int64_t> index(shape.size(), 0);
  for (int64_t n = 0; n < engine::numel(shape); ++n) {
    fn(index);
    for (size_t d = shape.size(); d-- > 0;) {
      if (++index[d] < shape[d]) break;
      index[d] = 0;
    }
  }
}

Tensor ids_tensor(const std::vector<int64_t>& ids, DType dtype, const Shape& shape) {
  if (dtype == DType::I64) return Tensor::from_vector(ids, shape);
  return Tensor::from_vector(std::vector<int32_t>(ids.begin(), ids.end()), shape);
}

Tensor random_f32(const Shape& shape, uint64_t seed, double low = -1, double high = 1) {
  Generator gen(seed);
  return Tensor::rand(shape, gen, low, high, DType::F32);
}

double naive_gelu(double x) {
  return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
}

// Naive softmax (or log-softmax) of `x` along `dim`, via the max-shifted log-sum-exp.
std::vector<double> naive_softmax(const Tensor& x, int64_t dim, bool log) {
  Dense in(x);
  std::vector<double> out;
  for_each_index(x.shape(), [&](const std::vector<int64_t>& index) {
    std::vector<int64_t> other = index;
    double max = -INFINITY, sum = 0;
    for (other[size_t(dim)] = 0; other[size_t(dim)] < x.shape()[size_t(dim)]; ++other[size_t(dim)])
      max = std::max(max, in.at(other));
    for (other[size_t(dim)] = 0; other[size_t(dim)] < x.shape()[size_t(dim)]; ++other[size_t(dim)])
      sum += std::exp(in.at(other) - max);
    const double log_p = in.at(index) - max - std::log(sum);
    out.push_back(log ? log_p : std::exp(log_p));
  });
  return out;
}

}  // namespace

// ---------------------------------------------------------------- index_select

TEST_CASE("index_select gathers along every dim, for i32 and i64 indices", "[nn_ops]") {
  const Tensor base = random_f64({3, 5, 7}, 1, false);
  // A transposed view exercises non-contiguous input.
  for (const Tensor& a : {base, base.transpose(0, 2)}) {
    for (int64_t dim = 0; dim < 3; ++dim) {
      for (DType index_dtype : {DType::I32, DType::I64}) {
        const int64_t size = a.shape()[size_t(dim)];
        const std::vector<int64_t> picks{size - 1, 0, size - 1, 1};  // repeats and reorders
        const Tensor out = engine::index_select(a, dim - 3, ids_tensor(picks, index_dtype, {4}));  // negative dim
        Shape expected_shape = a.shape();
        expected_shape[size_t(dim)] = 4;
        REQUIRE(out.shape() == expected_shape);
        Dense in(a);
        std::vector<double> expected;
        for_each_index(expected_shape, [&](std::vector<int64_t> index) {
          index[size_t(dim)] = picks[size_t(index[size_t(dim)])];
          expected.push_back(in.at(index));
        });
        require_close(out, expected, 0.0);
      }
    }
  }
}

TEST_CASE("index_select backward scatter-adds, repeated indices accumulate", "[nn_ops]") {
  for (int64_t dim = 0; dim < 3; ++dim) {
    Tensor a = random_f64({3, 5, 7}, 2 + uint64_t(dim));
    const Tensor index = ids_tensor({2, 0, 2, 2, 1}, DType::I64, {5});
    check_gradients([&](const std::vector<Tensor>& in) { return engine::index_select(in[0], dim, index); }, {a});
  }
  // Row 1 picked three times gets three times the gradient; row 0 none.
  Tensor a = random_f64({2, 3}, 9);
  engine::sum(engine::index_select(a, 0, ids_tensor({1, 1, 1}, DType::I32, {3}))).backward();
  require_close(a.grad(), {0, 0, 0, 3, 3, 3}, 0.0);
}

TEST_CASE("index_select rejects bad indices", "[nn_ops]") {
  const Tensor a = random_f64({4, 5}, 3, false);
  REQUIRE_THROWS_WITH(engine::index_select(a, 1, ids_tensor({0, 5}, DType::I64, {2})),
                      Catch::Contains("index 5") && Catch::Contains("5 rows"));
  REQUIRE_THROWS_WITH(engine::index_select(a, 0, ids_tensor({-1}, DType::I32, {1})), Catch::Contains("index -1"));
  REQUIRE_THROWS_AS(engine::index_select(a, 0, Tensor::zeros({2}, DType::F32)), engine::Error);      // float index
  REQUIRE_THROWS_AS(engine::index_select(a, 0, ids_tensor({0, 1}, DType::I64, {1, 2})), engine::Error);  // 2-D
  REQUIRE_THROWS_AS(engine::index_select(a, 2, ids_tensor({0}, DType::I64, {1})), engine::Error);  // no dim 2
}

// ------------------------------------------------------------------ embedding

TEST_CASE("embedding looks up rows for ids of any shape", "[nn_ops]") {
  const Tensor weight = random_f64({6, 4}, 4, false);
  const Dense w(weight);
  const std::vector<int64_t> ids{5, 0, 3, 3, 1, 5};
  for (DType dtype : {DType::I32, DType::I64}) {
    const Tensor out = engine::embedding(weight, ids_tensor(ids, dtype, {2, 3}));
    REQUIRE(out.shape() == Shape{2, 3, 4});
    std::vector<double> expected;
    for (int64_t id : ids)
      for (int64_t c = 0; c < 4; ++c) expected.push_back(w.at({id, c}));
    require_close(out, expected, 0.0);
  }
  const Tensor scalar_id = engine::embedding(weight, ids_tensor({2}, DType::I64, {}));
  REQUIRE(scalar_id.shape() == Shape{4});
  require_close(scalar_id, {w.at({2, 0}), w.at({2, 1}), w.at({2, 2}), w.at({2, 3})}, 0.0);
}

TEST_CASE("embedding backward, errors, and frozen weights", "[nn_ops]") {
  Tensor weight = random_f64({6, 4}, 5);
  const Tensor ids = ids_tensor({5, 0, 3, 3, 1, 5}, DType::I32, {3, 2});
  check_gradients([&](const std::vector<Tensor>& in) { return engine::embedding(in[0], ids); }, {weight});

  REQUIRE_THROWS_WITH(engine::embedding(weight, ids_tensor({0, 9}, DType::I64, {2})),
                      Catch::Contains("index 9") && Catch::Contains("6 rows"));
  REQUIRE_THROWS_AS(engine::embedding(random_f64({6}, 5), ids), engine::Error);  // weight not [V, C]
  REQUIRE_THROWS_AS(engine::embedding(weight, Tensor::zeros({2}, DType::F64)), engine::Error);

  const Tensor frozen = random_f64({6, 4}, 6, false);
  REQUIRE_FALSE(engine::embedding(frozen, ids).requires_grad());
}

TEST_CASE("index_add is race-free with many repeated ids on several threads", "[nn_ops]") {
  // Two threads even on a one-core machine; restored however the test ends.
  struct ThreadCount {
    int previous = engine::num_threads();
    ThreadCount() { engine::set_num_threads(2); }
    ~ThreadCount() { engine::set_num_threads(previous); }
  } two_threads;
  const int64_t vocab = 3, count = 100000, width = 37;  // width: not a multiple of the column block
  std::vector<int64_t> ids(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) ids[size_t(i)] = (i * 7 + i / 5) % vocab;
  const Tensor upstream = random_f64({count, width}, 8, false);
  const Dense g(upstream);
  std::vector<double> expected(size_t(vocab * width), 0.0);
  for (int64_t i = 0; i < count; ++i)
    for (int64_t c = 0; c < width; ++c) expected[size_t(ids[size_t(i)] * width + c)] += g.at({i, c});
  // Lost updates from a race show up only when the threads overlap in time,
  // so the scatter runs several times.
  for (int attempt = 0; attempt < 10; ++attempt) {
    Tensor weight = random_f64({vocab, width}, 7);
    engine::embedding(weight, ids_tensor(ids, DType::I64, {count})).backward(upstream);
    require_close(weight.grad(), expected, 1e-9);
  }
}

// ------------------------------------------------------------------ layer_norm

namespace {

std::vector<double> naive_layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
  const std::vector<double> xs = x.contiguous().to_vector<double>(), w = weight.to_vector<double>(),
                            b = bias.to_vector<double>();
  const size_t C = w.size();
  std::vector<double> out(xs.size());
  for (size_t row = 0; row < xs.size() / C; ++row) {
    double mean = 0, var = 0;
    for (size_t c = 0; c < C; ++c) mean += xs[row * C + c] / double(C);
    for (size_t c = 0; c < C; ++c) var += (xs[row * C + c] - mean) * (xs[row * C + c] - mean) / double(C);
    for (size_t c = 0; c < C; ++c)
      out[row * C + c] = (xs[row * C + c] - mean) / std::sqrt(var + eps) * w[c] + b[c];
  }
  return out;
}

}  // namespace

TEST_CASE("layer_norm matches a naive reference", "[nn_ops]") {
  const Tensor weight = random_f64({7}, 11, false), bias = random_f64({7}, 12, false);
  const Tensor x = random_f64({3, 5, 7}, 13, false);
  require_close(engine::layer_norm(x, weight, bias, 1e-5), naive_layer_norm(x, weight, bias, 1e-5), 1e-12);
  // A non-contiguous input, and a large eps that visibly enters the sqrt.
  const Tensor xt = random_f64({3, 7, 5}, 14, false).transpose(1, 2);
  require_close(engine::layer_norm(xt, weight, bias, 0.5), naive_layer_norm(xt, weight, bias, 0.5), 1e-12);
  // f32 against the f64 reference on the same values.
  const Tensor x32 = random_f32({4, 33}, 15, -3, 3), w32 = random_f32({33}, 16), b32 = random_f32({33}, 17);
  require_close(engine::layer_norm(x32, w32, b32), naive_layer_norm(x32, w32, b32, 1e-5), 2e-5);
}

TEST_CASE("layer_norm in f32 is accurate for rows with a large mean", "[nn_ops]") {
  // E[x^2] - E[x]^2 would cancel catastrophically here; the centred variance does not.
  const Tensor x = engine::add(random_f32({8, 1280}, 18), 3000.0);
  const Tensor weight = Tensor::ones({1280}), bias = Tensor::zeros({1280});
  require_close(engine::layer_norm(x, weight, bias), naive_layer_norm(x, weight, bias, 1e-5), 2e-3);
}

TEST_CASE("layer_norm backward matches finite differences", "[nn_ops]") {
  Tensor x = random_f64({3, 5, 7}, 21), weight = random_f64({7}, 22), bias = random_f64({7}, 23);
  auto f = [](const std::vector<Tensor>& in) { return engine::layer_norm(in[0], in[1], in[2], 1e-5); };
  check_gradients(f, {x, weight, bias});
  // A trainable weight with a frozen bias.
  Tensor w2 = random_f64({7}, 24), frozen_bias = random_f64({7}, 25, false), x2 = random_f64({4, 7}, 26);
  check_gradients(f, {x2, w2, frozen_bias});
  REQUIRE_FALSE(frozen_bias.grad().defined());
}

TEST_CASE("layer_norm with frozen weight and bias computes only the input gradient", "[nn_ops]") {
  Tensor x = random_f64({6, 9}, 31);
  const Tensor weight = random_f64({9}, 32, false), bias = random_f64({9}, 33, false);
  check_gradients([](const std::vector<Tensor>& in) { return engine::layer_norm(in[0], in[1], in[2]); },
                  {x, weight, bias});
  REQUIRE(x.grad().defined());
  REQUIRE_FALSE(weight.grad().defined());
  REQUIRE_FALSE(bias.grad().defined());

  // The kernel itself, handed no dweight/dbias, gives the same dx as with them.
  const Tensor dy = random_f64({6, 9}, 34, false);
  auto run_kernel = [&](bool with_parameter_grads) {
    Tensor mean = Tensor::empty({6}, DType::F64), rstd = Tensor::empty({6}, DType::F64);
    Tensor y = Tensor::empty({6, 9}, DType::F64), dx = Tensor::empty({6, 9}, DType::F64);
    Tensor dw = Tensor::empty({9}, DType::F64), db = Tensor::empty({9}, DType::F64);
    auto& cpu = engine::cpu_backend();
    cpu.layer_norm_forward(view_of(y), view_of(mean), view_of(rstd), view_of(x), view_of(weight), view_of(bias), 1e-5);
    cpu.layer_norm_backward(view_of(dx), with_parameter_grads ? view_of(dw) : engine::View{},
                            with_parameter_grads ? view_of(db) : engine::View{}, view_of(dy), view_of(x),
                            view_of(weight), view_of(mean), view_of(rstd), engine::View{});
    return dx.to_vector<double>();
  };
  require_close(Tensor::from_vector(run_kernel(false), {6, 9}), run_kernel(true), 0.0);
}

TEST_CASE("layer_norm's backward adds a residual gradient as a separate add would", "[nn_ops]") {
  for (DType dtype : {DType::F64, DType::F32}) {
    const Tensor x = random_f64({6, 9}, 31, false).to(dtype), w = random_f64({9}, 32, false).to(dtype);
    const Tensor b = random_f64({9}, 33, false).to(dtype), dy = random_f64({6, 9}, 34, false).to(dtype);
    const Tensor residual = random_f64({6, 9}, 35, false).to(dtype);
    const engine::DType stats = dtype == DType::F64 ? DType::F64 : DType::F32;
    Tensor mean = Tensor::empty({6}, stats), rstd = Tensor::empty({6}, stats), y = Tensor::empty({6, 9}, dtype);
    Tensor dx = Tensor::empty({6, 9}, dtype), folded = Tensor::empty({6, 9}, dtype);
    auto& cpu = engine::cpu_backend();
    cpu.layer_norm_forward(view_of(y), view_of(mean), view_of(rstd), view_of(x), view_of(w), view_of(b), 1e-5);
    cpu.layer_norm_backward(view_of(dx), {}, {}, view_of(dy), view_of(x), view_of(w), view_of(mean), view_of(rstd),
                            {});
    cpu.layer_norm_backward(view_of(folded), {}, {}, view_of(dy), view_of(x), view_of(w), view_of(mean),
                            view_of(rstd), view_of(residual));
    require_close(folded, engine::add(residual, dx).to_vector<double>(), 0.0);
  }
  // In a residual block, h's gradient from the skip path reaches layer norm's backward, which adds it.
  check_gradients(
      [](const std::vector<Tensor>& in) {
        const Tensor h = engine::mul(in[0], 1.5);
        return engine::add(h, engine::mul(engine::layer_norm(h, in[1], in[2]), 3.0));
      },
      {random_f64({6, 9}, 36), random_f64({9}, 37), random_f64({9}, 38)});
}

TEST_CASE("layer_norm rejects bad arguments", "[nn_ops]") {
  const Tensor x = random_f64({2, 7}, 41, false), w = random_f64({7}, 42, false), b = random_f64({7}, 43, false);
  REQUIRE_THROWS_AS(engine::layer_norm(x, random_f64({6}, 44, false), b), engine::Error);
  REQUIRE_THROWS_AS(engine::layer_norm(x, w, random_f64({7, 1}, 45, false)), engine::Error);
  REQUIRE_THROWS_AS(engine::layer_norm(x, w, Tensor()), engine::Error);
  REQUIRE_THROWS_AS(engine::layer_norm(x, w.to(DType::F32), b), engine::Error);
  REQUIRE_THROWS_AS(engine::layer_norm(Tensor::zeros({2, 7}, DType::I32), w, b), engine::Error);
}

// -------------------------------------------------------------------- gelu_new

TEST_CASE("gelu_new matches the tanh formula in f64 and f32", "[nn_ops]") {
  const Tensor x = engine::mul(random_f64({3, 7, 5}, 51, false), 6.0).transpose(1, 2);  // non-contiguous
  std::vector<double> expected;
  for (double v : x.contiguous().to_vector<double>()) expected.push_back(naive_gelu(v));
  require_close(engine::gelu_new(x), expected, 1e-13);

  // f32, including values where the exp overflows or underflows.
  std::vector<float> values{-1e4f, -60.0f, -20.0f, -5.5f, -1e-3f, 0.0f, 1e-3f, 5.5f, 20.0f, 60.0f, 1e4f};
  for (float v : random_f32({200}, 52, -10, 10).to_vector<float>()) values.push_back(v);
  std::vector<double> expected32;
  for (float v : values) expected32.push_back(naive_gelu(double(v)));
  require_close(engine::gelu_new(Tensor::from_vector(values, {int64_t(values.size())})), expected32, 1e-6);
}

TEST_CASE("gelu_new backward matches finite differences", "[nn_ops]") {
  Tensor x = engine::mul(random_f64({4, 9}, 53, false), 4.0).detach();
  x.set_requires_grad(true);
  check_gradients([](const std::vector<Tensor>& in) { return engine::gelu_new(in[0]); }, {x});
  REQUIRE_THROWS_AS(engine::gelu_new(Tensor::zeros({3}, DType::I64)), engine::Error);
}

// ---------------------------------------------------------- softmax, log_softmax

TEST_CASE("softmax and log_softmax match a naive reference along every dim", "[nn_ops]") {
  const Tensor base = engine::mul(random_f64({3, 5, 7}, 61, false), 4.0);
  for (const Tensor& x : {base, base.transpose(0, 1)}) {  // contiguous and not
    for (int64_t dim = 0; dim < 3; ++dim) {
      require_close(engine::softmax(x, dim), naive_softmax(x, dim, false), 1e-12);
      require_close(engine::log_softmax(x, dim), naive_softmax(x, dim, true), 1e-12);
      // Every slice along dim sums to one.
      const Tensor sums = engine::sum(engine::softmax(x, dim), {dim});
      require_close(sums, std::vector<double>(size_t(sums.numel()), 1.0), 1e-12);
    }
  }
  require_close(engine::softmax(base, -1), naive_softmax(base, 2, false), 1e-12);
}

TEST_CASE("softmax is stable for large logits in f32", "[nn_ops]") {
  const Tensor x = Tensor::from_vector(std::vector<float>{1000, 1001, 999, -1000, 1e4f, 1e4f, 1e4f, 1e4f}, {2, 4});
  require_close(engine::softmax(x), naive_softmax(x, 1, false), 1e-6);
  require_close(engine::log_softmax(x), naive_softmax(x, 1, true), 1e-6);
  for (double v : engine::log_softmax(x).to_vector<double>()) REQUIRE(std::isfinite(v));
  // A 50k-wide row, as a GPT-2 vocabulary: still sums to one in f32.
  const Tensor wide = random_f32({1, 50257}, 62, -20, 20);
  REQUIRE(engine::sum(engine::softmax(wide)).item() == Approx(1.0).epsilon(1e-5));
}

TEST_CASE("softmax and log_softmax backward match finite differences", "[nn_ops]") {
  for (int64_t dim : {0, 2}) {
    Tensor x = random_f64({3, 4, 5}, 63 + uint64_t(dim));
    check_gradients([dim](const std::vector<Tensor>& in) { return engine::softmax(in[0], dim); }, {x});
    check_gradients([dim](const std::vector<Tensor>& in) { return engine::log_softmax(in[0], dim); }, {x});
  }
  REQUIRE_THROWS_AS(engine::softmax(random_f64({3, 4}, 65, false), 2), engine::Error);
}

// --------------------------------------------------------------- cross_entropy

namespace {

// Per-row losses by a naive log-sum-exp loop; ignored rows give 0.
std::vector<double> naive_cross_entropy_rows(const Tensor& logits, const std::vector<int64_t>& targets,
                                             int64_t ignore_index) {
  const Dense x(logits);
  std::vector<double> out;
  for (int64_t i = 0; i < logits.size(0); ++i) {
    if (targets[size_t(i)] == ignore_index) {
      out.push_back(0);
      continue;
    }
    double max = -INFINITY, sum = 0;
    for (int64_t k = 0; k < logits.size(1); ++k) max = std::max(max, x.at({i, k}));
    for (int64_t k = 0; k < logits.size(1); ++k) sum += std::exp(x.at({i, k}) - max);
    out.push_back(max + std::log(sum) - x.at({i, targets[size_t(i)]}));
  }
  return out;
}

}  // namespace

TEST_CASE("cross_entropy matches a naive loop for every reduction, with ignored targets", "[nn_ops]") {
  const Tensor logits = engine::mul(random_f64({6, 5}, 71, false), 3.0);
  struct Case {
    std::vector<int64_t> targets;
    int64_t ignore_index;
  };
  for (const Case& c : {Case{{0, 4, -100, 2, 2, -100}, -100}, Case{{0, 4, 2, 1, 2, 3}, 2}}) {
    const std::vector<double> rows = naive_cross_entropy_rows(logits, c.targets, c.ignore_index);
    double total = 0;
    int64_t counted = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
      total += rows[i];
      counted += c.targets[i] != c.ignore_index;
    }
    for (DType dtype : {DType::I32, DType::I64}) {
      const Tensor targets = ids_tensor(c.targets, dtype, {6});
      const Tensor none = engine::cross_entropy(logits, targets, c.ignore_index, Reduction::None);
      REQUIRE(none.shape() == Shape{6});
      require_close(none, rows, 1e-12);
      require_close(engine::cross_entropy(logits, targets, c.ignore_index, Reduction::Sum), {total}, 1e-12);
      require_close(engine::cross_entropy(logits, targets, c.ignore_index, Reduction::Mean),
                    {total / double(counted)}, 1e-12);
    }
  }
  // Large f32 logits stay finite and exact.
  const Tensor big = Tensor::from_vector(std::vector<float>{1000, 1002, 995, -1000, 0, 3000}, {2, 3});
  const std::vector<int64_t> targets{1, 0};
  require_close(engine::cross_entropy(big, ids_tensor(targets, DType::I64, {2}), -100, Reduction::None),
                naive_cross_entropy_rows(big, targets, -100), 1e-6);
}

TEST_CASE("cross_entropy backward matches finite differences", "[nn_ops]") {
  const Tensor targets = ids_tensor({0, 4, -100, 2, 2}, DType::I64, {5});
  for (Reduction reduction : {Reduction::None, Reduction::Mean, Reduction::Sum}) {
    Tensor logits = random_f64({5, 6}, 72);
    check_gradients(
        [&](const std::vector<Tensor>& in) { return engine::cross_entropy(in[0], targets, -100, reduction); },
        {logits});
    const std::vector<double> grad = logits.grad().to_vector<double>();
    for (size_t k = 12; k < 18; ++k) REQUIRE(grad[k] == 0.0);  // the ignored row
  }
}

TEST_CASE("cross_entropy with every target ignored: NaN mean, zero sum and gradient", "[nn_ops]") {
  Tensor logits = random_f64({3, 4}, 73);
  const Tensor targets = ids_tensor({-100, -100, -100}, DType::I32, {3});
  const Tensor mean = engine::cross_entropy(logits, targets);
  REQUIRE(std::isnan(mean.item()));  // 0 / 0, as torch
  REQUIRE(engine::cross_entropy(logits, targets, -100, Reduction::Sum).item() == 0.0);
  mean.backward();
  require_close(logits.grad(), std::vector<double>(12, 0.0), 0.0);
}

TEST_CASE("cross_entropy rejects bad targets and shapes", "[nn_ops]") {
  const Tensor logits = random_f64({3, 5}, 74, false);
  REQUIRE_THROWS_WITH(engine::cross_entropy(logits, ids_tensor({0, 5, 1}, DType::I64, {3})),
                      Catch::Contains("target 5") && Catch::Contains("5 classes"));
  REQUIRE_THROWS_WITH(engine::cross_entropy(logits, ids_tensor({0, -1, 1}, DType::I32, {3})),
                      Catch::Contains("target -1"));
  REQUIRE_THROWS_AS(engine::cross_entropy(logits, ids_tensor({0, 1}, DType::I64, {2})), engine::Error);
  REQUIRE_THROWS_AS(engine::cross_entropy(logits, Tensor::zeros({3}, DType::F64)), engine::Error);
  REQUIRE_THROWS_AS(engine::cross_entropy(random_f64({3, 5, 1}, 75, false), ids_tensor({0, 1, 2}, DType::I64, {3})),
                    engine::Error);
}

// --------------------------------------------------------------------- dropout

TEST_CASE("dropout keeps exactly the elements whose Philox uniform is >= p", "[nn_ops]") {
  const double p = 0.3;
  const Tensor x = random_f32({1003}, 81, 0.5, 1.5);  // never zero, odd length
  Generator gen(1234);
  gen.reserve(10);  // a non-zero starting offset
  const uint64_t offset = gen.offset();
  const std::vector<float> y = engine::dropout(x, p, true, gen).to_vector<float>(), xs = x.to_vector<float>();
  REQUIRE(gen.offset() == offset + (1003 + 3) / 4);
  for (size_t i = 0; i < y.size(); ++i) {
    const bool keep = engine::philox_uniform(1234, offset, i) >= p;
    INFO("element " << i);
    REQUIRE(y[i] == (keep ? Approx(xs[i] / (1 - p)).epsilon(1e-6) : Approx(0.0)));
  }
}

TEST_CASE("dropout masks are reproducible per seed and keep about 1 - p", "[nn_ops]") {
  const Tensor ones = Tensor::ones({1 << 20});
  Generator a(42), b(42), c(43);
  const std::vector<float> first = engine::dropout(ones, 0.25, true, a).to_vector<float>();
  REQUIRE(first == engine::dropout(ones, 0.25, true, b).to_vector<float>());   // same seed, same mask
  REQUIRE(first != engine::dropout(ones, 0.25, true, c).to_vector<float>());   // another seed
  REQUIRE(first != engine::dropout(ones, 0.25, true, a).to_vector<float>());   // the offset moved on

  for (double p : {0.1, 0.25, 0.9}) {
    Generator gen(7);
    const std::vector<float> y = engine::dropout(ones, p, true, gen).to_vector<float>();
    const float scaled = float(1 / (1 - p));
    double kept = 0;
    int64_t neither = 0;  // values that are neither dropped nor scaled by 1 / (1 - p)
    for (float v : y) {
      kept += v != 0.0f;
      neither += v != 0.0f && v != scaled;
    }
    REQUIRE(neither == 0);
    // The standard error of the kept fraction is below 3e-4 here.
    REQUIRE(kept / double(y.size()) == Approx(1 - p).margin(0.003));
  }
}

TEST_CASE("dropout backward drops the same elements as the forward", "[nn_ops]") {
  const double p = 0.4;
  Tensor x = engine::add(random_f64({37, 29}, 82, false), 2.0).detach();  // nonzero everywhere
  x.set_requires_grad(true);
  Generator gen(99);
  const Tensor y = engine::dropout(x, p, true, gen);
  y.backward(Tensor::ones({37, 29}, DType::F64));
  const std::vector<double> ys = y.to_vector<double>(), xs = x.to_vector<double>(),
                            grad = x.grad().to_vector<double>();
  int64_t kept = 0;
  for (size_t i = 0; i < ys.size(); ++i) {
    const bool forward_kept = ys[i] != 0.0, backward_kept = grad[i] != 0.0;
    REQUIRE(forward_kept == backward_kept);
    if (backward_kept) REQUIRE(grad[i] == Approx(1 / (1 - p)));
    kept += forward_kept;
  }
  REQUIRE(kept > 0);
  REQUIRE(kept < int64_t(ys.size()));

  // With the generator reset inside f, the mask is fixed and finite differences apply.
  Tensor z = random_f64({5, 7}, 83);
  check_gradients(
      [](const std::vector<Tensor>& in) {
        Generator fixed(5);
        return engine::dropout(in[0], 0.5, true, fixed);
      },
      {z});
}

TEST_CASE("dropout_add is residual + dropout in one pass, with the same draws and gradients", "[nn_ops]") {
  const double p = 0.3;
  for (DType dtype : {DType::F32, DType::F64}) {
    INFO(engine::dtype_name(dtype));
    Tensor r = random_f64({9, 31}, 85, false).to(dtype), x = random_f64({9, 31}, 86, false).to(dtype);
    r.set_requires_grad(true), x.set_requires_grad(true);
    Tensor r2 = r.detach(), x2 = x.detach();
    r2.set_requires_grad(true), x2.set_requires_grad(true);
    Generator a(17), b(17);
    const Tensor y = engine::dropout_add(r, x, p, true, a), want = engine::add(r2, engine::dropout(x2, p, true, b));
    REQUIRE(a.offset() == b.offset());
    // The product is rounded before the add in both, so the sums agree bit for bit.
    testing::require_close(y, want.to_vector<double>(), 0);
    const Tensor up = random_f64({9, 31}, 87, false).to(dtype);
    engine::sum(engine::mul(y, up)).backward();
    engine::sum(engine::mul(want, up)).backward();
    testing::require_close(r.grad(), r2.grad().to_vector<double>(), 0);
    testing::require_close(x.grad(), x2.grad().to_vector<double>(), 0);
  }
  // A bf16 x on an f32 residual: the dropped x is added unrounded (as dropout of the widened x),
  // and x's gradient is the dropped f32 gradient rounded to bf16 once.
  Tensor r = random_f32({9, 31}, 88), x = random_f32({9, 31}, 89).to(DType::BF16);
  x.set_requires_grad(true);
  Generator a(18), b(18);
  const Tensor y = engine::dropout_add(r, x, p, true, a);
  REQUIRE(y.dtype() == DType::F32);
  const Tensor x32 = x.detach().to(DType::F32);
  testing::require_close(y, engine::add(r, engine::dropout(x32, p, true, b)).to_vector<double>(), 0);
  const Tensor up = random_f32({9, 31}, 90);
  engine::sum(engine::mul(y, up)).backward();
  REQUIRE(x.grad().dtype() == DType::BF16);
  Generator c(18);
  const Tensor dropped_up = engine::dropout(up, p, true, c).to(DType::BF16);
  testing::require_close(x.grad().to(DType::F32), dropped_up.to(DType::F32).to_vector<double>(), 0);
  // Finite differences, with the mask fixed by a fresh generator in f; eval mode and a broadcast compose.
  check_gradients(
      [](const std::vector<Tensor>& in) {
        Generator fixed(6);
        return engine::dropout_add(in[0], in[1], 0.5, true, fixed);
      },
      {random_f64({5, 7}, 91), random_f64({5, 7}, 92)});
  Generator g(4);
  testing::require_close(engine::dropout_add(r, x32, p, false, g), engine::add(r, x32).to_vector<double>(), 0);
  REQUIRE(g.offset() == 0);
  const Tensor row = random_f32({31}, 93);
  Generator d(19), e(19);
  testing::require_close(engine::dropout_add(row, x32, p, true, d),
                         engine::add(row, engine::dropout(x32, p, true, e)).to_vector<double>(), 0);
}

TEST_CASE("dropout_add_layer_norm gives dropout_add and layer_norm's values, draws and gradients", "[nn_ops]") {
  // f32 with a bf16 x and a bf16 output (GPT-2 under autocast), f32 throughout, and eval mode (composed).
  // With a frozen weight and bias, the layer norm's backward also drops the gradient for the dropout_add.
  for (const auto& [x_dtype, out, training, frozen] : {std::tuple{DType::BF16, DType::BF16, true, true},
                                                       std::tuple{DType::BF16, DType::BF16, true, false},
                                                       std::tuple{DType::F32, DType::F32, true, true},
                                                       std::tuple{DType::F32, DType::F32, false, false}}) {
    INFO(engine::dtype_name(x_dtype) << " into " << engine::dtype_name(out) << " training " << training << " frozen "
                                     << frozen);
    auto leaves = [&] {
      std::vector<Tensor> t = {random_f32({6, 40}, 94), random_f32({6, 40}, 95).to(x_dtype), random_f32({40}, 96),
                               random_f32({40}, 97)};
      for (size_t i = 0; i < t.size(); ++i) t[i].set_requires_grad(i < 2 || !frozen);
      return t;
    };
    std::vector<Tensor> a = leaves(), b = leaves();
    Generator ga(20), gb(20);
    // With two columns of room after each row of y: the same values.
    const auto [r, y] = engine::dropout_add_layer_norm(a[0], a[1], 0.3, training, ga, a[2], a[3], 1e-5, out, 2);
    const Tensor r2 = engine::dropout_add(b[0], b[1], 0.3, training, gb);
    const Tensor y2 = engine::layer_norm(r2, b[2], b[3], 1e-5, out);
    REQUIRE(ga.offset() == gb.offset());
    REQUIRE(y.dtype() == out);
    REQUIRE(y.strides() == engine::Shape{42, 1});
    testing::require_close(r, r2.to_vector<double>(), 0);
    testing::require_close(y, y2.to_vector<double>(), 0);
    // Both outputs carry gradients: the stream's own (the next residual add) and the norm's.
    const Tensor up_r = random_f32({6, 40}, 98), up_y = random_f32({6, 40}, 99);
    engine::sum(engine::add(engine::mul(r, up_r), engine::mul(y.to(DType::F32), up_y))).backward();
    engine::sum(engine::add(engine::mul(r2, up_r), engine::mul(y2.to(DType::F32), up_y))).backward();
    for (size_t i = 0; i < a.size(); ++i)
      if (a[i].requires_grad()) testing::require_close(a[i].grad(), b[i].grad().to_vector<double>(), 0);
  }
  // As in GPT-2 (tests/residual_chain.h); with a frozen weight the dropout_add takes the dropped gradient
  // the layer norm's backward made.
  for (bool frozen : {true, false}) {
    INFO("frozen " << frozen);
    const std::vector<Tensor> fused = testing::residual_chain(true, engine::Device::cpu(), 6, 40, frozen);
    const std::vector<Tensor> apart = testing::residual_chain(false, engine::Device::cpu(), 6, 40, frozen);
    testing::require_close(fused[0], apart[0].to_vector<double>(), 0);
    testing::require_close(fused[1].to(DType::F32), apart[1].to(DType::F32).to_vector<double>(), 0);
  }
  check_gradients(  // f64, the mask fixed by a fresh generator in f
      [](const std::vector<Tensor>& in) {
        Generator fixed(7);
        const auto [r, y] = engine::dropout_add_layer_norm(in[0], in[1], 0.5, true, fixed, in[2], in[3]);
        return engine::add(r, engine::mul(y, 2.0));
      },
      {random_f64({4, 6}, 100), random_f64({4, 6}, 101), random_f64({6}, 102), random_f64({6}, 103)});
}

TEST_CASE("dropout in eval mode or with p = 0 is the identity; bad p is an error", "[nn_ops]") {
  const Tensor x = random_f32({4, 6}, 84);
  Generator gen(3);
  REQUIRE(engine::dropout(x, 0.5, false, gen).same(x));
  REQUIRE(engine::dropout(x, 0.0, true, gen).same(x));
  REQUIRE(gen.offset() == 0);  // no random numbers drawn
  // A non-contiguous input drops the same elements as its contiguous copy.
  Generator g1(8), g2(8);
  const Tensor xt = x.transpose(0, 1);
  REQUIRE(engine::dropout(xt, 0.5, true, g1).to_vector<float>() ==
          engine::dropout(xt.contiguous(), 0.5, true, g2).to_vector<float>());
  REQUIRE_THROWS_AS(engine::dropout(x, 1.0, true, gen), engine::Error);
  REQUIRE_THROWS_AS(engine::dropout(x, -0.1, true, gen), engine::Error);
  REQUIRE_THROWS_AS(engine::dropout(x, std::nan(""), true, gen), engine::Error);
}
