// matmul, linear, addmm and concat_linear: forward against a naive triple loop
// (2-D, batched, shared weights, transposed views), backward against finite differences.
#include "engine/ops.h"
#include "engine/profiler.h"
#include "tests/gradcheck.h"

#include <catch2/catch.hpp>

using engine::DType;
using engine::Shape;
using engine::Tensor;
using testing::check_gradients;
using testing::random_f64;

namespace {

// out[b, i, j] = sum_k a[b, i, k] * w[b or 0, k, j], from element reads only.
std::vector<double> naive_matmul(const Tensor& a, const Tensor& b) {
  Tensor a3 = a.reshape({-1, a.size(-2), a.size(-1)});
  Tensor b3 = b.dim() == 2 ? b.unsqueeze(0) : b.reshape({-1, b.size(-2), b.size(-1)});
  std::vector<double> out;
  for (int64_t n = 0; n < a3.size(0); ++n)
    for (int64_t i = 0; i < a3.size(1); ++i)
      for (int64_t j = 0; j < b3.size(2); ++j) {
        double acc = 0;
        for (int64_t k = 0; k < a3.size(2); ++k)
          acc += testing::at(a3, {n, i, k}) * testing::at(b3, {b3.size(0) == 1 ? 0 : n, k, j});
        out.push_back(acc);
      }
  return out;
}

}  // namespace

TEST_CASE("matmul matches a naive loop", "[matmul]") {
  for (DType dtype : {DType::F32, DType::F64}) {
    engine::Generator gen(11);
    auto r = [&](const Shape& s) { return Tensor::rand(s, gen, -1, 1, dtype); };
    double tol = dtype == DType::F32 ? 1e-5 : 1e-12;
    Tensor a = r({5, 7}), b = r({7, 3});
    testing::require_close(engine::matmul(a, b), naive_matmul(a, b), tol);
    // Transposed operands reach the GEMM as flags.
    Tensor at = r({7, 5}).transpose(0, 1), bt = r({3, 7}).transpose(0, 1);
    testing::require_close(engine::matmul(at, bt), naive_matmul(at, bt), tol);
    // A shared 2-D weight folds the batch into M; a strided activation does not fold.
    Tensor x = r({2, 3, 4, 7});
    testing::require_close(engine::matmul(x, b), naive_matmul(x, b), tol);
    Tensor xs = r({4, 2, 7}).transpose(0, 1);
    testing::require_close(engine::matmul(xs, b), naive_matmul(xs, b), tol);
    // Batched with equal batch dims, including a batch-transposed operand.
    Tensor p = r({2, 3, 5, 7}), q = r({2, 3, 7, 4});
    testing::require_close(engine::matmul(p, q), naive_matmul(p, q), tol);
    Tensor qt = r({2, 3, 4, 7}).transpose(-1, -2);
    testing::require_close(engine::matmul(p, qt), naive_matmul(p, qt), tol);
    Tensor pp = r({3, 2, 5, 7}).transpose(0, 1);  // batch dims not collapsible: copied
    testing::require_close(engine::matmul(pp, q), naive_matmul(pp, q), tol);
    // Degenerate sizes.
    testing::require_close(engine::matmul(r({1, 1}), r({1, 1})).reshape({1}), naive_matmul(r({1, 1}), r({1, 1})), 2);
    CHECK(engine::matmul(r({0, 4}), r({4, 3})).shape() == Shape{0, 3});
    CHECK(engine::matmul(r({2, 0}), r({0, 3})).to_vector<double>() == std::vector<double>(6, 0.0));
  }
}

TEST_CASE("linear in both weight layouts", "[matmul]") {
  Tensor x = random_f64({2, 3, 4}, 1, false);
  Tensor w_in_out = random_f64({4, 5}, 2, false);
  Tensor bias = random_f64({5}, 3, false);
  Tensor y1 = engine::linear(x, w_in_out, bias, engine::WeightLayout::InOut);
  Tensor y2 = engine::linear(x, w_in_out.transpose(0, 1).contiguous(), bias, engine::WeightLayout::OutIn);
  std::vector<double> want = naive_matmul(x, w_in_out);
  std::vector<double> b = bias.to_vector<double>();
  for (size_t i = 0; i < want.size(); ++i) want[i] += b[i % 5];
  testing::require_close(y1, want, 1e-12);
  testing::require_close(y2, want, 1e-12);
  CHECK_THROWS_WITH(engine::linear(x, w_in_out, bias, engine::WeightLayout::OutIn), Catch::Contains("do not chain"));
  CHECK_THROWS_WITH(engine::linear(x, w_in_out, random_f64({4}, 4), engine::WeightLayout::InOut),
                    Catch::Contains("bias shape [4] for 5 outputs"));
}

TEST_CASE("linear adds its bias inside the GEMM in f32, for batched views and K = 0 too", "[matmul]") {
  engine::Generator gen(5);
  const Tensor w = Tensor::rand({6, 5}, gen, -1, 1), bias = Tensor::rand({5}, gen, -1, 1);
  const Tensor base = Tensor::rand({3, 4, 6}, gen, -1, 1);
  // Contiguous (one folded GEMM) and a permuted view (one GEMM per batch entry).
  for (const Tensor& x : {base, base.permute({1, 0, 2})}) {
    std::vector<double> want = naive_matmul(x, w);
    const std::vector<double> b = bias.to_vector<double>();
    for (size_t i = 0; i < want.size(); ++i) want[i] += b[i % 5];
    testing::require_close(engine::linear(x, w, bias, engine::WeightLayout::InOut), want, 1e-5);
  }
  const Tensor empty = engine::linear(Tensor::zeros({2, 0}), Tensor::zeros({0, 5}), bias, engine::WeightLayout::InOut);
  testing::require_close(empty.select(0, 1), bias.to_vector<double>(), 0);
}

TEST_CASE("linear_gelu equals gelu_new of linear, fused or composed", "[matmul]") {
  engine::Generator gen(6);
  const Tensor x = Tensor::rand({3, 4, 6}, gen, -2, 2), w = Tensor::rand({6, 5}, gen, -1, 1);
  const Tensor bias = Tensor::rand({5}, gen, -1, 1);
  const std::vector<double> want = engine::gelu_new(engine::linear(x, w, bias, engine::WeightLayout::InOut))
                                       .to_vector<double>();
  testing::require_close(engine::linear_gelu(x, w, bias, engine::WeightLayout::InOut), want, 1e-6);
  // Composed paths: no bias, and a permuted input (one GEMM per batch entry).
  testing::require_close(engine::linear_gelu(x, w, Tensor(), engine::WeightLayout::InOut),
                         engine::gelu_new(engine::matmul(x, w)).to_vector<double>(), 1e-6);
  const Tensor xp = x.permute({1, 0, 2});
  testing::require_close(engine::linear_gelu(xp, w, bias, engine::WeightLayout::InOut),
                         engine::gelu_new(engine::linear(xp, w, bias, engine::WeightLayout::InOut)).to_vector<double>(),
                         1e-6);
}

TEST_CASE("linear_gelu_linear equals linear of linear_gelu, fused or composed", "[matmul]") {
  engine::Generator gen(8);
  const Tensor x = Tensor::rand({3, 4, 6}, gen, -2, 2), w1 = Tensor::rand({6, 5}, gen, -1, 1);
  const Tensor b1 = Tensor::rand({5}, gen, -1, 1), w2 = Tensor::rand({5, 7}, gen, -1, 1);
  const Tensor b2 = Tensor::rand({7}, gen, -1, 1);
  const auto in_out = engine::WeightLayout::InOut;
  // Fused, and composed where the first or second layer has no bias.
  for (const auto& [bias1, bias2] : {std::pair{b1, b2}, std::pair{Tensor(), b2}, std::pair{b1, Tensor()}}) {
    const Tensor want = engine::linear(engine::linear_gelu(x, w1, bias1, in_out), w2, bias2, in_out);
    testing::require_close(engine::linear_gelu_linear(x, w1, bias1, w2, bias2, in_out), want.to_vector<double>(),
                           1e-6);
  }
}

TEST_CASE("addmm adds c in the GEMM, for batched views, a transposed weight and K = 0, else composes",
          "[matmul]") {
  engine::Generator gen(7);
  const Tensor w = Tensor::rand({6, 5}, gen, -1, 1), base = Tensor::rand({3, 4, 6}, gen, -1, 1);
  const Tensor c = Tensor::rand({3, 4, 5}, gen, -1, 1);
  const std::vector<double> cv = c.to_vector<double>();
  // Contiguous (one folded GEMM), a permuted view (one GEMM per batch entry), a transposed weight.
  for (const auto& [x, weight] : {std::pair{base, w}, std::pair{base.permute({1, 0, 2}), w},
                                  std::pair{base, w.transpose(0, 1).contiguous().transpose(0, 1)}}) {
    const Tensor addend = x.is_contiguous() ? c : c.permute({1, 0, 2});
    const std::vector<double> av = addend.to_vector<double>();
    std::vector<double> want = naive_matmul(x, weight);
    for (size_t i = 0; i < want.size(); ++i) want[i] += av[i];
    testing::require_close(engine::addmm(addend, x, weight), want, 1e-5);
  }
  // An empty sum leaves c; a broadcast c or another dtype composes add and matmul.
  const Tensor c2 = Tensor::rand({2, 5}, gen, -1, 1);
  testing::require_close(engine::addmm(c2, Tensor::zeros({2, 0}), Tensor::zeros({0, 5})), c2.to_vector<double>(), 0);
  const Tensor row = Tensor::rand({5}, gen, -1, 1);
  testing::require_close(engine::addmm(row, base, w), engine::add(row, engine::matmul(base, w)).to_vector<double>(),
                         0);
  const Tensor c64 = c.to(DType::F64);
  REQUIRE(engine::addmm(c64, base, w).dtype() == DType::F64);  // promoted, as add promotes
  testing::require_close(engine::addmm(c64, base, w), engine::add(c64, engine::matmul(base, w)).to_vector<double>(),
                         0);
  // A bias in the same epilogue (after the addend, as the composed sum adds it), and composed for a broadcast c.
  const Tensor bias = Tensor::rand({5}, gen, -1, 1);
  for (const Tensor& addend : {c, row})
    testing::require_close(engine::addmm(addend, base, w, bias),
                           engine::add(engine::add(addend, engine::matmul(base, w)), bias).to_vector<double>(), 1e-6);
  REQUIRE_THROWS_WITH(engine::addmm(c, base, w, Tensor::zeros({4})), "addmm: bias shape [4] for 5 outputs");
}

TEST_CASE("concat_linear is one GEMM over x's room and stacked weights, otherwise two, with the same values",
          "[matmul]") {
  engine::Generator gen(11);
  const Tensor x0 = Tensor::rand({2, 3, 6}, gen, -1, 1), ln_w = Tensor::rand({6}, gen, -1, 1);
  const Tensor ln_b = Tensor::rand({6}, gen, -1, 1), extra = Tensor::rand({2, 3, 2}, gen, -1, 1);
  const Tensor stacked = Tensor::rand({8, 5}, gen, -1, 1), bias = Tensor::rand({5}, gen, -1, 1);
  const Tensor w = stacked.narrow(0, 0, 6), w_extra = stacked.narrow(0, 6, 2);
  const Tensor roomy = engine::layer_norm(x0, ln_w, ln_b, 1e-5, {}, 2), plain = engine::layer_norm(x0, ln_w, ln_b);
  REQUIRE(roomy.strides() == Shape{24, 8, 1});  // rows 6 + 2 apart
  testing::require_close(roomy, plain.to_vector<double>(), 0);
  std::vector<double> want = naive_matmul(plain, w);
  const std::vector<double> update = naive_matmul(extra, w_extra), b = bias.to_vector<double>();
  for (size_t i = 0; i < want.size(); ++i) want[i] += update[i] + b[i % 5];
  // x with room and [w; w_extra] in one buffer: one GEMM. No room, or the weights apart: two.
  for (const auto& [x, w1, one_gemm] : {std::tuple{roomy, w, true}, std::tuple{plain, w, false},
                                        std::tuple{roomy, w.contiguous().clone(), false}}) {
    engine::Profiler profiler;
    testing::require_close(engine::concat_linear(x, extra, w1, w_extra, bias), want, 1e-5);
    CHECK((profiler.calls("gemm") == 1) == one_gemm);  // (an addend counts twice on the CPU: copy, then GEMM)
  }
  // [w; w_extra; bias; 0] in one buffer (joint_rows: 6 + 2 + 1, then zeros up to 16) and x with room for 10
  // columns: the bias is one more row of the one GEMM, against a column of ones written into the room.
  REQUIRE(engine::joint_rows(6, 2) == 16);
  const Tensor padded = Tensor::zeros({16, 5});
  padded.narrow(0, 0, 8).copy_(stacked);
  padded.narrow(0, 8, 1).copy_(bias.reshape({1, 5}));
  const Tensor roomier = engine::layer_norm(x0, ln_w, ln_b, 1e-5, {}, 10);
  {
    engine::Profiler profiler;
    testing::require_close(engine::concat_linear(roomier, extra, padded.narrow(0, 0, 6), padded.narrow(0, 6, 2),
                                                 padded.narrow(0, 8, 1).reshape({5})),
                           want, 1e-5);
    CHECK(profiler.calls("gemm") == 1);
  }
  const Tensor no_bias = engine::concat_linear(roomy, extra, w, w_extra);
  const Tensor sum = engine::add(engine::matmul(plain, w), engine::matmul(extra, w_extra));
  testing::require_close(no_bias, sum.to_vector<double>(), 1e-5);
  REQUIRE_THROWS_WITH(engine::concat_linear(roomy, extra, w, Tensor::zeros({2, 4})),
                      "concat_linear: weights of shapes [6, 5] and [2, 4] do not stack");
  REQUIRE_THROWS_WITH(engine::concat_linear(roomy, Tensor::zeros({3, 2}), w, w_extra),
                      "concat_linear: inputs of shapes [2, 3, 6] and [3, 2] do not sit side by side");
}

TEST_CASE("concat_linear gradients match finite differences, in one GEMM or two", "[matmul][grad]") {
  using V = const std::vector<Tensor>&;
  const Tensor ln_w = random_f64({6}, 5, false), ln_b = random_f64({6}, 6, false);
  for (const int64_t room : {10, 2, 0}) {  // the bias as a row of the GEMM, in its epilogue, two GEMMs
    INFO("room " << room);
    const Tensor stacked = Tensor::zeros({16, 5}, DType::F64);  // [w; w_extra; bias; 0]
    stacked.narrow(0, 0, 9).copy_(random_f64({9, 5}, 3, false));
    Tensor w = stacked.narrow(0, 0, 6).detach(), w_extra = stacked.narrow(0, 6, 2).detach();
    Tensor bias = stacked.narrow(0, 8, 1).reshape({5}).detach();
    for (Tensor* t : {&w, &w_extra, &bias}) t->set_requires_grad(true);
    check_gradients(
        [&](V in) {
          return engine::concat_linear(engine::layer_norm(in[0], ln_w, ln_b, 1e-5, {}, room), in[1], in[2], in[3],
                                       in[4]);
        },
        {random_f64({2, 3, 6}, 1), random_f64({2, 3, 2}, 2), w, w_extra, bias});
    // CURLoRA's shape, frozen [W; R; b; 0]: x feeds both products, extra = (x C) U. With room, the one GEMM's
    // backward hands x a gradient with spare columns after each row, which x C's backward adds to.
    const Tensor frozen = stacked.detach().clone();
    check_gradients(
        [&](V in) {
          const Tensor x = engine::layer_norm(in[0], ln_w, ln_b, 1e-5, {}, room);
          const Tensor t2 = engine::matmul(engine::matmul(x, in[1]), in[2]);
          return engine::concat_linear(x, t2, frozen.narrow(0, 0, 6), frozen.narrow(0, 6, 2),
                                       frozen.narrow(0, 8, 1).reshape({5}));
        },
        {random_f64({2, 3, 6}, 1), random_f64({6, 2}, 2), random_f64({2, 2}, 3)});
  }
}

TEST_CASE("matmul gradients match finite differences", "[matmul][grad]") {
  using V = const std::vector<Tensor>&;
  check_gradients([](V in) { return engine::matmul(in[0], in[1]); }, {random_f64({3, 4}, 1), random_f64({4, 5}, 2)});
  check_gradients([](V in) { return engine::matmul(in[0], in[1]); }, {random_f64({2, 3, 4}, 1), random_f64({4, 2}, 2)});
  check_gradients([](V in) { return engine::matmul(in[0], in[1]); },
                  {random_f64({2, 3, 4}, 1), random_f64({2, 4, 2}, 2)});
  check_gradients([](V in) { return engine::matmul(in[0].transpose(0, 1), in[1].transpose(0, 1)); },
                  {random_f64({4, 3}, 1), random_f64({5, 4}, 2)});
  check_gradients([](V in) { return engine::linear(in[0], in[1], in[2], engine::WeightLayout::OutIn); },
                  {random_f64({2, 3, 4}, 1), random_f64({5, 4}, 2), random_f64({5}, 3)});
  check_gradients([](V in) { return engine::linear_gelu(in[0], in[1], in[2], engine::WeightLayout::InOut); },
                  {random_f64({2, 3, 4}, 1), random_f64({4, 5}, 2), random_f64({5}, 3)});
  check_gradients(
      [](V in) { return engine::linear_gelu_linear(in[0], in[1], in[2], in[3], in[4], engine::WeightLayout::OutIn); },
      {random_f64({2, 3, 4}, 1), random_f64({5, 4}, 2), random_f64({5}, 3), random_f64({3, 5}, 4),
       random_f64({3}, 5)});
  check_gradients(  // frozen weights, as GPT-2's under an adapter: dX alone, through both GEMMs' epilogues
      [](V in) { return engine::linear_gelu_linear(in[0], in[1], in[2], in[3], in[4], engine::WeightLayout::InOut); },
      {random_f64({3, 4}, 1), random_f64({4, 5}, 2, false), random_f64({5}, 3, false), random_f64({5, 3}, 4, false),
       random_f64({3}, 5, false)});
  check_gradients([](V in) { return engine::addmm(in[0], in[1], in[2]); },
                  {random_f64({2, 3, 5}, 1), random_f64({2, 3, 4}, 2), random_f64({4, 5}, 3)});
  check_gradients([](V in) { return engine::addmm(in[0], in[1], in[2], in[3]); },
                  {random_f64({2, 3, 5}, 1), random_f64({2, 3, 4}, 2), random_f64({4, 5}, 3), random_f64({5}, 4)});
  check_gradients([](V in) { return engine::addmm(in[0], in[1].permute({1, 0, 2}), in[2].transpose(0, 1)); },
                  {random_f64({3, 2, 5}, 1), random_f64({2, 3, 4}, 2), random_f64({5, 4}, 3)});
}

TEST_CASE("a shared input's gradients are summed in its last product's GEMM", "[matmul][grad]") {
  using V = const std::vector<Tensor>&;
  // h feeds two products (a plain and a transposed weight): the second backward to run adds the first
  // one's dh as its GEMM's addend. Through a permuted view, dh comes back strided and is added apart.
  check_gradients(
      [](V in) {
        const Tensor h = engine::mul(in[0], 1.5);
        return engine::add(engine::matmul(h, in[1]), engine::linear(h, in[2], Tensor(), engine::WeightLayout::OutIn));
      },
      {random_f64({2, 3, 4}, 1), random_f64({4, 5}, 2), random_f64({5, 4}, 3)});
  check_gradients(
      [](V in) {
        const Tensor h = engine::mul(in[0], 1.5);
        return engine::add(engine::matmul(h, in[1]), engine::matmul(h.permute({1, 0, 2}), in[2]).permute({1, 0, 2}));
      },
      {random_f64({2, 3, 4}, 1), random_f64({4, 5}, 2), random_f64({4, 5}, 3)});
}

TEST_CASE("matmul rejects mismatched operands", "[matmul][errors]") {
  CHECK_THROWS_WITH(engine::matmul(Tensor::zeros({2, 3}), Tensor::zeros({4, 5})),
                    Catch::Contains("shapes [2, 3] and [4, 5] do not chain"));
  CHECK_THROWS_WITH(engine::matmul(Tensor::zeros({2, 2, 3}), Tensor::zeros({3, 3, 5})),
                    Catch::Contains("batch dims differ"));
  CHECK_THROWS_WITH(engine::matmul(Tensor::zeros({3}), Tensor::zeros({3, 5})), Catch::Contains("rank >= 2"));
  CHECK_THROWS_WITH(engine::matmul(Tensor::zeros({2, 3}, DType::I32), Tensor::zeros({3, 5}, DType::I32)),
                    Catch::Contains("floating"));
}
