// Mixed precision on the CPU (engine/precision.h): bf16 GEMMs multiply
// exactly the widened bf16 values; under autocast, matmul, linear_gelu and
// attention compute what f32 computes on bf16-rounded operands and round
// their results to bf16 once, and their gradients are rounded where the
// policy says; store_frozen_linear_weights converts exactly the frozen Linear
// weights and biases; layer norm rounds a bf16 output once. The GPU's kernels
// are held to these in test_cuda_mixed.
#include "engine/nn/layers.h"
#include "engine/ops.h"
#include "engine/precision.h"
#include "engine/rng.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

using engine::AutocastGuard;
using engine::DType;
using engine::Shape;
using engine::Tensor;

namespace {

Tensor random(const Shape& shape, uint64_t seed) {
  engine::Generator gen(seed);
  return Tensor::rand(shape, gen, -1, 1, DType::F32);
}

Tensor rounded(const Tensor& t) { return t.detach().to(DType::BF16).to(DType::F32); }

double max_abs_diff(const Tensor& a, const Tensor& b) {
  REQUIRE(a.shape() == b.shape());
  const std::vector<double> x = a.to_vector<double>(), y = b.to_vector<double>();
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) worst = std::max(worst, std::abs(x[i] - y[i]));
  return worst;
}

// Both sides multiply the same f32 values (bf16 widens exactly) in sums of K
// terms of size <= 1 whose order may differ: K f32 ulps of slack.
void require_same_products(const Tensor& got, const Tensor& want, int64_t K, const std::string& what) {
  INFO(what);
  REQUIRE(got.dtype() == DType::F32);
  REQUIRE(max_abs_diff(got, want) <= double(K) * 1.2e-7);
}

}  // namespace

TEST_CASE("bf16 GEMM on the CPU multiplies the widened values, into bf16 or f32", "[precision][matmul]") {
  const Tensor a = random({3, 5, 33}, 1), b = random({33, 7}, 2), bt = random({7, 33}, 3);
  const Tensor a16 = a.to(DType::BF16), b16 = b.to(DType::BF16), bt16 = bt.to(DType::BF16);
  // bf16 out: the f32 product of the widened inputs, rounded once.
  const Tensor out = engine::matmul(a16, b16);
  REQUIRE(out.dtype() == DType::BF16);
  REQUIRE(max_abs_diff(out, engine::matmul(rounded(a), rounded(b)).to(DType::BF16)) == 0);
  // Transposed operands reach the bf16 GEMM as flags too.
  const Tensor out_t = engine::matmul(a16, bt16.transpose(0, 1));
  REQUIRE(max_abs_diff(out_t, engine::matmul(rounded(a), rounded(bt).transpose(0, 1)).to(DType::BF16)) == 0);
  // Mixed dtypes need the policy: without autocast they are an error that names both.
  REQUIRE_THROWS_WITH(engine::matmul(a, b16), Catch::Contains("matmul") && Catch::Contains("bf16"));
}

TEST_CASE("autocast: matmul multiplies bf16-rounded operands into bf16, and keeps its precision in backward",
          "[precision][matmul]") {
  Tensor x = random({4, 6, 40}, 4), w = random({40, 9}, 5), up = random({4, 6, 9}, 6);
  x.set_requires_grad(true), w.set_requires_grad(true);
  Tensor y;
  {
    AutocastGuard autocast(DType::BF16);
    REQUIRE(engine::autocast_dtype() == DType::BF16);
    y = engine::matmul(x, w);
  }
  REQUIRE(!engine::autocast_dtype());
  // The f32 product of the rounded operands, rounded once: the CPU's sums are
  // the reference's own, so the roundings agree exactly.
  REQUIRE(y.dtype() == DType::BF16);
  REQUIRE(max_abs_diff(y.to(DType::F32), rounded(engine::matmul(rounded(x), rounded(w)))) == 0);

  // backward() runs outside the guard; the node remembers bf16. The upstream
  // gradient reaches y in y's dtype, bf16: dx = r(g) r(w)^T, dw = r(x)^T r(g),
  // each in its input's dtype, f32.
  engine::sum(engine::mul(y, up)).backward();
  REQUIRE(x.grad().dtype() == DType::F32);
  REQUIRE(w.grad().dtype() == DType::F32);
  require_same_products(x.grad(), engine::matmul(rounded(up), rounded(w).transpose(0, 1)), 9, "dx");
  require_same_products(w.grad(),
                        engine::matmul(rounded(x).reshape({-1, 40}).transpose(0, 1), rounded(up).reshape({-1, 9})),
                        24, "dw");
}

TEST_CASE("autocast: a bf16 frozen weight meets f32 activations, and f64 is left alone", "[precision][matmul]") {
  Tensor x = random({5, 16}, 7);
  x.set_requires_grad(true);
  const Tensor w = random({16, 8}, 8), w16 = w.to(DType::BF16), bias = random({8}, 9);
  // The bias is rounded to bf16 and added to the f32 sums before their one rounding.
  const Tensor want = rounded(engine::add(engine::matmul(rounded(x), rounded(w)), rounded(bias)));
  AutocastGuard autocast(DType::BF16);
  Tensor y = engine::linear(x, w16, bias, engine::WeightLayout::InOut);
  REQUIRE(y.dtype() == DType::BF16);
  REQUIRE(max_abs_diff(y.to(DType::F32), want) == 0);
  engine::sum(y).backward();
  REQUIRE(x.grad().dtype() == DType::F32);
  // f64 (gradient checks) is outside the policy: it stays exact f64.
  const Tensor a = random({3, 4}, 10).to(DType::F64), b = random({4, 2}, 11).to(DType::F64);
  const Tensor c = engine::matmul(a, b);
  REQUIRE(c.dtype() == DType::F64);
  AutocastGuard off(DType::F32);
  REQUIRE(max_abs_diff(c, engine::matmul(a.to(DType::F32), b.to(DType::F32))) < 1e-6);
}

TEST_CASE("autocast: linear_gelu gives bf16, rounded once, and its bf16 gradients sum in the second GEMM",
          "[precision][matmul]") {
  Tensor x = random({3, 5, 24}, 30), w = random({24, 16}, 31);
  const Tensor bias = random({16}, 32), w2 = random({16, 6}, 33), w3 = random({16, 6}, 34), up = random({3, 5, 6}, 35);
  x.set_requires_grad(true);
  Tensor h, y;
  {
    AutocastGuard autocast(DType::BF16);
    h = engine::linear_gelu(x, w, bias, engine::WeightLayout::InOut);
    // The GELU output feeds two GEMMs, so its two bf16 gradients must be summed.
    y = engine::add(engine::matmul(h, w2), engine::matmul(h, w3));
    // Composed (no bias to fuse), the result has the fused op's dtype.
    REQUIRE(engine::linear_gelu(x, w, Tensor(), engine::WeightLayout::InOut).dtype() == DType::BF16);
  }
  REQUIRE(h.dtype() == DType::BF16);
  // The GELU of the f32 sum r(x) r(w) + r(bias), rounded to bf16 once. The
  // CPU's sums are the reference's own, so the roundings agree exactly.
  const Tensor pre = engine::add(engine::matmul(rounded(x), rounded(w)), rounded(bias));
  REQUIRE(max_abs_diff(h.to(DType::F32), rounded(engine::gelu_new(pre))) == 0);

  // Backward: the use whose backward runs first (w3's, the later op) gives a
  // gradient rounded to bf16; the other's GEMM adds it to its own f32 sum as
  // its addend and rounds once. The GELU's derivative is taken in f32 at the
  // rounded pre-activation, and its product is rounded before the last GEMM.
  engine::sum(engine::mul(y, up)).backward();
  auto grad_through = [&](const Tensor& w_next) {
    return engine::matmul(rounded(up), rounded(w_next).transpose(0, 1));
  };
  const Tensor dh = rounded(engine::add(grad_through(w2), rounded(grad_through(w3))));
  Tensor pre_r = rounded(pre);
  pre_r.set_requires_grad(true);
  engine::sum(engine::mul(engine::gelu_new(pre_r), dh)).backward();
  const Tensor dx = engine::matmul(rounded(pre_r.grad()), rounded(w).transpose(0, 1));
  REQUIRE(x.grad().dtype() == DType::F32);
  require_same_products(x.grad(), dx, 16, "dx");
}

TEST_CASE("autocast: linear_gelu_linear rounds the gradient through its GELU once", "[precision][matmul]") {
  Tensor x = random({3, 5, 24}, 30), w = random({24, 16}, 31);
  const Tensor b = random({16}, 32), w2 = random({16, 6}, 33), b2 = random({6}, 34), up = random({3, 5, 6}, 35);
  x.set_requires_grad(true);
  Tensor y;
  {
    AutocastGuard autocast(DType::BF16);
    y = engine::linear_gelu_linear(x, w, b, w2, b2, engine::WeightLayout::InOut);
  }
  REQUIRE(y.dtype() == DType::BF16);
  const Tensor pre = engine::add(engine::matmul(rounded(x), rounded(w)), rounded(b));
  const Tensor h = rounded(engine::gelu_new(pre));
  REQUIRE(max_abs_diff(y.to(DType::F32), rounded(engine::add(engine::matmul(h, rounded(w2)), rounded(b2)))) == 0);

  // The GELU's derivative, in f32 at the rounded pre-activation, multiplies
  // the f32 sum up w2^T before any rounding (linear_gelu then linear would
  // round that sum to bf16 first); the product is rounded once, for dX's GEMM.
  engine::sum(engine::mul(y, up)).backward();
  Tensor pre_r = rounded(pre);
  pre_r.set_requires_grad(true);
  const Tensor dh = engine::matmul(rounded(up), rounded(w2).transpose(0, 1));
  engine::sum(engine::mul(engine::gelu_new(pre_r), dh)).backward();
  const Tensor dx = engine::matmul(rounded(pre_r.grad()), rounded(w).transpose(0, 1));
  require_same_products(x.grad(), dx, 16, "dx");
}

TEST_CASE("layer_norm with a bf16 output rounds the f32 result once, and takes its gradient in bf16",
          "[precision][nn]") {
  Tensor x = engine::add(random({4, 3, 40}, 40), 2.0), w = random({40}, 41), b = random({40}, 42);
  const Tensor up = random({4, 3, 40}, 43);
  for (Tensor* t : {&x, &w, &b}) t->set_requires_grad(true);
  const Tensor y = engine::layer_norm(x, w, b, 1e-5, DType::BF16);
  REQUIRE(y.dtype() == DType::BF16);
  REQUIRE(max_abs_diff(y.to(DType::F32), rounded(engine::layer_norm(x.detach(), w.detach(), b.detach()))) == 0);
  // The gradient arrives in bf16 (y's dtype): the f32 backward of its widened values.
  engine::sum(engine::mul(y, up)).backward();
  Tensor x2 = x.detach(), w2 = w.detach(), b2 = b.detach();
  for (Tensor* t : {&x2, &w2, &b2}) t->set_requires_grad(true);
  engine::sum(engine::mul(engine::layer_norm(x2, w2, b2), rounded(up))).backward();
  REQUIRE(max_abs_diff(x.grad(), x2.grad()) == 0);
  REQUIRE(max_abs_diff(w.grad(), w2.grad()) == 0);
  REQUIRE(max_abs_diff(b.grad(), b2.grad()) == 0);
  // bf16 is the one other output dtype, and only for f32 (or bf16) inputs.
  REQUIRE_THROWS_WITH(engine::layer_norm(x.detach(), w.detach(), b.detach(), 1e-5, DType::F64),
                      Catch::Contains("layer_norm: output dtype f64 for a f32 input"));
  // Under autocast, LayerNorm's forward_into_linear gives the autocast dtype; forward stays f32.
  engine::nn::LayerNorm ln(w.detach(), b.detach());
  AutocastGuard autocast(DType::BF16);
  REQUIRE(ln.forward_into_linear(x.detach()).dtype() == DType::BF16);
  REQUIRE(ln.forward(x.detach()).dtype() == DType::F32);
  engine::nn::LayerNorm ln64(w.detach().to(DType::F64), b.detach().to(DType::F64));
  REQUIRE(ln64.forward_into_linear(x.detach().to(DType::F64)).dtype() == DType::F64);  // autocast leaves f64 alone
}

TEST_CASE("autocast: attention gives the bf16 rounding of f32 attention of bf16-rounded q, k, v",
          "[precision][attention]") {
  const int64_t B = 2, H = 3, T = 37, D = 16;
  Tensor q = random({B, H, T, D}, 12), k = random({B, H, T, D}, 13), v = random({B, H, T, D}, 14);
  const Tensor up = random({B, H, T, D}, 15);
  for (Tensor* t : {&q, &k, &v}) t->set_requires_grad(true);
  std::vector<int32_t> keep(size_t(B * T), 1);
  keep[0] = keep[1] = keep[size_t(T) + 5] = 0;
  const Tensor mask = Tensor::from_vector(keep, {B, T});
  engine::Generator gen(21), ref_gen(21);

  Tensor out;
  {
    AutocastGuard autocast(DType::BF16);
    out = engine::scaled_dot_product_attention(q, k, v, mask, true, {}, 0.2, &gen);
  }
  REQUIRE(out.dtype() == DType::BF16);
  // Laid out [B, T, H, D]: merging the heads is a view.
  REQUIRE(out.permute({0, 2, 1, 3}).is_contiguous());
  engine::sum(engine::mul(out.to(DType::F32), up)).backward();  // the gradient reaching out is rounded to bf16

  std::vector<Tensor> ref_in{rounded(q), rounded(k), rounded(v)};
  for (Tensor& t : ref_in) t.set_requires_grad(true);
  Tensor ref = engine::scaled_dot_product_attention(ref_in[0], ref_in[1], ref_in[2], mask, true, {}, 0.2, &ref_gen);
  engine::sum(engine::mul(ref, rounded(up))).backward();
  // The same f32 computation, rounded once: exactly the reference's rounding.
  REQUIRE(max_abs_diff(out.to(DType::F32), rounded(ref)) == 0);
  // dV = P^T dO does not read the output. dQ and dK do, through
  // delta_i = <dO_i, O_i>, which the bf16 O moves by at most D * 2^-9 (inputs
  // in [-1, 1]); scores scaled by 1/4 and |k| <= 1 keep the gradients within
  // that, and random signs far within it.
  REQUIRE(max_abs_diff(v.grad(), ref_in[2].grad()) < 1e-6);
  REQUIRE(max_abs_diff(q.grad(), ref_in[0].grad()) < double(D) / 512);
  REQUIRE(max_abs_diff(k.grad(), ref_in[1].grad()) < double(D) / 512);
  REQUIRE(max_abs_diff(q.grad(), ref_in[0].grad()) > 0);  // the rounding of O is real
  REQUIRE(q.grad().dtype() == DType::F32);
}

TEST_CASE("store_frozen_linear_weights converts frozen Linear weights and biases only", "[precision][nn]") {
  engine::Generator gen(3);
  auto frozen = std::make_shared<engine::nn::Linear>(8, 4, gen);
  auto trained = std::make_shared<engine::nn::Linear>(4, 2, gen);
  auto table = std::make_shared<engine::nn::Embedding>(10, 8, gen);
  // A Linear that shares the embedding's table, as GPT-2's tied lm_head does.
  auto tied = std::make_shared<engine::nn::Linear>(table->weight, Tensor(), engine::WeightLayout::OutIn);
  struct Net : engine::nn::Module {
    Net(std::shared_ptr<Module> a, std::shared_ptr<Module> b, std::shared_ptr<Module> c, std::shared_ptr<Module> d) {
      register_module("frozen", a), register_module("trained", b), register_module("wte", c);
      register_module("lm_head", d);
    }
  } net(frozen, trained, table, tied);
  net.freeze("frozen.*");
  net.freeze("wte.*");
  const Tensor before = frozen->weight.detach().clone();

  const Tensor bias_before = frozen->bias.detach().clone();
  REQUIRE(engine::nn::store_frozen_linear_weights(net, DType::BF16) == 2);  // the frozen weight and bias
  CHECK(frozen->weight.dtype() == DType::BF16);
  CHECK(net.get_parameter("frozen.weight").dtype() == DType::BF16);  // converted in place: every handle sees it
  CHECK(frozen->bias.dtype() == DType::BF16);
  CHECK(max_abs_diff(frozen->bias.to(DType::F32), rounded(bias_before)) == 0);
  CHECK(trained->bias.dtype() == DType::F32);
  CHECK(trained->weight.dtype() == DType::F32);
  CHECK(table->weight.dtype() == DType::F32);
  CHECK(max_abs_diff(frozen->weight.to(DType::F32), rounded(before)) == 0);
  REQUIRE(engine::nn::store_frozen_linear_weights(net, DType::BF16) == 0);  // nothing left to do
}
