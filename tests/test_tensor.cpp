// Tensor basics: creation, dtypes and casts, views that share storage,
// contiguous(), the Philox stream, printing, and error messages.
#include "engine/backend.h"
#include "engine/ops.h"
#include "engine/rng.h"
#include "tests/gradcheck.h"

#include <catch2/catch.hpp>

#include <cmath>

using engine::DType;
using engine::Shape;
using engine::Tensor;

TEST_CASE("creation fills shapes and values", "[tensor]") {
  Tensor z = Tensor::zeros({2, 3});
  CHECK(z.shape() == Shape{2, 3});
  CHECK(z.strides() == Shape{3, 1});
  CHECK(z.to_vector<float>() == std::vector<float>(6, 0.0f));
  CHECK(Tensor::ones({4}, DType::F64).to_vector<double>() == std::vector<double>(4, 1.0));
  CHECK(Tensor::full({2}, 2.5, DType::F32).to_vector<float>() == std::vector<float>{2.5f, 2.5f});
  CHECK(Tensor::arange(0, 5).to_vector<int64_t>() == std::vector<int64_t>{0, 1, 2, 3, 4});
  CHECK(Tensor::arange(5, 0, -2).to_vector<int64_t>() == std::vector<int64_t>{5, 3, 1});
  CHECK(Tensor::arange(0, 0).numel() == 0);
  Tensor v = Tensor::from_vector<int32_t>({1, 2, 3, 4, 5, 6}, {3, 2});
  CHECK(v.dtype() == DType::I32);
  CHECK(testing::at(v, {2, 1}) == 6);
  Tensor scalar = Tensor::full({}, 7.0);
  CHECK(scalar.dim() == 0);
  CHECK(scalar.item() == 7.0);
}

TEST_CASE("bf16 and f16 conversions round to nearest even", "[tensor][dtype]") {
  // Bit patterns from the IEEE formats: 1.0, -2.5, 65504 (largest f16), 2^-24 (smallest f16 subnormal).
  CHECK(engine::f16_to_float({0x3c00}) == 1.0f);
  CHECK(engine::f16_to_float({0xc100}) == -2.5f);
  CHECK(engine::f16_to_float({0x7bff}) == 65504.0f);
  CHECK(engine::f16_to_float({0x0001}) == std::ldexp(1.0f, -24));
  CHECK(engine::float_to_f16(1.0f).bits == 0x3c00);
  CHECK(engine::float_to_f16(65504.0f).bits == 0x7bff);
  CHECK(engine::float_to_f16(65520.0f).bits == 0x7c00);  // rounds up to +inf
  CHECK(engine::float_to_f16(std::ldexp(1.0f, -24)).bits == 0x0001);
  CHECK(engine::float_to_f16(std::ldexp(1.0f, -26)).bits == 0x0000);  // below half the smallest subnormal
  CHECK(engine::float_to_f16(std::ldexp(3.0f, -25)).bits == 0x0002);  // 1.5 ulp: tie rounds to even (2)
  CHECK(engine::float_to_f16(1.0f + std::ldexp(1.0f, -11)).bits == 0x3c00);  // tie to even (down)
  CHECK(engine::float_to_f16(1.0f + std::ldexp(3.0f, -11)).bits == 0x3c02);  // tie to even (up)
  CHECK(engine::bf16_to_float({0x3f80}) == 1.0f);
  CHECK(engine::float_to_bf16(1.0f).bits == 0x3f80);
  CHECK(engine::float_to_bf16(1.0f + std::ldexp(1.0f, -8)).bits == 0x3f80);  // tie to even
  CHECK(engine::float_to_bf16(1.0f + std::ldexp(3.0f, -8)).bits == 0x3f82);
  CHECK(std::isnan(engine::bf16_to_float(engine::float_to_bf16(NAN))));
  CHECK(std::isnan(engine::f16_to_float(engine::float_to_f16(NAN))));
  // Every finite f16 survives a round trip through f32.
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    engine::f16 h{uint16_t(bits)};
    if (((bits >> 10) & 0x1f) == 0x1f) continue;
    REQUIRE(engine::float_to_f16(engine::f16_to_float(h)).bits == h.bits);
  }
}

TEST_CASE("to(dtype) casts every pair of dtypes", "[tensor][dtype]") {
  Tensor x = Tensor::from_vector<double>({-3, -1.5, 0, 2, 1000}, {5});
  CHECK(x.to(DType::F32).to_vector<double>() == std::vector<double>{-3, -1.5, 0, 2, 1000});
  CHECK(x.to(DType::BF16).to_vector<double>() == std::vector<double>{-3, -1.5, 0, 2, 1000});
  CHECK(x.to(DType::F16).to_vector<double>() == std::vector<double>{-3, -1.5, 0, 2, 1000});
  CHECK(x.to(DType::I32).to_vector<int32_t>() == std::vector<int32_t>{-3, -1, 0, 2, 1000});  // truncation
  CHECK(x.to(DType::I64).to(DType::F64).to_vector<double>() == std::vector<double>{-3, -1, 0, 2, 1000});
  CHECK(x.to(DType::BF16).to(DType::F16).to_vector<double>() == std::vector<double>{-3, -1.5, 0, 2, 1000});
}

TEST_CASE("views share storage; contiguous() copies only when needed", "[tensor][view]") {
  Tensor x = Tensor::arange(0, 24, 1, DType::F32).reshape({2, 3, 4});
  Tensor t = x.transpose(0, 2);  // [4, 3, 2]
  CHECK(t.shape() == Shape{4, 3, 2});
  CHECK_FALSE(t.is_contiguous());
  CHECK(testing::at(t, {3, 1, 1}) == testing::at(x, {1, 1, 3}));
  Tensor c = t.contiguous();
  CHECK(c.is_contiguous());
  CHECK(c.contiguous().same(c));
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 3; ++j)
      for (int64_t k = 0; k < 2; ++k) REQUIRE(testing::at(c, {i, j, k}) == double(k * 12 + j * 4 + i));

  Tensor s = x.slice(2, 1, 4, 2);  // columns 1 and 3
  CHECK(s.shape() == Shape{2, 3, 2});
  CHECK(s.to_vector<float>() == std::vector<float>{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23});
  {
    engine::NoGradGuard no_grad;
    s.fill_(-1);  // writes through the view into x
  }
  CHECK(testing::at(x, {1, 2, 3}) == -1);
  CHECK(testing::at(x, {1, 2, 2}) == 22);

  CHECK(x.select(1, -1).shape() == Shape{2, 4});
  CHECK(x.permute({2, 0, 1}).shape() == Shape{4, 2, 3});
  CHECK(x.unsqueeze(0).shape() == Shape{1, 2, 3, 4});
  CHECK(x.unsqueeze(-1).shape() == Shape{2, 3, 4, 1});
  CHECK(x.flatten(1).shape() == Shape{2, 12});
  CHECK(x.reshape({-1, 4}).shape() == Shape{6, 4});
  CHECK(x.narrow(0, 1, 1).squeeze(0).shape() == Shape{3, 4});
  Tensor e = Tensor::arange(0, 3, 1, DType::F32).reshape({3, 1}).expand({3, 4});
  CHECK(e.strides()[1] == 0);
  CHECK(testing::at(e, {2, 3}) == 2);
  // A transposed tensor can be viewed only where its dims stay contiguous runs.
  CHECK_THROWS_WITH(t.view({24}), Catch::Contains("needs a copy"));
  CHECK(t.reshape({24}).numel() == 24);
  CHECK(x.transpose(1, 2).view({2, 4, 3}).shape() == Shape{2, 4, 3});
}

TEST_CASE("cat and split", "[tensor][view]") {
  Tensor a = Tensor::arange(0, 6, 1, DType::F64).reshape({2, 3});
  Tensor b = Tensor::arange(6, 10, 1, DType::F64).reshape({2, 2});
  Tensor c = engine::cat({a, b}, 1);
  CHECK(c.to_vector<double>() == std::vector<double>{0, 1, 2, 6, 7, 3, 4, 5, 8, 9});
  auto parts = engine::split(c, {3, 2}, -1);
  CHECK(parts[0].to_vector<double>() == a.to_vector<double>());
  CHECK(parts[1].to_vector<double>() == b.to_vector<double>());
  auto even = engine::split(Tensor::arange(0, 7, 1, DType::F64), 3, 0);
  REQUIRE(even.size() == 3);
  CHECK(even[2].to_vector<double>() == std::vector<double>{6});
  CHECK_THROWS_WITH(engine::cat({a, Tensor::zeros({3, 2}, DType::F64)}, 1), Catch::Contains("cat along dim 1"));
}

TEST_CASE("Philox matches the Random123 known-answer vectors", "[rng]") {
  // philox4x32_10 with counter 0 and key 0 (Random123 kat_vectors).
  engine::Philox4 zero = engine::philox4x32_10(0, 0);
  CHECK(zero.v[0] == 0x6627e8d5u);
  CHECK(zero.v[1] == 0xe169c58du);
  CHECK(zero.v[2] == 0xbc57ac4cu);
  CHECK(zero.v[3] == 0x9b00dbd8u);
}

TEST_CASE("the 16-bit stream takes both halves of every word, low half first", "[rng]") {
  // Element i is half i % 2 of word i / 2 % 4 of block offset + i / 8.
  const uint64_t seed = 7, offset = 3;
  for (uint64_t i : {0, 1, 2, 7, 8, 13, 1001}) {
    const uint32_t word = engine::philox4x32_10(seed, offset + i / 8).v[i / 2 % 4];
    const uint32_t half = i % 2 ? word >> 16 : word & 0xFFFFu;
    CHECK(engine::philox_uniform16(seed, offset, i) == float(half) / 65536.0f);
  }
  // Uniform on [0, 1): 2^16 steps, mean 1/2, and as many below 0.1 as expected.
  double sum = 0, below = 0;
  const int n = 400000;
  for (int i = 0; i < n; ++i) {
    const float u = engine::philox_uniform16(seed, 0, uint64_t(i));
    REQUIRE((u >= 0 && u < 1));
    sum += u;
    below += u < 0.1f;
  }
  CHECK(sum / n == Approx(0.5).margin(0.003));
  CHECK(below / n == Approx(0.1).margin(0.003));
  // The kernels' integer form of `uniform >= p` agrees with the float test at
  // and around the threshold, for 16- and 24-bit uniforms.
  for (double p : {0.0, 0.1, 0.3, 0.5, 0.999})
    for (int bits : {16, 24}) {
      const uint32_t threshold = engine::uniform_threshold(p, bits);
      for (uint32_t u : {threshold - 1, threshold, threshold + 1}) {
        if (u >= (1u << bits)) continue;  // threshold 0 wraps below; past the top is no uniform
        CHECK((double(std::ldexp(float(u), -bits)) >= p) == (u >= threshold));
      }
    }
}

TEST_CASE("random draws are reproducible and well distributed", "[rng]") {
  engine::Generator g1(42), g2(42), g3(43);
  Tensor a = Tensor::randn({10001}, g1), b = Tensor::randn({10001}, g2), c = Tensor::randn({10001}, g3);
  CHECK(a.to_vector<float>() == b.to_vector<float>());
  CHECK(a.to_vector<float>() != c.to_vector<float>());
  // Consecutive draws use fresh counters.
  Tensor next1 = Tensor::rand({8}, g1), next2 = Tensor::rand({8}, g2);
  CHECK(next1.to_vector<float>() == next2.to_vector<float>());
  CHECK(Tensor::rand({8}, g1).to_vector<float>() != next1.to_vector<float>());
  std::vector<double> n = Tensor::randn({200000}, g1, 1.0, 2.0, DType::F64).to_vector<double>();
  double mean = 0, var = 0;
  for (double x : n) mean += x;
  mean /= double(n.size());
  for (double x : n) var += (x - mean) * (x - mean);
  var /= double(n.size());
  CHECK(mean == Approx(1.0).margin(0.02));
  CHECK(var == Approx(4.0).epsilon(0.02));
  std::vector<double> u = Tensor::rand({200000}, g1, -2, 2, DType::F64).to_vector<double>();
  double lo = 1e9, hi = -1e9, umean = 0;
  for (double x : u) lo = std::min(lo, x), hi = std::max(hi, x), umean += x;
  CHECK(lo >= -2);
  CHECK(hi < 2);
  CHECK(umean / double(u.size()) == Approx(0).margin(0.02));
}

TEST_CASE("the printer shows values, shape and dtype", "[tensor]") {
  std::string s = Tensor::from_vector<float>({1, 2.5, -3, 4}, {2, 2}).str();
  CHECK(s.find("[[1, 2.5],") != std::string::npos);
  CHECK(s.find("shape=[2, 2], dtype=f32, device=cpu") != std::string::npos);
  std::string longer = Tensor::arange(0, 100, 1, DType::I32).str();
  CHECK(longer.find("[0, 1, 2, ..., 97, 98, 99]") != std::string::npos);
}

TEST_CASE("errors name the op and what was wrong", "[tensor][errors]") {
  Tensor f = Tensor::zeros({2, 3});
  CHECK_THROWS_WITH(engine::add(f, Tensor::zeros({2, 3}, DType::I64)),
                    Catch::Contains("add: operands of different dtypes (f32 and i64)"));
  CHECK_THROWS_WITH(engine::add(f, Tensor::zeros({4})), Catch::Contains("cannot broadcast shapes [2, 3] and [4]"));
  CHECK_THROWS_WITH(f.reshape({4, 2}), Catch::Contains("element counts differ"));
  CHECK_THROWS_WITH(f.transpose(0, 2), Catch::Contains("out of range"));
  if (!engine::cuda_available()) CHECK_THROWS_WITH(f.to(engine::Device::cuda()), Catch::Contains("cuda"));
  CHECK_THROWS_WITH(f.to(engine::Device::cuda(99)), Catch::Contains("cuda:99"));
  CHECK_THROWS_WITH(engine::Device::parse("tpu"), Catch::Contains("unknown device 'tpu'"));
  CHECK_THROWS_WITH(Tensor::zeros({2}, DType::I32).set_requires_grad(true), Catch::Contains("floating"));
  CHECK_THROWS_WITH(Tensor().shape(), Catch::Contains("undefined"));
}
