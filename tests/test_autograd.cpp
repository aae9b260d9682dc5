// The autograd core: accumulation, shared subexpressions, detach, NoGradGuard,
// retain_graph, and the rule CURLoRA's speed rests on: a frozen weight costs
// no weight-gradient GEMM, and it keeps no activation that no backward reads.
#include "engine/autograd.h"
#include "engine/ops.h"
#include "engine/profiler.h"
#include "tests/gradcheck.h"

#include <catch2/catch.hpp>

using engine::DType;
using engine::Tensor;
using testing::random_f64;

TEST_CASE("gradients accumulate across backward calls and paths", "[autograd]") {
  Tensor x = Tensor::from_vector<double>({1, 2, 3}, {3}).set_requires_grad(true);
  // y uses x twice (a diamond): dy/dx = 2x + 3.
  Tensor y = engine::sum(x * x + x * 3.0);
  y.backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>{5, 7, 9});
  engine::sum(x * 2.0).backward();  // accumulates
  CHECK(x.grad().to_vector<double>() == std::vector<double>{7, 9, 11});
  x.zero_grad();
  CHECK_FALSE(x.grad().defined());
}

TEST_CASE("detach and NoGradGuard stop the graph", "[autograd]") {
  Tensor x = random_f64({3}, 1);
  Tensor d = x.detach();
  CHECK_FALSE(d.requires_grad());
  CHECK(d.data_ptr() == x.data_ptr());  // same storage
  {
    engine::NoGradGuard guard;
    Tensor y = x * 2.0;
    CHECK_FALSE(y.requires_grad());
    CHECK(y.is_leaf());
  }
  CHECK(engine::grad_mode_enabled());
  Tensor z = engine::sum(x * d);  // d is a constant here
  z.backward();
  testing::require_close(x.grad(), d.to_vector<double>());
}

TEST_CASE("backward twice needs retain_graph", "[autograd]") {
  Tensor x = random_f64({2, 2}, 1);
  Tensor y = engine::sum(engine::exp(x));
  y.backward(Tensor(), /*retain_graph=*/true);
  y.backward();
  testing::require_close(x.grad(), (engine::exp(x.detach()) * 2.0).to_vector<double>(), 1e-12);
  CHECK_THROWS_WITH(y.backward(), Catch::Contains("a second time"));
}

TEST_CASE("backward checks its seed", "[autograd][errors]") {
  Tensor x = random_f64({2, 2}, 1);
  Tensor y = x * 2.0;
  CHECK_THROWS_WITH(y.backward(), Catch::Contains("needs a scalar"));
  CHECK_THROWS_WITH(y.backward(Tensor::ones({3}, DType::F64)), Catch::Contains("does not match"));
  CHECK_THROWS_WITH(Tensor::zeros({1}).backward(), Catch::Contains("does not require grad"));
  y.backward(Tensor::ones({2, 2}, DType::F64));
  testing::require_close(x.grad(), {2, 2, 2, 2});
  CHECK_THROWS_WITH(y.set_requires_grad(false), Catch::Contains("non-leaf"));
}

TEST_CASE("a backward may take an input's gradient so far, and then returns the sum", "[autograd]") {
  // out = h + 7 * fold(h), fold(h) = 5 h: d out / dh = 36. The add runs first and gives h its
  // gradient; fold's backward, run later, is offered it. Taken, it must come back inside fold's
  // gradient; declined (another dtype), the engine adds it as before.
  for (DType wanted : {DType::F64, DType::F32}) {
    Tensor x = random_f64({3}, 2);
    std::vector<bool> took;
    auto fold = [&](const Tensor& in) {
      Tensor out = in.detach() * 5.0;
      engine::record(out, "fold", {in}, [&took, wanted](const Tensor& g, const engine::Node& n) {
        const Tensor so_far = n.take_gradient_so_far(0, wanted);
        took.push_back(so_far.defined());
        const Tensor mine = g * 5.0;
        return std::vector<Tensor>{so_far.defined() ? so_far + mine : mine};
      });
      return out;
    };
    const Tensor h = x * 2.0;
    engine::sum(h + fold(h) * 7.0).backward();
    CHECK(took == std::vector<bool>{wanted == DType::F64});
    testing::require_close(x.grad(), {72, 72, 72});
  }
}

TEST_CASE("a frozen weight costs no weight-gradient GEMM", "[autograd][matmul]") {
  // The CURLoRA layer: y = x W + ((x C) U) R with W, C, R frozen, U trainable.
  engine::Generator gen(5);
  Tensor x = Tensor::randn({4, 6, 8}, gen);
  Tensor W = Tensor::randn({8, 12}, gen);
  Tensor C = Tensor::randn({8, 2}, gen);
  Tensor R = Tensor::randn({2, 12}, gen);
  Tensor U = Tensor::zeros({2, 2}).set_requires_grad(true);
  Tensor y = engine::matmul(x, W) + engine::matmul(engine::matmul(engine::matmul(x, C), U), R);
  Tensor loss = engine::sum(y * y);

  engine::Profiler profiler;
  loss.backward();
  // Only dU (= (xC)^T (dy R^T)) needs GEMMs: dy R^T, then (xC)^T times that.
  // Nothing flows to x, W, C or R, so none of their GEMMs run.
  CHECK(profiler.calls("gemm") == 2);
  CHECK(U.grad().defined());
  CHECK_FALSE(W.grad().defined());

  // With x trainable too, dX GEMMs run through W and the adapter, but still no dW.
  Tensor x2 = x.detach().set_requires_grad(true);
  Tensor y2 = engine::matmul(x2, W) + engine::matmul(engine::matmul(engine::matmul(x2, C), U.detach()), R);
  engine::Profiler profiler2;
  engine::sum(y2).backward();
  CHECK(profiler2.calls("gemm") == 4);  // dX via W; via R, U and C: one GEMM each
  CHECK_FALSE(W.grad().defined());
}

TEST_CASE("autograd frees what no backward reads: a frozen weight's input, an add's operands", "[autograd][memory]") {
  engine::Generator gen(6);
  Tensor W1 = Tensor::randn({8, 8}, gen), W2 = Tensor::randn({8, 3}, gen), b = Tensor::randn({8}, gen);
  Tensor x = Tensor::randn({4, 8}, gen).set_requires_grad(true);
  std::weak_ptr<engine::Storage> product, sum;
  Tensor loss;
  {
    Tensor a = engine::matmul(x, W1);  // kept by nothing: W1 is frozen and so is W2
    Tensor s = a + b;                  // an add reads neither operand back
    product = a.impl().storage, sum = s.impl().storage;
    loss = engine::sum(engine::matmul(s, W2));
  }
  CHECK(product.expired());
  CHECK(sum.expired());
  loss.backward();
  // The gradient is the one of a graph that keeps everything: dx = 1 W2^T W1^T.
  Tensor ones = Tensor::ones({4, 3});
  testing::require_close(x.grad(), engine::matmul(engine::matmul(ones, W2.transpose(0, 1)), W1.transpose(0, 1))
                                       .to_vector<double>(), 1e-5);

  // A weight unfrozen between forward and backward would need the freed input: a clear error, not a crash.
  Tensor W3 = Tensor::randn({8, 2}, gen);
  Tensor y = engine::sum(engine::matmul(engine::matmul(x, W1), W3));
  W3.set_requires_grad(true);
  CHECK_THROWS_WITH(y.backward(), Catch::Contains("graph edge"));
}
