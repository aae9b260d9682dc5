// CUDA parity of the fused nn ops (layer norm, gelu_new, softmax,
// cross-entropy) against the CPU backend, and the gradient sums that
// backward folds into them: a residual stream's gradient added inside layer
// norm's backward, a shared input's inside its last GEMM. Exits 77 (SKIP in
// Meson) without a GPU.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "engine/backend.h"
#include "engine/ops.h"
#include "engine/precision.h"
#include "engine/profiler.h"
#include "tests/cuda_test_util.h"
#include "tests/residual_chain.h"

#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

using namespace cuda_test;  // Device, DType, Shape, Tensor and the helpers

int main(int argc, char** argv) { return run_or_skip(argc, argv); }

// ---------------------------------------------------------------- fused nn ops

TEST_CASE("cuda: layer_norm forward and backward, with and without frozen weights", "[cuda][nn]") {
  for (DType dtype : {DType::F32, DType::F64})
    // Rows held in registers (f32, widths a multiple of 4 up to 2048, at 2 to
    // 16 packs per lane) and rows walked element by element (the rest).
    for (Shape shape : {Shape{1, 1}, Shape{7, 33}, Shape{3, 5, 7}, Shape{1000, 1280}, Shape{4, 1}, Shape{9, 64},
                        Shape{5, 768}, Shape{3, 2048}, Shape{2, 2052}, Shape{6, 36}})
      for (bool frozen : {false, true}) {
        INFO(engine::shape_str(shape) << " frozen " << frozen << " " << engine::dtype_name(dtype));
        const int64_t C = shape.back();
        Tensor x = engine::add(random(shape, 1, dtype), 3.0);  // a large mean, as after a residual add
        Tensor w = random({C}, 2, dtype), b = random({C}, 3, dtype);
        x.set_requires_grad(true);
        w.set_requires_grad(!frozen), b.set_requires_grad(!frozen);
        Tensor xg = gpu_leaf(x), wg = gpu_leaf(w), bg = gpu_leaf(b);
        Tensor y = engine::layer_norm(x, w, b), yg = engine::layer_norm(xg, wg, bg);
        // Normalised outputs are O(1): f32 rows of up to 1280 summed in trees
        // vs sequentially differ by a few ulps of the row statistics.
        const double tolerance = dtype == DType::F32 ? 64 * kF32Eps : 1e-12;
        require_near(yg, y, tolerance, "layer_norm forward");
        Tensor up = random(shape, 4, dtype);
        engine::sum(engine::mul(y, up)).backward();
        engine::sum(engine::mul(yg, up.to(kGpu))).backward();
        require_near(xg.grad(), x.grad(), tolerance, "layer_norm dx");
        if (frozen) {
          REQUIRE(!wg.grad().defined());
          REQUIRE(!bg.grad().defined());
        } else {
          // dweight and dbias sum over up to 1000 rows.
          const double sums = dtype == DType::F32 ? 256 * kF32Eps : 1e-12;
          require_near(wg.grad(), w.grad(), sums, "layer_norm dweight");
          require_near(bg.grad(), b.grad(), sums, "layer_norm dbias");
        }
      }
}

TEST_CASE("cuda: dropout_add_layer_norm in one pass is dropout_add then layer_norm, bit for bit", "[cuda][nn]") {
  // GPT-2's case (bf16 x, bf16 output, 1280 wide, with a rank-8 adapter's room) and f32 rows held in
  // registers take the one-pass kernel; widths or output rows that are no multiple of 4 wide, or rows past
  // 2048, take the two launches.
  for (const auto& [shape, x_dtype, out, room] : {std::tuple{Shape{1000, 1280}, DType::BF16, DType::BF16, 8},
                                                  std::tuple{Shape{7, 36}, DType::F32, DType::F32, 0},
                                                  std::tuple{Shape{7, 36}, DType::F32, DType::F32, 1},
                                                  std::tuple{Shape{5, 6}, DType::BF16, DType::BF16, 2},
                                                  std::tuple{Shape{3, 2052}, DType::F32, DType::F32, 0}}) {
    INFO(engine::shape_str(shape) << " x " << engine::dtype_name(x_dtype) << " into " << engine::dtype_name(out)
                                  << " room " << room);
    const int64_t C = shape.back();
    auto leaves = [&] {
      std::vector<Tensor> t = {engine::add(random(shape, 1), 3.0), random(shape, 2).to(x_dtype), random({C}, 3),
                               random({C}, 4)};
      for (Tensor& leaf : t) leaf = leaf.to(kGpu), leaf.set_requires_grad(true);
      return t;
    };
    std::vector<Tensor> fused = leaves(), apart = leaves();
    engine::Generator a(30), b(30);
    Tensor r, y;
    {
      engine::Profiler profiler;
      std::tie(r, y) =
          engine::dropout_add_layer_norm(fused[0], fused[1], 0.1, true, a, fused[2], fused[3], 1e-5, out, room);
      CHECK(profiler.calls("dropout_add_layer_norm") == (C % 4 == 0 && room % 4 == 0 && C <= 2048 ? 1 : 0));
    }
    CHECK(y.strides()[0] == C + room);
    const Tensor r2 = engine::dropout_add(apart[0], apart[1], 0.1, true, b);
    const Tensor y2 = engine::layer_norm(r2, apart[2], apart[3], 1e-5, out, room);  // the same kernel for y's rows
    require_equal(r, r2, "the residual stream");
    require_equal(y, y2, "its layer norm");  // the same row kernel, fed the same sums
    const Tensor up_r = random(shape, 5).to(kGpu), up_y = random(shape, 6).to(kGpu);
    engine::sum(engine::add(engine::mul(r, up_r), engine::mul(y.to(DType::F32), up_y))).backward();
    engine::sum(engine::add(engine::mul(r2, up_r), engine::mul(y2.to(DType::F32), up_y))).backward();
    for (size_t i = 0; i < fused.size(); ++i) require_equal(fused[i].grad(), apart[i].grad(), "gradient");
  }
}

TEST_CASE("cuda: under frozen layer norm weights, its backward drops the dropout_add's gradient in the same pass",
          "[cuda][nn]") {
  // The forward's one pass is dropout_add_layer_norm's; the backward's, layer_norm_backward_dropout.
  // As in GPT-2 (tests/residual_chain.h), at its width.
  auto chain = [](bool fused, int64_t* passes) {
    engine::Profiler profiler;
    const std::vector<Tensor> grads = testing::residual_chain(fused, kGpu, 64, 1280, /*frozen_norm=*/true);
    *passes = 0;  // over the stream, both ways
    for (const char* op : {"dropout", "layer_norm", "dropout_add_layer_norm", "layer_norm_backward",
                           "layer_norm_backward_dropout"})
      *passes += profiler.calls(op);
    CHECK(profiler.calls("layer_norm_backward_dropout") == (fused ? 1 : 0));
    return grads;
  };
  int64_t fused_passes = 0, apart_passes = 0;
  const std::vector<Tensor> fused = chain(true, &fused_passes), apart = chain(false, &apart_passes);
  require_equal(fused[0], apart[0], "the residual's gradient");
  require_equal(fused[1], apart[1], "x's gradient, dropped into bf16");
  CHECK(fused_passes == apart_passes - 2);  // one pass fewer each way
}

TEST_CASE("cuda: gelu_new, softmax and log_softmax forward and backward", "[cuda][nn]") {
  for (DType dtype : {DType::F32, DType::F64}) {
    // Row sums of up to 50257 exponentials: f32 trees on the GPU, double on
    // the CPU, about 1e-6 relative apart at that width.
    const double tolerance = dtype == DType::F32 ? 64 * kF32Eps : 1e-13;
    for (Shape shape : {Shape{1}, Shape{7, 33}, Shape{3, 1000}, Shape{2, 50257}}) {
      INFO(engine::shape_str(shape) << " " << engine::dtype_name(dtype));
      Tensor x = random(shape, 1, dtype, -6, 6);
      x.set_requires_grad(true);
      Tensor xg = gpu_leaf(x);
      Tensor up = random(shape, 2, dtype);
      auto check = [&](const std::function<Tensor(const Tensor&)>& f, const std::string& name) {
        Tensor y = f(x), yg = f(xg);
        require_near(yg, y, tolerance, name + " forward");
        x.zero_grad(), xg.zero_grad();
        engine::sum(engine::mul(y, up)).backward();
        engine::sum(engine::mul(yg, up.to(kGpu))).backward();
        require_near(xg.grad(), x.grad(), tolerance, name + " backward");
      };
      check([](const Tensor& t) { return engine::gelu_new(t); }, "gelu_new");
      check([](const Tensor& t) { return engine::softmax(t, -1); }, "softmax");
      check([](const Tensor& t) { return engine::log_softmax(t, -1); }, "log_softmax");
      check([](const Tensor& t) { return engine::softmax(t, 0); }, "softmax over dim 0");
    }
  }
}

TEST_CASE("cuda: cross_entropy with ignored targets, every reduction, and bad targets", "[cuda][nn]") {
  for (DType dtype : {DType::F32, DType::F64})
    for (int64_t K : {1, 7, 1000, 50257})
      for (auto reduction : {engine::Reduction::None, engine::Reduction::Mean, engine::Reduction::Sum}) {
        INFO("K " << K << " reduction " << int(reduction) << " " << engine::dtype_name(dtype));
        const int64_t N = 6;
        Tensor logits = random({N, K}, 1, dtype, -5, 5);
        logits.set_requires_grad(true);
        std::vector<int64_t> t = {0, K - 1, -100, K / 2, -100, K / 3};
        Tensor targets = Tensor::from_vector(t, {N}).to(DType::I32);
        Tensor loss = engine::cross_entropy(logits, targets, -100, reduction);
        Tensor up = reduction == engine::Reduction::None ? random({N}, 2, dtype) : Tensor::ones({}, dtype);
        engine::sum(engine::mul(loss, up)).backward();
        const double tolerance = dtype == DType::F32 ? 64 * kF32Eps : 1e-13;  // as softmax's
        for (Device targets_device : {kGpu, Device::cpu()}) {  // host targets are checked there, copied over
          INFO("targets on " << targets_device.str());
          Tensor lg = gpu_leaf(logits);
          Tensor loss_g = engine::cross_entropy(lg, targets.to(targets_device), -100, reduction);
          require_near(loss_g, loss, tolerance, "cross_entropy forward");
          engine::sum(engine::mul(loss_g, up.to(kGpu))).backward();
          require_near(lg.grad(), logits.grad(), tolerance, "cross_entropy backward");
        }
      }
  Tensor logits = random({2, 7}, 3).to(kGpu);
  for (Device targets_device : {kGpu, Device::cpu()}) {
    Tensor bad = Tensor::from_vector(std::vector<int32_t>{1, 7}, {2}).to(targets_device);
    REQUIRE_THROWS_WITH(engine::cross_entropy(logits, bad), Catch::Contains("target 7 (row 1)"));
  }
}

// ---------------------------------------------------------------- gradient sums folded into kernels

TEST_CASE("cuda: layer_norm's backward adds a residual gradient as a separate add would, bit for bit",
          "[cuda][nn]") {
  for (bool bf16 : {false, true})
    for (Shape shape : {Shape{300, 1280}, Shape{7, 33}}) {  // rows in registers; rows walked
      INFO(engine::shape_str(shape) << " bf16 dy " << bf16);
      const int64_t rows = shape[0], C = shape[1];
      const Tensor x = random(shape, 1).to(kGpu), w = random({C}, 2).to(kGpu), b = random({C}, 3).to(kGpu);
      const Tensor dy = random(shape, 4).to(kGpu).to(bf16 ? DType::BF16 : DType::F32);
      const Tensor residual = random(shape, 5).to(kGpu);
      Tensor y = Tensor::empty(shape, dy.dtype(), kGpu), mean = Tensor::empty({rows}, DType::F32, kGpu);
      Tensor rstd = Tensor::empty({rows}, DType::F32, kGpu);
      Tensor dx = Tensor::empty(shape, DType::F32, kGpu), folded = Tensor::empty(shape, DType::F32, kGpu);
      engine::Backend& gpu = engine::backend_for(kGpu);
      gpu.layer_norm_forward(view_of(y), view_of(mean), view_of(rstd), view_of(x), view_of(w), view_of(b), 1e-5);
      gpu.layer_norm_backward(view_of(dx), {}, {}, view_of(dy), view_of(x), view_of(w), view_of(mean), view_of(rstd),
                              {});
      gpu.layer_norm_backward(view_of(folded), {}, {}, view_of(dy), view_of(x), view_of(w), view_of(mean),
                              view_of(rstd), view_of(residual));
      require_near(folded, engine::add(residual, dx), 0.0, "folded dx");
    }
}

TEST_CASE("cuda: a residual block's backward sums its gradients inside layer norm and the GEMMs, as on the CPU",
          "[cuda][nn][matmul]") {
  // h -> h + proj(ln(h)) + adapter(ln(h)): h's gradient is summed in ln's backward and ln(h)'s in the
  // second GEMM's addend, so no add kernel runs in the backward; the result is the CPU's.
  for (bool autocast : {false, true}) {
    INFO("autocast " << autocast);
    Tensor x = random({6, 40, 64}, 1), w = random({64}, 2), b = random({64}, 3);
    Tensor proj = random({64, 64}, 4), down = random({64, 4}, 5), up = random({4, 64}, 6);
    x.set_requires_grad(true), up.set_requires_grad(true);
    auto block = [](const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& proj, const Tensor& down,
                    const Tensor& up) {
      const Tensor h = engine::mul(x, 2.0);
      const Tensor n = engine::layer_norm(h, w, b);
      return engine::add(h, engine::add(engine::matmul(n, proj), engine::matmul(engine::matmul(n, down), up)));
    };
    const Tensor weights = random({6, 40, 64}, 7);
    Tensor xg = gpu_leaf(x), upg = gpu_leaf(up);
    Tensor y, yg;
    {
      std::optional<engine::AutocastGuard> guard;
      if (autocast) guard.emplace(DType::BF16);
      y = block(x, w, b, proj, down, up);
      yg = block(xg, w.to(kGpu), b.to(kGpu), proj.to(kGpu), down.to(kGpu), upg);
    }
    engine::sum(engine::mul(y, weights)).backward();
    const Tensor loss = engine::sum(engine::mul(yg, weights.to(kGpu)));
    engine::Profiler profiler;
    loss.backward();
    CHECK(profiler.calls("add") == 0);
    // bf16 products are summed in different orders on the two devices, then rounded.
    const double tolerance = autocast ? 1.0 / 64 : 256 * kF32Eps;
    require_near(xg.grad(), x.grad(), tolerance, "dx");
    require_near(upg.grad(), up.grad(), tolerance, "d up");
  }
}
