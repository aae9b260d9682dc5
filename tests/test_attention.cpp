// scaled_dot_product_attention: the fused kernel against naive loops over
// B, H, T, T (forward), finite differences and a composed reference built from
// engine ops (backward), and its argument checks.
#include "engine/ops.h"
#include "engine/rng.h"
#include "tests/gradcheck.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

using engine::DType;
using engine::Shape;
using engine::Tensor;

namespace {

// Which keys of each batch row are real (1) or padding (0).
enum class Padding { None, Left, Right, Holes, FullRow };

// Row b pads b + 1 keys (capped at T), at the start (Left) or end (Right);
// Holes pads every fourth key at a row-dependent phase; FullRow pads the last
// batch row entirely and the first key of every other row.
std::vector<int32_t> make_mask(Padding kind, int64_t B, int64_t T) {
  std::vector<int32_t> mask(size_t(B * T), 1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t pad = std::min(T, b + 1);
      bool keep = true;
      switch (kind) {
        case Padding::None: break;
        case Padding::Left: keep = t >= pad; break;
        case Padding::Right: keep = t < T - pad; break;
        case Padding::Holes: keep = (b + 3 * t) % 4 != 0; break;
        case Padding::FullRow: keep = b != B - 1 && t != 0; break;
      }
      mask[size_t(b * T + t)] = keep ? 1 : 0;
    }
  return mask;
}

Tensor mask_tensor(Padding kind, int64_t B, int64_t T) {
  if (kind == Padding::None) return Tensor();
  return Tensor::from_vector(make_mask(kind, B, T), {B, T});
}

// Dropout as engine/backend.h defines it for attention, one element at a time:
// the probability's flat index in [B, H, Tq, Tk] picks its Philox uniform.
struct NaiveDropout {
  double p = 0;
  uint64_t seed = 0, offset = 0;
  double factor(uint64_t index) const {
    if (p == 0) return 1;
    return engine::philox_uniform16(seed, offset, index) >= p ? 1 / (1 - p) : 0;
  }
};

// Softmax attention by definition, in double, for q [B, H, Tq, D] and k, v
// [B, H, Tk, D]: query t sits at key position t + Tk - Tq. A row with no
// visible key gives zeros (our documented choice).
std::vector<double> naive_attention(const Tensor& q, const Tensor& k, const Tensor& v, const std::vector<int32_t>& mask,
                                    bool causal, double scale, const NaiveDropout& dropout = {}) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  const std::vector<double> qv = q.to_vector<double>(), kv = k.to_vector<double>(), vv = v.to_vector<double>();
  std::vector<double> out(size_t(B * H * Tq * D), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t q_base = (b * H + h) * Tq * D, k_base = (b * H + h) * Tk * D;
      for (int64_t t = 0; t < Tq; ++t) {
        std::vector<double> score(size_t(Tk), -std::numeric_limits<double>::infinity());
        double max_score = -std::numeric_limits<double>::infinity();
        for (int64_t s = 0; s < Tk; ++s) {
          if ((!mask.empty() && mask[size_t(b * Tk + s)] == 0) || (causal && s > t + Tk - Tq)) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += qv[size_t(q_base + t * D + d)] * kv[size_t(k_base + s * D + d)];
          score[size_t(s)] = dot * scale;
          max_score = std::max(max_score, score[size_t(s)]);
        }
        if (max_score == -std::numeric_limits<double>::infinity()) continue;  // no visible key: zeros
        double total = 0;
        for (double& x : score) total += (x = std::exp(x - max_score));
        for (int64_t s = 0; s < Tk; ++s) {
          const double weight = score[size_t(s)] / total * dropout.factor(uint64_t(((b * H + h) * Tq + t) * Tk + s));
          for (int64_t d = 0; d < D; ++d) out[size_t(q_base + t * D + d)] += weight * vv[size_t(k_base + s * D + d)];
        }
      }
    }
  return out;
}

// One configuration; Tk = 0 means Tk = T (self-attention), otherwise T is Tq.
struct Case {
  int64_t B, H, T, D;
  bool causal;
  Padding padding;
  std::optional<double> scale;
  int64_t Tk = 0;

  int64_t keys() const { return Tk ? Tk : T; }
  Shape q_shape() const { return {B, H, T, D}; }
  Shape k_shape() const { return {B, H, keys(), D}; }
};

std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " H=" + std::to_string(c.H) + " Tq=" + std::to_string(c.T) +
         " Tk=" + std::to_string(c.keys()) + " D=" + std::to_string(c.D) + (c.causal ? " causal" : " full") +
         " padding=" + std::to_string(int(c.padding)) + (c.scale ? " scale=" + std::to_string(*c.scale) : "");
}

// The forward cases: T = 1, odd T across one and several 32-row tiles, D = 64
// and odd D, H = 1 and 5, every padding kind, custom scales; then Tq != Tk:
// KV-cache steps (Tq < Tk), and Tq > Tk, where causal rows before Tq - Tk see nothing.
const std::vector<Case> kForwardCases = {
    {1, 1, 1, 64, true, Padding::None, {}},        {2, 1, 1, 5, false, Padding::Left, {}},
    {2, 5, 7, 5, true, Padding::None, {}},         {2, 5, 7, 5, false, Padding::None, {}},
    {3, 1, 33, 64, true, Padding::Left, {}},       {3, 1, 33, 64, false, Padding::Right, {}},
    {2, 3, 33, 5, true, Padding::Holes, {}},       {3, 2, 130, 64, true, Padding::FullRow, {}},
    {2, 2, 130, 64, false, Padding::Holes, 0.3},   {2, 5, 7, 64, true, Padding::Right, 1.7},
    {4, 2, 70, 8, true, Padding::Left, {}},        {2, 1, 65, 1, false, Padding::FullRow, 2.0},
    {2, 3, 1, 64, true, Padding::Left, {}, 7},     {3, 2, 3, 16, true, Padding::Left, {}, 70},
    {2, 1, 40, 5, true, Padding::Holes, {}, 65},   {2, 2, 33, 8, false, Padding::Right, {}, 5},
    {2, 2, 7, 4, true, Padding::None, {}, 3},      {2, 1, 40, 8, true, Padding::Right, 0.5, 33},
};

Tensor random_tensor(const Shape& shape, uint64_t seed, DType dtype) {
  engine::Generator gen(seed);
  return Tensor::randn(shape, gen, 0.0, 1.0, dtype);
}

}  // namespace

TEST_CASE("attention forward matches naive loops", "[attention]") {
  for (DType dtype : {DType::F32, DType::F64}) {
    for (const Case& c : kForwardCases) {
      INFO(describe(c) << " dtype " << engine::dtype_name(dtype));
      Tensor q = random_tensor(c.q_shape(), 1, dtype), k = random_tensor(c.k_shape(), 2, dtype);
      Tensor v = random_tensor(c.k_shape(), 3, dtype);
      Tensor out =
          engine::scaled_dot_product_attention(q, k, v, mask_tensor(c.padding, c.B, c.keys()), c.causal, c.scale);
      REQUIRE(out.shape() == c.q_shape());
      REQUIRE(out.dtype() == dtype);
      const std::vector<int32_t> mask =
          c.padding == Padding::None ? std::vector<int32_t>{} : make_mask(c.padding, c.B, c.keys());
      const double scale = c.scale.value_or(1.0 / std::sqrt(double(c.D)));
      testing::require_close(out, naive_attention(q, k, v, mask, c.causal, scale), dtype == DType::F32 ? 2e-5 : 1e-12);
    }
  }
}

TEST_CASE("attention: a query row that sees no key outputs zeros, not NaN", "[attention]") {
  // Left padding of 3 under causal masking: queries 0..2 of batch row 2 see nothing.
  const int64_t B = 3, H = 2, T = 9, D = 4;
  Tensor q = random_tensor({B, H, T, D}, 4, DType::F32), k = random_tensor({B, H, T, D}, 5, DType::F32);
  Tensor v = random_tensor({B, H, T, D}, 6, DType::F32);
  Tensor out = engine::scaled_dot_product_attention(q, k, v, mask_tensor(Padding::Left, B, T), true);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < D; ++d) {
        const double x = testing::at(out, {2, h, t, d});
        REQUIRE(std::isfinite(x));
        if (t < 3) REQUIRE(x == 0.0);
      }
  REQUIRE(testing::at(out, {2, 0, 3, 0}) != 0.0);  // the first real query does see its own key
}

TEST_CASE("attention: a KV-cache step equals the last rows of full causal attention", "[attention]") {
  // New queries against cached plus new keys, with no mask of their own.
  const int64_t B = 2, H = 3, T = 45, D = 64, steps = 6;
  Tensor q = random_tensor({B, H, T, D}, 28, DType::F64), k = random_tensor({B, H, T, D}, 29, DType::F64);
  Tensor v = random_tensor({B, H, T, D}, 30, DType::F64);
  Tensor mask = mask_tensor(Padding::Left, B, T);
  Tensor full = engine::scaled_dot_product_attention(q, k, v, mask, true);
  Tensor step = engine::scaled_dot_product_attention(q.narrow(2, T - steps, steps), k, v, mask, true);
  testing::require_close(step, full.narrow(2, T - steps, steps).contiguous().to_vector<double>(), 1e-12);
}

TEST_CASE("attention: a NaN score poisons its row instead of being skipped", "[attention]") {
  // A NaN query row makes all its scores NaN; a NaN key row makes one score NaN
  // in every row that sees it (causal: queries 5 and later).
  const int64_t B = 1, H = 2, T = 40, D = 8;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> qv = random_tensor({B, H, T, D}, 25, DType::F32).to_vector<float>();
  std::vector<float> kv = random_tensor({B, H, T, D}, 26, DType::F32).to_vector<float>();
  for (int64_t d = 0; d < D; ++d) {
    qv[size_t(35 * D + d)] = nan;            // head 0, query 35 (second query tile)
    kv[size_t((1 * T + 5) * D + d)] = nan;  // head 1, key 5
  }
  Tensor q = Tensor::from_vector(qv, {B, H, T, D}), k = Tensor::from_vector(kv, {B, H, T, D});
  Tensor v = random_tensor({B, H, T, D}, 27, DType::F32);
  Tensor out = engine::scaled_dot_product_attention(q, k, v, Tensor(), true);
  for (int64_t t = 0; t < T; ++t) {
    INFO("query " << t);
    REQUIRE(std::isnan(testing::at(out, {0, 0, t, 0})) == (t == 35));
    REQUIRE(std::isnan(testing::at(out, {0, 1, t, 0})) == (t >= 5));
  }
}

TEST_CASE("attention accepts GPT-2's permuted views of one c_attn output", "[attention]") {
  const int64_t B = 2, H = 3, T = 11, D = 64;
  Tensor qkv = random_tensor({B, T, 3 * H * D}, 7, DType::F32);
  std::vector<Tensor> parts = engine::split(qkv, H * D, 2);
  auto heads = [&](const Tensor& x) { return x.reshape({B, T, H, D}).permute({0, 2, 1, 3}); };
  Tensor q = heads(parts[0]), k = heads(parts[1]), v = heads(parts[2]);
  REQUIRE(!q.is_contiguous());
  Tensor out = engine::scaled_dot_product_attention(q, k, v, mask_tensor(Padding::Right, B, T), true);
  testing::require_close(out, naive_attention(q, k, v, make_mask(Padding::Right, B, T), true, 1.0 / 8.0), 2e-5);
}

TEST_CASE("packed attention equals q, k, v given apart, value and gradient", "[attention][packed]") {
  // Both read the same c_attn output; the packed op must give the same
  // output and the same gradient of it, here with padding and dropout.
  const int64_t B = 2, H = 3, T = 37, D = 8;
  const Tensor mask = mask_tensor(Padding::Left, B, T);
  auto apart = [&](const Tensor& qkv) {
    std::vector<Tensor> parts = engine::split(qkv, H * D, 2);
    auto heads = [&](const Tensor& x) { return x.reshape({B, T, H, D}).permute({0, 2, 1, 3}); };
    engine::Generator gen(5);
    return engine::scaled_dot_product_attention(heads(parts[0]), heads(parts[1]), heads(parts[2]), mask, true, {},
                                                0.3, &gen);
  };
  auto packed = [&](const Tensor& qkv) {
    engine::Generator gen(5);
    return engine::scaled_dot_product_attention_packed(qkv.reshape({B, T, 3, H, D}).permute({2, 0, 3, 1, 4}), mask,
                                                       true, {}, 0.3, &gen);
  };
  Tensor x1 = testing::random_f64({B, T, 3 * H * D}, 21), x2 = x1.detach().clone();
  x2.set_requires_grad(true);
  const Tensor upstream = testing::random_f64({B, H, T, D}, 22);
  Tensor a = apart(x1), p = packed(x2);
  testing::require_close(p, a.to_vector<double>(), 1e-12);
  a.backward(upstream);
  p.backward(upstream);
  testing::require_close(x2.grad(), x1.grad().to_vector<double>(), 1e-12);
  // And on its own against finite differences, with Tq crossing a tile.
  auto f = [&](const std::vector<Tensor>& x) {
    return engine::scaled_dot_product_attention_packed(x[0], mask_tensor(Padding::Holes, 1, 70), true);
  };
  testing::check_gradients(f, {testing::random_f64({3, 1, 1, 70, 2}, 23)});
}

TEST_CASE("packed attention rejects a tensor that is not [3, B, H, T, D]", "[attention][packed]") {
  using engine::scaled_dot_product_attention_packed;
  CHECK_THROWS_AS(scaled_dot_product_attention_packed(Tensor::zeros({3, 2, 4, 5})), engine::Error);
  CHECK_THROWS_AS(scaled_dot_product_attention_packed(Tensor::zeros({2, 2, 3, 4, 5})), engine::Error);
  CHECK_THROWS_AS(scaled_dot_product_attention_packed(Tensor::zeros({3, 2, 3, 4, 5}), Tensor::ones({2, 5})),
                  engine::Error);
  CHECK_NOTHROW(scaled_dot_product_attention_packed(Tensor::zeros({3, 2, 3, 4, 5}), Tensor::ones({2, 4})));
}

TEST_CASE("attention reads any mask dtype as nonzero = attend", "[attention]") {
  const int64_t B = 2, H = 1, T = 6, D = 3;
  Tensor q = random_tensor({B, H, T, D}, 8, DType::F32), k = random_tensor({B, H, T, D}, 9, DType::F32);
  Tensor v = random_tensor({B, H, T, D}, 10, DType::F32);
  const std::vector<int32_t> keep = make_mask(Padding::Holes, B, T);
  std::vector<float> float_mask;  // 0.5 and -2 must count as "attend", not truncate to 0
  std::vector<int64_t> long_mask;
  std::vector<int32_t> int_mask;  // passed to the kernels as it is: 7 and -1 attend too
  for (size_t i = 0; i < keep.size(); ++i) {
    float_mask.push_back(keep[i] ? (i % 2 ? 0.5f : -2.0f) : 0.0f);
    long_mask.push_back(keep[i] ? int64_t(1) << 33 : 0);
    int_mask.push_back(keep[i] ? (i % 2 ? 7 : -1) : 0);
  }
  const std::vector<double> expected = naive_attention(q, k, v, keep, false, 1.0 / std::sqrt(3.0));
  testing::require_close(engine::scaled_dot_product_attention(q, k, v, Tensor::from_vector(float_mask, {B, T}), false),
                         expected, 2e-5);
  testing::require_close(engine::scaled_dot_product_attention(q, k, v, Tensor::from_vector(long_mask, {B, T}), false),
                         expected, 2e-5);
  testing::require_close(engine::scaled_dot_product_attention(q, k, v, Tensor::from_vector(int_mask, {B, T}), false),
                         expected, 2e-5);
}

TEST_CASE("attention gradients match finite differences", "[attention][gradcheck]") {
  // Small shapes, T = 70 so the backward crosses query and key tiles, and Tq != Tk.
  const std::vector<Case> cases = {
      {2, 2, 5, 3, true, Padding::None, {}},    {2, 2, 5, 3, false, Padding::Holes, {}},
      {3, 1, 6, 4, true, Padding::Left, {}},    {2, 1, 4, 3, true, Padding::FullRow, {}},
      {2, 2, 5, 3, false, Padding::Right, 0.7}, {1, 1, 70, 2, true, Padding::Left, {}},
      {1, 1, 70, 1, false, Padding::Holes, {}}, {2, 2, 2, 3, true, Padding::Left, {}, 6},
      {1, 2, 40, 2, true, Padding::Right, {}, 36}, {2, 1, 6, 3, true, Padding::Holes, {}, 4},
      {2, 1, 5, 3, false, Padding::None, {}, 3},
  };
  for (const Case& c : cases) {
    INFO(describe(c));
    Tensor mask = mask_tensor(c.padding, c.B, c.keys());
    auto f = [&](const std::vector<Tensor>& x) {
      return engine::scaled_dot_product_attention(x[0], x[1], x[2], mask, c.causal, c.scale);
    };
    testing::check_gradients(f, {testing::random_f64(c.q_shape(), 11), testing::random_f64(c.k_shape(), 12),
                                 testing::random_f64(c.k_shape(), 13)});
  }
}

TEST_CASE("attention dropout drops the probabilities the Philox stream names", "[attention][dropout]") {
  // A fresh generator's first draw starts at block 0, so the naive reference
  // can name every element's uniform itself. p = 0.5 drops half of the weights,
  // so a wrong mask, scale or index would move outputs by O(1).
  for (const Case& c : {Case{2, 3, 37, 64, true, Padding::Left, {}}, Case{2, 2, 70, 5, false, Padding::Holes, {}},
                        Case{1, 2, 3, 8, true, Padding::None, {}, 40}}) {
    INFO(describe(c));
    const uint64_t seed = 4242;
    for (double p : {0.1, 0.5}) {
      engine::Generator gen(seed);
      const Tensor q = random_tensor(c.q_shape(), 1, DType::F32), k = random_tensor(c.k_shape(), 2, DType::F32);
      const Tensor v = random_tensor(c.k_shape(), 3, DType::F32);
      const std::vector<int32_t> mask = c.padding == Padding::None ? std::vector<int32_t>{}
                                                                    : make_mask(c.padding, c.B, c.keys());
      const double scale = 1 / std::sqrt(double(c.D));
      Tensor out = engine::scaled_dot_product_attention(q, k, v, mask_tensor(c.padding, c.B, c.keys()), c.causal, {},
                                                        p, &gen);
      testing::require_close(out, naive_attention(q, k, v, mask, c.causal, scale, {p, seed, 0}), 2e-5);
      // The next call draws new blocks, so it drops other probabilities.
      Tensor again = engine::scaled_dot_product_attention(q, k, v, mask_tensor(c.padding, c.B, c.keys()), c.causal,
                                                          {}, p, &gen);
      const std::vector<double> first = out.to_vector<double>(), second = again.to_vector<double>();
      double largest_change = 0;
      for (size_t i = 0; i < first.size(); ++i) largest_change = std::max(largest_change, std::abs(first[i] - second[i]));
      REQUIRE(largest_change > 1e-3);
    }
  }
  // Training switches dropout on explicitly; p = 0 needs no generator.
  const Tensor x = random_tensor({1, 1, 4, 2}, 5, DType::F32);
  REQUIRE_NOTHROW(engine::scaled_dot_product_attention(x, x, x, Tensor(), true, {}, 0.0, nullptr));
  REQUIRE_THROWS_AS(engine::scaled_dot_product_attention(x, x, x, Tensor(), true, {}, 0.1, nullptr), engine::Error);
  engine::Generator gen(1);
  REQUIRE_THROWS_AS(engine::scaled_dot_product_attention(x, x, x, Tensor(), true, {}, 1.0, &gen), engine::Error);
}

TEST_CASE("attention gradients with dropout match finite differences", "[attention][gradcheck][dropout]") {
  // Each evaluation restarts the generator, so every call drops the same entries.
  const std::vector<Case> cases = {
      {2, 2, 5, 3, true, Padding::None, {}}, {1, 1, 70, 2, true, Padding::Left, {}},
      {2, 1, 6, 3, false, Padding::Holes, {}, 4}, {2, 2, 2, 3, true, Padding::Right, {}, 6},
  };
  for (const Case& c : cases) {
    INFO(describe(c));
    Tensor mask = mask_tensor(c.padding, c.B, c.keys());
    auto f = [&](const std::vector<Tensor>& x) {
      engine::Generator gen(77);
      return engine::scaled_dot_product_attention(x[0], x[1], x[2], mask, c.causal, c.scale, 0.4, &gen);
    };
    testing::check_gradients(f, {testing::random_f64(c.q_shape(), 31), testing::random_f64(c.k_shape(), 32),
                                 testing::random_f64(c.k_shape(), 33)});
  }
}

TEST_CASE("attention backward matches a composed reference at GPT-2 head size in f32", "[attention]") {
  // softmax(where(allowed, q k^T * scale, -inf)) v from matmul/where/exp/sum;
  // right padding keeps key 0 visible to every query, so no row is empty.
  const int64_t B = 2, H = 3, T = 130, D = 64;
  const double scale = 0.125;
  const Shape shape{B, H, T, D};
  auto leaf = [&](uint64_t seed) { return random_tensor(shape, seed, DType::F32).set_requires_grad(true); };
  Tensor q = leaf(14), k = leaf(15), v = leaf(16);
  const std::vector<int32_t> mask = make_mask(Padding::Right, B, T);
  std::vector<float> allowed(size_t(B * T * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t s = 0; s < T; ++s) allowed[size_t((b * T + t) * T + s)] = mask[size_t(b * T + s)] && s <= t;
  Tensor allowed_t = Tensor::from_vector(allowed, {B, 1, T, T});
  Tensor weights = random_tensor(shape, 17, DType::F32);

  Tensor fused = engine::scaled_dot_product_attention(q, k, v, Tensor::from_vector(mask, {B, T}), true, scale);
  engine::sum(engine::mul(fused, weights)).backward();
  Tensor dq = q.grad(), dk = k.grad(), dv = v.grad();
  for (Tensor* t : {&q, &k, &v}) t->zero_grad();

  Tensor scores = engine::matmul(q, k.transpose(-1, -2)) * scale;
  scores = engine::where(allowed_t, scores, Tensor::full({}, -1e30, DType::F32));
  Tensor e = engine::exp(scores - engine::max(scores, -1, true).detach());
  Tensor composed = engine::matmul(e / engine::sum(e, {-1}, true), v);
  engine::sum(engine::mul(composed, weights)).backward();

  testing::require_close(fused, composed.to_vector<double>(), 1e-5);
  testing::require_close(dq, q.grad().to_vector<double>(), 1e-4);
  testing::require_close(dk, k.grad().to_vector<double>(), 1e-4);
  testing::require_close(dv, v.grad().to_vector<double>(), 1e-4);
}

TEST_CASE("attention computes only the gradients that are needed", "[attention]") {
  const Shape shape{2, 2, 9, 4};
  Tensor mask = mask_tensor(Padding::Left, 2, 9);
  Tensor weights = random_tensor(shape, 18, DType::F64);
  Tensor q = testing::random_f64(shape, 19), k = testing::random_f64(shape, 20), v = testing::random_f64(shape, 21);
  engine::sum(engine::mul(engine::scaled_dot_product_attention(q, k, v, mask), weights)).backward();
  const std::vector<double> full_dv = v.grad().to_vector<double>();

  Tensor q_frozen = q.detach(), k_frozen = k.detach(), v_only = testing::random_f64(shape, 21);
  engine::sum(engine::mul(engine::scaled_dot_product_attention(q_frozen, k_frozen, v_only, mask), weights)).backward();
  REQUIRE(!q_frozen.grad().defined());
  REQUIRE(!k_frozen.grad().defined());
  testing::require_close(v_only.grad(), full_dv, 1e-12);

  // And the reverse: dq alone, without dk or dv.
  Tensor q_only = testing::random_f64(shape, 19), k2 = k.detach(), v2 = v.detach();
  engine::sum(engine::mul(engine::scaled_dot_product_attention(q_only, k2, v2, mask), weights)).backward();
  testing::require_close(q_only.grad(), q.grad().to_vector<double>(), 1e-12);
  REQUIRE(!v2.grad().defined());
}

TEST_CASE("attention: padded keys and blind queries get exactly zero gradient", "[attention]") {
  const int64_t B = 2, H = 2, T = 7, D = 3;
  const Shape shape{B, H, T, D};
  Tensor q = testing::random_f64(shape, 22), k = testing::random_f64(shape, 23), v = testing::random_f64(shape, 24);
  engine::sum(engine::scaled_dot_product_attention(q, k, v, mask_tensor(Padding::Left, B, T), true)).backward();
  for (int64_t b = 0; b < B; ++b)  // row b pads keys 0..b; under causal masking queries 0..b see nothing
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t <= b; ++t)
        for (int64_t d = 0; d < D; ++d) {
          REQUIRE(testing::at(q.grad(), {b, h, t, d}) == 0.0);
          REQUIRE(testing::at(k.grad(), {b, h, t, d}) == 0.0);
          REQUIRE(testing::at(v.grad(), {b, h, t, d}) == 0.0);
        }
  REQUIRE(testing::at(v.grad(), {0, 0, 1, 0}) != 0.0);
}

TEST_CASE("attention rejects bad arguments", "[attention]") {
  using engine::scaled_dot_product_attention;
  Tensor x = Tensor::zeros({2, 3, 4, 5});
  auto zeros = [](const Shape& shape) { return Tensor::zeros(shape); };
  // Rank other than 4.
  CHECK_THROWS_AS(scaled_dot_product_attention(zeros({3, 4, 5}), zeros({3, 4, 5}), zeros({3, 4, 5})), engine::Error);
  CHECK_THROWS_AS(scaled_dot_product_attention(x, zeros({2, 3, 4, 5, 1}), x), engine::Error);
  // k and v differ, or disagree with q on B, H or D.
  CHECK_THROWS_AS(scaled_dot_product_attention(x, zeros({2, 3, 6, 5}), x), engine::Error);
  CHECK_THROWS_AS(scaled_dot_product_attention(x, x, zeros({2, 3, 4, 6})), engine::Error);
  CHECK_THROWS_AS(scaled_dot_product_attention(x, zeros({1, 3, 4, 5}), zeros({1, 3, 4, 5})), engine::Error);
  CHECK_THROWS_AS(scaled_dot_product_attention(x, zeros({2, 2, 4, 5}), zeros({2, 2, 4, 5})), engine::Error);
  CHECK_THROWS_AS(scaled_dot_product_attention(x, zeros({2, 3, 4, 6}), zeros({2, 3, 4, 6})), engine::Error);
  // The mask must be [B, Tk].
  CHECK_THROWS_AS(scaled_dot_product_attention(x, x, x, Tensor::ones({2, 5})), engine::Error);
  CHECK_THROWS_AS(scaled_dot_product_attention(x, x, x, Tensor::ones({4, 2})), engine::Error);
  CHECK_THROWS_AS(scaled_dot_product_attention(x, x, x, Tensor::ones({8})), engine::Error);
  CHECK_THROWS_AS(scaled_dot_product_attention(x, x, x, Tensor::ones({2, 3, 4})), engine::Error);
  Tensor kv = zeros({2, 3, 9, 5});
  CHECK_THROWS_AS(scaled_dot_product_attention(x, kv, kv, Tensor::ones({2, 4})), engine::Error);  // [B, Tq]
  // Dtypes: mixed, or not floating.
  CHECK_THROWS_AS(scaled_dot_product_attention(x, Tensor::zeros({2, 3, 4, 5}, DType::F64), x), engine::Error);
  Tensor ints = Tensor::zeros({2, 3, 4, 5}, DType::I32);
  CHECK_THROWS_AS(scaled_dot_product_attention(ints, ints, ints), engine::Error);
  CHECK_NOTHROW(scaled_dot_product_attention(x, x, x, Tensor::ones({2, 4})));
  CHECK_NOTHROW(scaled_dot_product_attention(x, kv, kv, Tensor::ones({2, 9})));
}

TEST_CASE("attention with no keys or no queries gives zeros", "[attention]") {
  // Tk = 0: every query sees nothing. Tq = 0: no output, and k, v get zero gradient.
  Tensor q = testing::random_f64({2, 3, 4, 5}, 31), no_keys = testing::random_f64({2, 3, 0, 5}, 32);
  Tensor out = engine::scaled_dot_product_attention(q, no_keys, no_keys);
  REQUIRE(out.shape() == Shape{2, 3, 4, 5});
  testing::require_close(out, std::vector<double>(size_t(out.numel()), 0.0), 0.0);
  engine::sum(out).backward();
  testing::require_close(q.grad(), std::vector<double>(size_t(q.numel()), 0.0), 0.0);

  Tensor no_queries = testing::random_f64({2, 3, 0, 5}, 33), k = testing::random_f64({2, 3, 4, 5}, 34);
  Tensor empty = engine::scaled_dot_product_attention(no_queries, k, k);
  REQUIRE(empty.shape() == Shape{2, 3, 0, 5});
  empty.backward(Tensor::zeros({2, 3, 0, 5}, DType::F64));
  testing::require_close(k.grad(), std::vector<double>(size_t(k.numel()), 0.0), 0.0);
}
