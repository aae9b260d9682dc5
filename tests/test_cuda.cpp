// CUDA backend parity: every op and every gradient on cuda:0 against the CPU
// backend, on odd shapes and non-contiguous views; random draws, dropout
// masks and AdamW steps bit-identical; attention against the CPU kernel;
// memory counters and error paths (the fused nn ops: test_cuda_nn.cpp).
// Exits 77 (SKIP in Meson) without a GPU.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "engine/backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/ops.h"
#include "engine/ops/common.h"
#include "engine/optim/optimizer.h"
#include "engine/precision.h"
#include "engine/rng.h"
#include "tests/cuda_test_util.h"
#include "tests/gradcheck.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

using namespace cuda_test;  // Device, DType, Shape, Tensor and the helpers

int main(int argc, char** argv) { return run_or_skip(argc, argv); }

// ---------------------------------------------------------------- memory

TEST_CASE("cuda: memory counters follow allocations, and out of memory is an engine::Error", "[cuda][memory]") {
  const engine::CudaMemoryStats before = engine::cuda_memory_stats(0);
  {
    Tensor t = Tensor::empty({1 << 20}, DType::F32, kGpu);  // 4 MiB
    const engine::CudaMemoryStats during = engine::cuda_memory_stats(0);
    REQUIRE(during.current_bytes == before.current_bytes + (size_t(4) << 20));
    REQUIRE(during.peak_bytes >= during.current_bytes);
    REQUIRE(during.reserved_bytes >= during.current_bytes);
  }
  REQUIRE(engine::cuda_memory_stats(0).current_bytes == before.current_bytes);
  engine::cuda_reset_peak(0);
  REQUIRE(engine::cuda_memory_stats(0).peak_bytes == engine::cuda_memory_stats(0).current_bytes);

  // 2^45 f32 = 128 TiB: no GPU has it. The error names the device and the size,
  // and the device keeps working afterwards.
  REQUIRE_THROWS_AS(Tensor::empty({int64_t(1) << 45}, DType::F32, kGpu), engine::Error);
  REQUIRE_THROWS_WITH(Tensor::empty({int64_t(1) << 45}, DType::F32, kGpu),
                      Catch::Contains("cuda:0") && Catch::Contains("128.00 TiB"));
  Tensor x = Tensor::ones({3}, DType::F32, kGpu);
  REQUIRE(engine::sum(x).item() == 3.0);
  REQUIRE_THROWS_AS(Tensor::empty({2}, DType::F32, Device::cuda(engine::cuda_device_count())), engine::Error);
}

// ---------------------------------------------------------------- copies, fills, random

TEST_CASE("cuda: copies between every dtype pair, on strided views, round as the CPU does", "[cuda][copy]") {
  const DType dtypes[] = {DType::F32, DType::F64, DType::BF16, DType::F16, DType::I32, DType::I64};
  // Values spanning f16's range, with fractions (rounding ties included via
  // the bf16/f16 grids) and negatives (integer casts truncate toward zero).
  Tensor values = random({33, 7}, 1, DType::F64, -60000, 60000);  // finite in f16
  for (DType from : dtypes)
    for (DType to : dtypes) {
      INFO("from " << engine::dtype_name(from) << " to " << engine::dtype_name(to));
      Tensor base = values.to(from);
      auto [cpu, gpu] = both(base, [](const Tensor& t) { return t.transpose(0, 1).slice(1, 1, 33, 3); });
      require_equal(gpu.to(to), cpu.to(to), "strided cast");
    }
  // Copies in packs of 4 (innermost dim contiguous, the rest on 4-element
  // boundaries): GPT-2's head split [B, T, H, D] -> [B, H, T, D], and the same
  // view starting one element in, which must take the element-wise path.
  Tensor heads = random({2, 5, 3, 8}, 4, DType::F64, -60000, 60000);
  for (DType from : dtypes)
    for (DType to : dtypes) {
      INFO("from " << engine::dtype_name(from) << " to " << engine::dtype_name(to));
      auto [cpu, gpu] = both(heads.to(from), [](const Tensor& t) { return t.permute({0, 2, 1, 3}); });
      // contiguous(): with from == to, to() alone would return the view uncopied.
      require_equal(gpu.to(to).contiguous(), cpu.to(to), "head split in packs");
      require_equal(gpu.slice(3, 1, 5).to(to).contiguous(), cpu.slice(3, 1, 5).to(to), "misaligned head split");
    }
  // Small values, where bf16 and f16 have ties and subnormals.
  Tensor small = random({1000}, 2, DType::F32, -1e-4, 1e-4);
  for (DType to : {DType::BF16, DType::F16})
    require_equal(small.to(kGpu).to(to), small.to(to), std::string("small values to ") + std::string(engine::dtype_name(to)));
  // NaN stays NaN (the payload may differ: CUDA's intrinsics give the canonical NaN).
  Tensor nan = Tensor::full({5}, std::numeric_limits<double>::quiet_NaN(), DType::F32, kGpu);
  for (double v : nan.to(DType::BF16).to_vector<double>()) REQUIRE(std::isnan(v));
  for (double v : nan.to(DType::F16).to_vector<double>()) REQUIRE(std::isnan(v));

  // contiguous() of a view and copy_ into a view (the destination strided).
  auto [cpu, gpu] = both(random({7, 33}, 3), [](const Tensor& t) { return t.transpose(0, 1); });
  require_equal(gpu.contiguous(), cpu.contiguous(), "contiguous");
  Tensor dst_cpu = Tensor::zeros({33, 14}), dst_gpu = Tensor::zeros({33, 14}, DType::F32, kGpu);
  dst_cpu.slice(1, 0, 14, 2).copy_(cpu);
  dst_gpu.slice(1, 0, 14, 2).copy_(gpu);
  require_equal(dst_gpu, dst_cpu, "copy_ into a strided view");
}

TEST_CASE("cuda: large host copies through the pinned staging buffers arrive intact", "[cuda][copy]") {
  // 5M + 3 floats: two full 8 MiB chunks of each staging buffer and a ragged
  // last one; values that differ everywhere, so a chunk out of place shows.
  const int64_t n = 5 * (int64_t(1) << 20) + 3;
  std::vector<int32_t> values(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) values[size_t(i)] = int32_t(i * 2654435761u % 1000003u);
  Tensor device = Tensor::from_vector(values, {n}).to(kGpu);  // the host tensor dies right after the call
  REQUIRE(device.to(engine::Device::cpu()).to_vector<int32_t>() == values);
  // Back-to-back uploads reuse the buffers: the second must not clobber the first's DMA.
  std::vector<int32_t> other(values.rbegin(), values.rend());
  Tensor a = Tensor::from_vector(values, {n}).to(kGpu), b = Tensor::from_vector(other, {n}).to(kGpu);
  REQUIRE(a.to_vector<int32_t>() == values);
  REQUIRE(b.to_vector<int32_t>() == other);
}

TEST_CASE("cuda: fill on strided views of every dtype", "[cuda][copy]") {
  for (DType dtype : {DType::F32, DType::F64, DType::BF16, DType::F16, DType::I32, DType::I64}) {
    INFO(engine::dtype_name(dtype));
    Tensor cpu = Tensor::zeros({9, 5}, dtype), gpu = Tensor::zeros({9, 5}, dtype, kGpu);
    cpu.transpose(0, 1).slice(1, 1, 9, 2).fill_(-3.7);
    gpu.transpose(0, 1).slice(1, 1, 9, 2).fill_(-3.7);
    require_equal(gpu, cpu, "fill");
    require_equal(Tensor::full({7}, 0.0, dtype, kGpu), Tensor::full({7}, 0.0, dtype), "zero fill");
  }
}

TEST_CASE("cuda: rand and randn draw the CPU's values", "[cuda][random]") {
  for (int64_t n : {1, 2, 3, 7, 33, 1000, 4097})
    for (DType dtype : {DType::F32, DType::F64, DType::BF16}) {
      INFO("n " << n << " " << engine::dtype_name(dtype));
      engine::Generator a(42), b(42);
      a.reserve(5), b.reserve(5);  // a non-zero starting block offset
      // Uniform: the same integer and double arithmetic, so bit-identical.
      require_equal(Tensor::rand({n}, b, -2, 3, dtype, kGpu), Tensor::rand({n}, a, -2, 3, dtype), "rand");
      // Normal: equal but for the last bit of double log/cos/sin (CUDA's vs
      // glibc's, both within 1 ulp), which f32 rounding almost always hides.
      const double tolerance = dtype == DType::F64 ? 1e-14 : dtype == DType::F32 ? 2 * kF32Eps : 1.0 / 128;
      require_near(Tensor::randn({n}, b, 0.5, 2, dtype, kGpu), Tensor::randn({n}, a, 0.5, 2, dtype), tolerance,
                   "randn");
    }
}

TEST_CASE("cuda: dropout masks are the CPU's, forward and backward", "[cuda][random]") {
  for (int64_t n : {1, 3, 7, 33, 1000, 4097})
    for (DType dtype : {DType::F32, DType::F64}) {
      INFO("n " << n << " " << engine::dtype_name(dtype));
      Tensor x = random({n}, 7, dtype);
      x.set_requires_grad(true);
      Tensor xg = gpu_leaf(x);
      engine::Generator a(9), b(9);
      a.reserve(3), b.reserve(3);
      Tensor y = engine::dropout(x, 0.3, true, a), yg = engine::dropout(xg, 0.3, true, b);
      require_equal(yg, y, "dropout forward");  // keep iff uniform >= p, scaled by the same rounded 1/(1-p)
      Tensor w = random({n}, 8, dtype);
      engine::sum(engine::mul(y, w)).backward();
      engine::sum(engine::mul(yg, w.to(kGpu))).backward();
      require_equal(xg.grad(), x.grad(), "dropout backward");
    }
  // One element into a buffer: not 16-byte aligned, so not in packs of 4.
  const Tensor base = random({1001}, 10);
  engine::Generator a(4), b(4);
  require_equal(engine::dropout(base.to(kGpu).slice(0, 1, 1001), 0.3, true, b),
                engine::dropout(base.slice(0, 1, 1001), 0.3, true, a), "misaligned dropout");
}

TEST_CASE("cuda: dropout_add is the CPU's, in one dtype and for bf16 x on an f32 residual", "[cuda][random]") {
  for (int64_t n : {1, 7, 1000, 4097})
    for (const auto& [x_dtype, r_dtype] : {std::pair{DType::F32, DType::F32}, std::pair{DType::F64, DType::F64},
                                           std::pair{DType::BF16, DType::F32}}) {
      INFO("n " << n << " x " << engine::dtype_name(x_dtype) << " residual " << engine::dtype_name(r_dtype));
      Tensor r = random({n}, 11, r_dtype), x = random({n}, 12, DType::F32).to(x_dtype);
      r.set_requires_grad(true), x.set_requires_grad(true);
      Tensor rg = gpu_leaf(r), xg = gpu_leaf(x);
      engine::Generator a(9), b(9);
      Tensor y = engine::dropout_add(r, x, 0.3, true, a), yg = engine::dropout_add(rg, xg, 0.3, true, b);
      require_equal(yg, y, "dropout_add forward");  // the product rounded on its own on both devices
      Tensor w = random({n}, 13, r_dtype);
      engine::sum(engine::mul(y, w)).backward();
      engine::sum(engine::mul(yg, w.to(kGpu))).backward();
      require_equal(rg.grad(), r.grad(), "dropout_add residual gradient");
      require_equal(xg.grad(), x.grad(), "dropout_add x gradient");  // bf16 for bf16 x, rounded once
    }
}

// ---------------------------------------------------------------- elementwise

TEST_CASE("cuda: every unary op on strided inputs", "[cuda][elementwise]") {
  using engine::UnaryOp;
  const UnaryOp ops[] = {UnaryOp::Neg,    UnaryOp::Exp,    UnaryOp::Log,       UnaryOp::Sqrt,      UnaryOp::Rsqrt,
                         UnaryOp::Tanh,   UnaryOp::Abs,    UnaryOp::Square,    UnaryOp::Pow,       UnaryOp::AddScalar,
                         UnaryOp::MulScalar, UnaryOp::Relu, UnaryOp::Sigmoid};
  for (DType dtype : {DType::F32, DType::F64})
    for (UnaryOp op : ops) {
      INFO("op " << int(op) << " " << engine::dtype_name(dtype));
      const bool positive = op == UnaryOp::Log || op == UnaryOp::Sqrt || op == UnaryOp::Rsqrt || op == UnaryOp::Pow;
      Tensor base = random({33, 14}, 11, dtype, positive ? 0.01 : -4, 4);
      auto [cpu, gpu] = both(base, [](const Tensor& t) { return t.slice(1, 0, 14, 2).transpose(0, 1); });
      Tensor out_cpu = Tensor::empty(cpu.shape(), dtype), out_gpu = Tensor::empty(gpu.shape(), dtype, kGpu);
      cpu_backend().unary(op, view_of(out_cpu), view_of(cpu), 1.7);
      gpu_backend().unary(op, view_of(out_gpu), view_of(gpu), 1.7);
      // CUDA's expf/logf/tanhf/powf are within 2-4 ulp, glibc's within 1:
      // 8 f32 ulps of each result. f64 alike, at 1e-14.
      require_close_each(out_gpu, out_cpu, dtype == DType::F32 ? 8 * kF32Eps : 1e-14, "unary");
    }
}

TEST_CASE("cuda: every binary op and where, with broadcasting and transposed operands", "[cuda][elementwise]") {
  using engine::BinaryOp;
  const BinaryOp ops[] = {BinaryOp::Add,     BinaryOp::Sub,     BinaryOp::Mul,   BinaryOp::Div,
                          BinaryOp::Maximum, BinaryOp::Minimum, BinaryOp::Equal, BinaryOp::Greater};
  const Shape shape{5, 7, 33};
  for (DType dtype : {DType::F32, DType::F64}) {
    auto [a_cpu, a_gpu] = both(random({33, 7, 5}, 1, dtype), [](const Tensor& t) { return t.permute({2, 1, 0}); });
    // b is [7, 1] broadcast to [5, 7, 33]; a few of its values equal a's, for Equal.
    auto [b_cpu, b_gpu] = both(random({7, 1}, 2, dtype), [](const Tensor& t) { return t; });
    for (BinaryOp op : ops) {
      INFO("op " << int(op) << " " << engine::dtype_name(dtype));
      Tensor out_cpu = Tensor::empty(shape, dtype), out_gpu = Tensor::empty(shape, dtype, kGpu);
      cpu_backend().binary(op, view_of(out_cpu), engine::detail::broadcast_view(a_cpu, shape),
                           engine::detail::broadcast_view(b_cpu, shape));
      gpu_backend().binary(op, view_of(out_gpu), engine::detail::broadcast_view(a_gpu, shape),
                           engine::detail::broadcast_view(b_gpu, shape));
      require_equal(out_gpu, out_cpu, "binary");  // one IEEE operation: exact
    }
    for (DType cond_dtype : {DType::F32, DType::F64, DType::BF16, DType::F16, DType::I32, DType::I64}) {
      INFO("where, condition " << engine::dtype_name(cond_dtype));
      // Values in [0, 2): about a third exactly 0, and integer casts give 0s and 1s.
      Tensor cond = engine::maximum(random({5, 1, 33}, 3, DType::F32, -1, 2), Tensor::zeros({})).to(cond_dtype);
      require_equal(engine::where(cond.to(kGpu), a_gpu, b_gpu), engine::where(cond, a_cpu, b_cpu), "where");
    }
  }
}

TEST_CASE("cuda: binary ops four at a time: same shape, broadcast rows, in place, and misaligned",
          "[cuda][elementwise]") {
  using engine::BinaryOp;
  for (DType dtype : {DType::F32, DType::F64}) {
    INFO(engine::dtype_name(dtype));
    // Rows of 68: columns [0, 64) line up on packs of 4; columns [1, 65) start one element off.
    const Tensor a = random({6, 68}, 1, dtype), b = random({6, 64}, 2, dtype), bias = random({64}, 3, dtype);
    const Tensor a_gpu = a.to(kGpu), b_gpu = b.to(kGpu), bias_gpu = bias.to(kGpu);
    for (int64_t first : {0, 1}) {
      INFO("columns from " << first);
      const Tensor x = a.slice(1, first, first + 64), x_gpu = a_gpu.slice(1, first, first + 64);
      require_equal(engine::add(x_gpu, b_gpu), engine::add(x, b), "add");
      require_equal(engine::div(x_gpu, b_gpu), engine::div(x, b), "div");
      require_equal(engine::mul(x_gpu, bias_gpu), engine::mul(x, bias), "bias broadcast over rows");
      require_equal(engine::sub(bias_gpu, x_gpu), engine::sub(bias, x), "bias first");
      for (BinaryOp op : {BinaryOp::Add, BinaryOp::Maximum}) {  // out is a: each pack read, then written
        Tensor in_place = x.contiguous(), in_place_gpu = x_gpu.contiguous();
        cpu_backend().binary(op, view_of(in_place), view_of(in_place), view_of(b));
        gpu_backend().binary(op, view_of(in_place_gpu), view_of(in_place_gpu), view_of(b_gpu));
        require_equal(in_place_gpu, in_place, "in place");
      }
    }
  }
  // Mixed precision's residual add: f32 with bf16 into f32, the bf16 side read as it is, widened exactly.
  const Tensor wide = random({6, 68}, 4), narrow = random({6, 64}, 5, DType::BF16), row = random({64}, 6, DType::BF16);
  const Tensor wide_gpu = wide.to(kGpu), narrow_gpu = narrow.to(kGpu), row_gpu = row.to(kGpu);
  for (int64_t first : {0, 1}) {
    INFO("mixed, columns from " << first);
    const Tensor x = wide.slice(1, first, first + 64), x_gpu = wide_gpu.slice(1, first, first + 64);
    const Tensor sum_gpu = engine::add(x_gpu, narrow_gpu);
    REQUIRE(sum_gpu.dtype() == DType::F32);
    require_equal(sum_gpu, engine::add(x, narrow), "f32 + bf16");
    require_equal(engine::mul(narrow_gpu, x_gpu), engine::mul(narrow, x), "bf16 * f32");
    require_equal(engine::sub(x_gpu, row_gpu), engine::sub(x, row), "bf16 broadcast over rows");
  }
}

// ---------------------------------------------------------------- reductions

TEST_CASE("cuda: sum and max over any dims of strided inputs", "[cuda][reduce]") {
  struct Case {
    Shape shape;
    std::vector<int64_t> dims;
  };
  const Case cases[] = {{{1}, {}},          {{7}, {0}},           {{1000}, {}},        {{5, 7, 33}, {2}},
                        {{5, 7, 33}, {0}},  {{5, 7, 33}, {0, 2}}, {{5, 7, 33}, {1}},   {{5, 7, 33}, {}},
                        {{2048, 130}, {0}}, {{130, 2048}, {1}},   {{3, 1, 4}, {1}},    {{1 << 20}, {0}}};
  for (DType dtype : {DType::F32, DType::F64})
    for (const Case& c : cases)
      for (bool transposed : {false, true}) {
        if (transposed && c.shape.size() < 2) continue;
        INFO("shape " << engine::shape_str(c.shape) << " transposed " << transposed << " " << engine::dtype_name(dtype));
        Shape stored = c.shape;
        if (transposed) std::swap(stored[0], stored[1]);
        auto view = [&](const Tensor& t) { return transposed ? t.transpose(0, 1) : t; };
        auto [cpu, gpu] = both(random(stored, 5, dtype), view);
        int64_t block = 1;
        for (size_t d = 0; d < c.shape.size(); ++d)
          if (c.dims.empty() || std::find(c.dims.begin(), c.dims.end(), int64_t(d)) != c.dims.end()) block *= c.shape[d];
        // f32 sums accumulate in f32 on the GPU (in double on the CPU). With
        // |x| <= 1, rounding errors of random sign add up to about
        // ulp * sqrt(n) per level of the summation tree; allow 4x that over
        // log2(n) + 1 levels, in absolute terms. (1e-2 for n = 2^20; an
        // indexing mistake costs whole elements, O(1).)
        const double n = double(block);
        const double tolerance = dtype == DType::F32 ? 4 * kF32Eps * std::sqrt(n) * (std::log2(n) + 1) : 1e-15 * n;
        require_within(engine::sum(gpu, c.dims, true), engine::sum(cpu, c.dims, true), tolerance, "sum");
        if (c.dims.size() == 1) require_equal(engine::max(gpu, c.dims[0], true), engine::max(cpu, c.dims[0], true), "max");
      }
}

TEST_CASE("cuda: max propagates NaN and argmax keeps the CPU's first-index and NaN rules", "[cuda][reduce]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // Ties (first index wins), a NaN in column 0 (it wins), NaN elsewhere (skipped), all NaN.
  std::vector<double> rows = {1, 3, 3, 2,  nan, 5, 6, 7,  1, nan, 4, 4,  nan, nan, nan, nan,  -1, -1, -1, -1};
  Tensor cpu = Tensor::from_vector(rows, {5, 4});
  Tensor gpu = cpu.to(kGpu);
  require_equal(engine::argmax(gpu, -1), engine::argmax(cpu, -1), "argmax");
  require_equal(engine::max(gpu, 1), engine::max(cpu, 1), "max with NaN");
  Tensor wide = random({3, 50257}, 4);
  require_equal(engine::argmax(wide.to(kGpu), -1), engine::argmax(wide, -1), "argmax over a vocabulary row");
  require_equal(engine::argmax(wide.to(kGpu), 0), engine::argmax(wide, 0), "argmax over dim 0");
}

// ---------------------------------------------------------------- matmul

TEST_CASE("cuda: matmul in f32, f64, TF32 and bf16, plain, transposed and batched", "[cuda][matmul]") {
  struct Case {
    Shape a, b;
    bool transpose_a, transpose_b;
  };
  const Case cases[] = {{{1, 1}, {1, 1}, false, false},     {{7, 33}, {33, 5}, false, false},
                        {{33, 7}, {5, 33}, true, true},     {{1000, 33}, {33, 7}, false, false},
                        {{3, 7, 33}, {3, 33, 5}, false, false}, {{3, 33, 7}, {33, 5}, true, false},
                        {{2, 3, 7, 64}, {64, 65}, false, false}, {{4, 1, 1}, {4, 1, 9}, false, false}};
  for (const Case& c : cases) {
    INFO("a " << engine::shape_str(c.a) << (c.transpose_a ? "^T" : "") << " b " << engine::shape_str(c.b)
              << (c.transpose_b ? "^T" : ""));
    auto last_two = [](bool t) {
      return [t](const Tensor& x) { return t ? x.transpose(-1, -2) : x; };
    };
    const int64_t K = c.transpose_a ? c.a[c.a.size() - 2] : c.a.back();
    for (DType dtype : {DType::F32, DType::F64}) {
      auto [a_cpu, a_gpu] = both(random(c.a, 1, dtype), last_two(c.transpose_a));
      auto [b_cpu, b_gpu] = both(random(c.b, 2, dtype), last_two(c.transpose_b));
      // cuBLAS and OpenBLAS sum the K products in different orders: each
      // result is within about K ulps of the sum of |a||b| (<= K here).
      const double tolerance = (dtype == DType::F32 ? kF32Eps : 1e-16) * 2 * double(K);
      require_near(engine::matmul(a_gpu, b_gpu), engine::matmul(a_cpu, b_cpu), tolerance, "matmul");
      if (dtype == DType::F32) {
        // TF32 rounds the inputs to 10 mantissa bits: about 2^-11 relative per product.
        engine::set_allow_tf32(true);
        Tensor tf32 = engine::matmul(a_gpu, b_gpu);
        engine::set_allow_tf32(false);
        require_near(tf32, engine::matmul(a_cpu, b_cpu), std::pow(2.0, -10) * double(K), "matmul TF32");
        // bf16 in, f32 accumulation, bf16 out: against the f32 product of the
        // same bf16-rounded inputs, rounded to bf16 (one bf16 ulp, 2^-8, apart at most).
        Tensor ref = engine::matmul(a_cpu.to(DType::BF16).to(DType::F32), b_cpu.to(DType::BF16).to(DType::F32));
        Tensor got = engine::matmul(a_gpu.to(DType::BF16), b_gpu.to(DType::BF16));
        REQUIRE(got.dtype() == DType::BF16);
        require_near(got, ref.to(DType::BF16), 1.0 / 128, "matmul bf16");
      }
    }
  }
  // Gradients through matmul, with the weight frozen and not.
  Tensor x = random({5, 7, 33}, 3), w = random({33, 9}, 4);
  x.set_requires_grad(true), w.set_requires_grad(true);
  Tensor xg = gpu_leaf(x), wg = gpu_leaf(w);
  Tensor up = random({5, 7, 9}, 5);
  engine::sum(engine::mul(engine::matmul(x, w), up)).backward();
  engine::sum(engine::mul(engine::matmul(xg, wg), up.to(kGpu))).backward();
  require_near(xg.grad(), x.grad(), 64 * kF32Eps * 9, "matmul dx");
  require_near(wg.grad(), w.grad(), 64 * kF32Eps * 35, "matmul dw");
}

TEST_CASE("cuda: matmul of views that start off an alignment boundary", "[cuda][matmul]") {
  // cuBLASLt's algorithm is chosen for the pointers' alignment: views 1 and 3 elements in must work too.
  for (DType dtype : {DType::F32, DType::BF16}) {
    INFO(engine::dtype_name(dtype));
    const Tensor a = random({9, 44}, 1).to(dtype), b = random({44, 13}, 2).to(dtype);
    const Tensor a_gpu = a.to(kGpu), b_gpu = b.to(kGpu);
    for (int64_t first : {0, 1, 3}) {
      INFO("from element " << first);
      const Tensor got = engine::matmul(a_gpu.slice(1, first, first + 40), b_gpu.slice(0, first, first + 40));
      const Tensor ref = engine::matmul(a.slice(1, first, first + 40).to(DType::F32),
                                        b.slice(0, first, first + 40).to(DType::F32));
      // f32: about K ulps apart; bf16 out: one bf16 ulp (2^-8) relative, at most.
      require_near(got.to(DType::F32), dtype == DType::F32 ? ref : ref.to(DType::BF16).to(DType::F32),
                   dtype == DType::F32 ? kF32Eps * 80 : 1.0 / 64, "matmul of offset views");
    }
  }
}

TEST_CASE("cuda: linear's bias in the cuBLASLt epilogue, and added after batched and f64 GEMMs", "[cuda][matmul]") {
  for (DType dtype : {DType::F32, DType::F64}) {
    Tensor x = random({3, 40, 33}, 1, dtype), w = random({33, 17}, 2, dtype), bias = random({17}, 3, dtype);
    x.set_requires_grad(true), bias.set_requires_grad(true);
    Tensor xg = gpu_leaf(x), bg = gpu_leaf(bias);
    const Tensor up = random({40, 3, 17}, 4, dtype);
    const double tolerance = (dtype == DType::F32 ? kF32Eps : 1e-16) * 2 * 33;
    // A contiguous input (one GEMM, fused bias) and a permuted one (a GEMM per batch entry).
    for (bool permuted : {false, true}) {
      auto input = [&](const Tensor& t) { return permuted ? t.permute({1, 0, 2}) : t; };
      Tensor y = engine::linear(input(x), w, bias, engine::WeightLayout::InOut);
      Tensor yg = engine::linear(input(xg), w.to(kGpu), bg, engine::WeightLayout::InOut);
      require_near(yg, y, tolerance, "linear");
      x.zero_grad(), bias.zero_grad(), xg.zero_grad(), bg.zero_grad();
      engine::sum(engine::mul(y, input(up.permute({1, 0, 2})))).backward();
      engine::sum(engine::mul(yg, input(up.permute({1, 0, 2}).to(kGpu)))).backward();
      require_near(xg.grad(), x.grad(), tolerance, "linear dx");
      require_near(bg.grad(), bias.grad(), tolerance * 4, "linear dbias");
    }
  }
}

TEST_CASE("cuda: addmm's addend as cuBLASLt's C, or copied into C before batched and f64 GEMMs", "[cuda][matmul]") {
  for (DType dtype : {DType::F32, DType::F64}) {
    Tensor c = random({3, 40, 17}, 5, dtype), x = random({3, 40, 33}, 1, dtype), w = random({33, 17}, 2, dtype);
    Tensor bias = random({17}, 6, dtype);
    for (Tensor* t : {&c, &x, &w, &bias}) t->set_requires_grad(true);
    Tensor cg = gpu_leaf(c), xg = gpu_leaf(x), wg = gpu_leaf(w), bg = gpu_leaf(bias);
    const Tensor up = random({3, 40, 17}, 4, dtype);
    const double tolerance = (dtype == DType::F32 ? kF32Eps : 1e-16) * 2 * 33;
    // A contiguous input (one GEMM) and a permuted one (a GEMM per batch entry); with and without a bias.
    for (const auto& [permuted, biased] : {std::pair{false, false}, std::pair{true, false}, std::pair{false, true},
                                           std::pair{true, true}}) {
      INFO("permuted " << permuted << " bias " << biased);
      auto view = [&](const Tensor& t) { return permuted ? t.permute({1, 0, 2}) : t; };
      const Tensor y = engine::addmm(view(c), view(x), w, biased ? bias : Tensor());
      const Tensor yg = engine::addmm(view(cg), view(xg), wg, biased ? bg : Tensor());
      require_near(yg, y, tolerance, "addmm");
      for (Tensor* t : {&c, &x, &w, &bias, &cg, &xg, &wg, &bg}) t->zero_grad();
      engine::sum(engine::mul(y, view(up))).backward();
      engine::sum(engine::mul(yg, view(up).to(kGpu))).backward();
      require_near(cg.grad(), c.grad(), 0, "addmm dc");
      require_near(xg.grad(), x.grad(), tolerance, "addmm dx");
      require_near(wg.grad(), w.grad(), tolerance * 8, "addmm dw");
      if (biased) require_near(bg.grad(), bias.grad(), tolerance * 8, "addmm dbias");
    }
  }
}

TEST_CASE("cuda: linear_gelu's GELU in the cuBLASLt epilogue is GPT-2's gelu_new", "[cuda][matmul]") {
  {
    // The GELU itself: through an identity weight the products are exact, so
    // the fused output must be gelu_new(x) up to how tanh is evaluated.
    // cuBLASLt's tanh is good to ~2e-6, which 0.5 x (1 + tanh) turns into at
    // most ~5e-6 for |x| <= 5; the erf GELU differs from this tanh form by
    // 1e-4 to 4e-4 over much of that range, and would fail 1.5e-5.
    std::vector<float> eye(64, 0.f);
    for (int i = 0; i < 8; ++i) eye[size_t(i * 9)] = 1.f;
    const Tensor x = random({256, 8}, 9, DType::F32, -5, 5), w = Tensor::from_vector(eye, {8, 8});
    const Tensor fused = engine::linear_gelu(x.to(kGpu), w.to(kGpu), Tensor::zeros({8}, DType::F32, kGpu),
                                             engine::WeightLayout::InOut);
    require_within(fused, engine::gelu_new(x), 1.5e-5, "gelu of the epilogue");
  }
  // In f32, with a plain and a permuted input (bf16 under autocast: test_cuda_mixed).
  Tensor x = random({4, 40, 64}, 1, DType::F32, -3, 3), w = random({64, 24}, 2), bias = random({24}, 3);
  x.set_requires_grad(true), w.set_requires_grad(true), bias.set_requires_grad(true);
  Tensor xg = gpu_leaf(x), wg = gpu_leaf(w), bg = gpu_leaf(bias);
  const Tensor up = random({40, 4, 24}, 4);  // permuted below to y's shape
  for (bool permuted : {false, true}) {
    INFO("permuted " << permuted);
    auto input = [&](const Tensor& t) { return permuted ? t.permute({1, 0, 2}) : t; };
    Tensor y = engine::linear_gelu(input(x), w, bias, engine::WeightLayout::InOut);
    Tensor yg = engine::linear_gelu(input(xg), wg, bg, engine::WeightLayout::InOut);
    // Sums of 64 products (the f32 matmul tolerance), then the GELU (slope <= 1.13).
    require_near(yg, y, 4 * kF32Eps * 64, "linear_gelu");
    for (Tensor* t : {&x, &w, &bias, &xg, &wg, &bg}) t->zero_grad();
    engine::sum(engine::mul(y, input(up.permute({1, 0, 2})))).backward();
    engine::sum(engine::mul(yg, input(up.permute({1, 0, 2}).to(kGpu)))).backward();
    require_near(xg.grad(), x.grad(), 4 * kF32Eps * 64, "dx");
    require_near(wg.grad(), w.grad(), 4 * kF32Eps * 160, "dw");
    require_near(bg.grad(), bias.grad(), 4 * kF32Eps * 160, "dbias");
  }
}

// ---------------------------------------------------------------- indexing

TEST_CASE("cuda: embedding and index_select gather rows and scatter-add gradients", "[cuda][index]") {
  for (DType id_dtype : {DType::I32, DType::I64}) {
    INFO("ids " << engine::dtype_name(id_dtype));
    Tensor table = random({1000, 33}, 1);
    table.set_requires_grad(true);
    // Repeated ids: the scatter-add must accumulate them (atomics: any order).
    std::vector<int64_t> ids_v = {3, 999, 0, 3, 3, 17, 500, 0, 999, 42, 3, 7, 7, 1, 2};
    Tensor ids = Tensor::from_vector(ids_v, {3, 5}).to(id_dtype);
    Tensor y = engine::embedding(table, ids);
    Tensor up = random({3, 5, 33}, 2);
    engine::sum(engine::mul(y, up)).backward();
    // Ids on the GPU are checked there; ids on the host are checked on the host and copied over.
    for (Device ids_device : {kGpu, Device::cpu()}) {
      INFO("ids on " << ids_device.str());
      Tensor table_g = gpu_leaf(table);
      Tensor yg = engine::embedding(table_g, ids.to(ids_device));
      require_equal(yg, y, "embedding forward");
      engine::sum(engine::mul(yg, up.to(kGpu))).backward();
      require_near(table_g.grad(), table.grad(), 4 * kF32Eps, "embedding backward");  // <= 5 adds per element

      Tensor bad = Tensor::from_vector(std::vector<int64_t>{1, 1000}, {2}).to(id_dtype).to(ids_device);
      REQUIRE_THROWS_WITH(engine::embedding(table_g, bad), Catch::Contains("index 1000 (at position 1)"));
      Tensor negative = Tensor::from_vector(std::vector<int64_t>{-1}, {1}).to(id_dtype).to(ids_device);
      REQUIRE_THROWS_AS(engine::embedding(table_g, negative), engine::Error);
    }
  }
  // index_select along an inner dim, of any dtype (rows move as bytes: odd row sizes too).
  for (DType dtype : {DType::F32, DType::F64, DType::BF16, DType::I64}) {
    INFO(engine::dtype_name(dtype));
    Tensor src = random({7, 33, 3}, 3, DType::F64, -100, 100).to(dtype);
    Tensor ids = Tensor::from_vector(std::vector<int64_t>{32, 0, 5, 5}, {4});
    require_equal(engine::index_select(src.to(kGpu), 1, ids.to(kGpu)), engine::index_select(src, 1, ids),
                  "index_select");
    require_equal(engine::index_select(src.to(kGpu), 1, ids), engine::index_select(src, 1, ids),
                  "index_select, indices on the host");
  }
}

// ---------------------------------------------------------------- attention

namespace {

// Attention on both devices; out and every gradient of q, k, v compared. With
// dropout, both devices draw from generators in the same state, so they must
// drop the same probabilities for the outputs to agree.
void check_attention(int64_t B, int64_t H, int64_t T, int64_t D, DType dtype, bool causal, Padding padding,
                     bool grad_q = true, bool grad_k = true, bool grad_v = true, double dropout = 0) {
  INFO("B " << B << " H " << H << " T " << T << " D " << D << " " << engine::dtype_name(dtype) << " causal "
            << causal << " padding " << int(padding) << " grads " << grad_q << grad_k << grad_v << " dropout "
            << dropout);
  Tensor q = random({B, H, T, D}, 1, dtype), k = random({B, H, T, D}, 2, dtype), v = random({B, H, T, D}, 3, dtype);
  q.set_requires_grad(grad_q), k.set_requires_grad(grad_k), v.set_requires_grad(grad_v);
  Tensor qg = gpu_leaf(q), kg = gpu_leaf(k), vg = gpu_leaf(v);
  Tensor mask = make_mask(padding, B, T);
  engine::Generator cpu_gen(99), gpu_gen(99);
  Tensor out = engine::scaled_dot_product_attention(q, k, v, mask, causal, {}, dropout, &cpu_gen);
  Tensor out_g = engine::scaled_dot_product_attention(qg, kg, vg, mask.defined() ? mask.to(kGpu) : Tensor(), causal,
                                                      {}, dropout, &gpu_gen);
  // f32: D-term dot products, the CPU's polynomial exp (2.5e-7 relative) and
  // other summation orders; outputs are averages of values in [-1, 1].
  // f64: both sides recompute P from the same f32 lse, so 1e-6 rather than 1e-13.
  const double tolerance = dtype == DType::F32 ? 2e-5 : 1e-6;
  require_near(out_g, out, tolerance, "attention forward");
  Tensor up = random({B, H, T, D}, 4, dtype);
  engine::sum(engine::mul(out, up)).backward();
  engine::sum(engine::mul(out_g, up.to(kGpu))).backward();
  // dq and dk are scale * P * (dP - delta): differences of terms as large as
  // dO and V. Where they cancel (at T = 1 a query's one key has P = 1, so with
  // dropout dq is F (dO . V) - dO . (F V), zero up to rounding) both devices
  // keep noise of that size, so it, not the tiny result, sets the scale.
  auto require_near_terms = [&](const Tensor& gpu, const Tensor& cpu, const std::string& what) {
    compare(gpu, cpu, [&](double, double scale) { return 4 * tolerance * std::max(scale, 1.0); }, what);
  };
  if (grad_q) require_near_terms(qg.grad(), q.grad(), "dq");
  if (grad_k) require_near_terms(kg.grad(), k.grad(), "dk");
  if (grad_v) require_near(vg.grad(), v.grad(), 4 * tolerance, "dv");
}

}  // namespace

TEST_CASE("cuda: attention at GPT-2's head size against the CPU kernel, T from 1 to 1024", "[cuda][attention]") {
  for (int64_t T : {1, 7, 33, 64, 65, 100, 256})
    for (bool causal : {true, false})
      for (Padding padding : {Padding::None, Padding::Left, Padding::Right, Padding::Holes, Padding::FullRow})
        check_attention(3, 2, T, 64, DType::F32, causal, padding);
  check_attention(1, 2, 1024, 64, DType::F32, true, Padding::Right);
  check_attention(2, 1, 1024, 64, DType::F32, false, Padding::Left);
}

TEST_CASE("cuda: attention for other head sizes, in f64, and with some gradients only", "[cuda][attention]") {
  for (int64_t D : {1, 8, 32, 48, 80, 128, 160})  // tiled up to 128 (padded to 32/64/128), fallback above
    for (bool causal : {true, false}) check_attention(2, 2, 70, D, DType::F32, causal, Padding::Holes);
  for (int64_t T : {1, 33, 130})
    for (bool causal : {true, false}) check_attention(2, 2, T, 24, DType::F64, causal, Padding::Left);
  check_attention(2, 2, 100, 64, DType::F32, true, Padding::Left, false, false, true);   // dv alone
  check_attention(2, 2, 100, 64, DType::F32, true, Padding::Left, true, false, false);   // dq alone
  check_attention(2, 2, 100, 64, DType::F32, false, Padding::Right, false, true, false); // dk alone
}

TEST_CASE("cuda: attention dropout drops the same probabilities as the CPU", "[cuda][attention]") {
  for (int64_t T : {1, 33, 130})
    for (Padding padding : {Padding::None, Padding::Left, Padding::Holes})
      check_attention(2, 3, T, 64, DType::F32, true, padding, true, true, true, 0.3);
  check_attention(2, 2, 70, 48, DType::F32, false, Padding::Right, true, true, true, 0.1);  // tiled at DMAX 64
  check_attention(2, 2, 40, 160, DType::F32, true, Padding::Left, true, true, true, 0.5);   // fallback
  check_attention(2, 2, 33, 24, DType::F64, true, Padding::Holes, true, true, true, 0.2);
}

// ---------------------------------------------------------------- optimiser

TEST_CASE("cuda: AdamW steps are bit-identical to the CPU's", "[cuda][optim]") {
  for (DType dtype : {DType::F32, DType::F64})
    for (int64_t n : {1, 7, 1000, 4097}) {
      INFO("n " << n << " " << engine::dtype_name(dtype));
      Tensor p = random({n}, 1, dtype);
      p.set_requires_grad(true);
      Tensor pg = gpu_leaf(p);
      engine::optim::AdamWOptions options;
      options.lr = 3e-3;
      options.weight_decay = 0.1;
      engine::optim::AdamW cpu_opt({p}, options), gpu_opt({pg}, options);
      for (int step = 0; step < 5; ++step) {
        Tensor w = random({n}, uint64_t(10 + step), dtype, -3, 3);
        cpu_opt.zero_grad(), gpu_opt.zero_grad();
        engine::sum(engine::mul(engine::square(p), w)).backward();
        engine::sum(engine::mul(engine::square(pg), w.to(kGpu))).backward();
        require_equal(pg.grad(), p.grad(), "gradient");  // one multiply and one add per element: exact
        cpu_opt.step(), gpu_opt.step();
        require_equal(pg, p, "parameters after step " + std::to_string(step + 1));
      }
    }
}

TEST_CASE("cuda: one AdamW launch over many parameters matches the CPU bit for bit", "[cuda][optim]") {
  // 53 parameters (more than one launch's 48), sizes around the 1024-element
  // block, an empty one, and one that misses a step (so two step counts).
  std::vector<Tensor> cpu_params, gpu_params;
  for (int64_t i = 0; i < 53; ++i) {
    const int64_t n = i == 7 ? 0 : (i * 379) % 2100 + 1;
    Tensor p = random({n}, uint64_t(100 + i), DType::F32);
    p.set_requires_grad(true);
    cpu_params.push_back(p);
    gpu_params.push_back(gpu_leaf(p));
  }
  engine::optim::AdamWOptions options;
  options.lr = 3e-3;
  options.weight_decay = 0.1;
  engine::optim::AdamW cpu_opt(cpu_params, options), gpu_opt(gpu_params, options);
  for (int step = 0; step < 3; ++step) {
    cpu_opt.zero_grad(), gpu_opt.zero_grad();
    for (size_t i = 0; i < cpu_params.size(); ++i) {
      if (step == 1 && i == 30) continue;  // no gradient: this one stays a step behind
      const Tensor w = random(cpu_params[i].shape(), uint64_t(1000 + 100 * step + int64_t(i)), DType::F32, -3, 3);
      engine::sum(engine::mul(engine::square(cpu_params[i]), w)).backward();
      engine::sum(engine::mul(engine::square(gpu_params[i]), w.to(kGpu))).backward();
    }
    cpu_opt.step(), gpu_opt.step();
    for (size_t i = 0; i < cpu_params.size(); ++i)
      require_equal(gpu_params[i], cpu_params[i], "parameter " + std::to_string(i) + " after step " +
                                                      std::to_string(step + 1));
  }
}

// ---------------------------------------------------------------- autograd integration

TEST_CASE("cuda: finite-difference gradients of CUDA ops in f64", "[cuda][gradcheck]") {
  auto gpu = [](const Tensor& t) { return t.to(kGpu); };
  auto cpu = [](const Tensor& t) { return t.to(kCpu); };
  using Inputs = std::vector<Tensor>;
  testing::check_gradients(
      [&](const Inputs& in) { return cpu(engine::layer_norm(gpu(in[0]), gpu(in[1]), gpu(in[2]))); },
      {testing::random_f64({3, 5}, 1), testing::random_f64({5}, 2), testing::random_f64({5}, 3)});
  testing::check_gradients([&](const Inputs& in) { return cpu(engine::gelu_new(gpu(in[0]))); },
                           {testing::random_f64({4, 3}, 4)});
  testing::check_gradients([&](const Inputs& in) { return cpu(engine::log_softmax(gpu(in[0]), 0)); },
                           {testing::random_f64({4, 3}, 5)});
  testing::check_gradients(
      [&](const Inputs& in) { return cpu(engine::matmul(gpu(in[0]).transpose(0, 1), gpu(in[1]))); },
      {testing::random_f64({3, 4}, 6), testing::random_f64({3, 2}, 7)});
  testing::check_gradients(
      [&](const Inputs& in) {
        Tensor targets = Tensor::from_vector(std::vector<int64_t>{2, -100, 0}, {3}).to(kGpu);
        return cpu(engine::cross_entropy(gpu(in[0]), targets));
      },
      {testing::random_f64({3, 4}, 8)});
  testing::check_gradients(
      [&](const Inputs& in) {
        Tensor mask = make_mask(Padding::Left, 2, 5).to(kGpu);
        return cpu(engine::scaled_dot_product_attention(gpu(in[0]), gpu(in[1]), gpu(in[2]), mask, true));
      },
      {testing::random_f64({2, 1, 5, 3}, 9), testing::random_f64({2, 1, 5, 3}, 10),
       testing::random_f64({2, 1, 5, 3}, 11)},
      1e-6, 1e-5);  // lse is saved in f32, so the f64 backward is good to about 1e-7 relative
  testing::check_gradients(
      [&](const Inputs& in) {
        Tensor a = gpu(in[0]);
        return cpu(engine::sum(engine::mul(engine::max(a, 1, true), engine::exp(a)), {0}));
      },
      {testing::random_f64({3, 4}, 12)});
}

TEST_CASE("cuda: a transformer block trains the same on both devices", "[cuda][integration]") {
  const int64_t B = 2, T = 9, C = 32, H = 4, K = 5;
  std::vector<Tensor> params = {random({C}, 1), random({C}, 2), random({C, 3 * C}, 3, DType::F32, -0.2, 0.2),
                                random({3 * C}, 4), random({C, K}, 5, DType::F32, -0.2, 0.2)};
  for (Tensor& p : params) p.set_requires_grad(true);
  std::vector<Tensor> params_g;
  for (const Tensor& p : params) params_g.push_back(gpu_leaf(p));
  Tensor x = random({B, T, C}, 6);
  Tensor mask = make_mask(Padding::Left, B, T);
  Tensor targets = Tensor::from_vector(std::vector<int64_t>{1, 4}, {B});

  auto forward = [&](const std::vector<Tensor>& p, const Tensor& input, const Tensor& key_mask, const Tensor& t,
                     engine::Generator& gen) {
    Tensor h = engine::layer_norm(input, p[0], p[1]);
    Tensor qkv = engine::linear(h, p[2], p[3], engine::WeightLayout::InOut);
    std::vector<Tensor> parts = engine::split(qkv, C, 2);
    auto heads = [&](const Tensor& z) { return z.reshape({B, T, H, C / H}).permute({0, 2, 1, 3}); };
    Tensor a = engine::scaled_dot_product_attention(heads(parts[0]), heads(parts[1]), heads(parts[2]), key_mask);
    a = engine::dropout(a.permute({0, 2, 1, 3}).reshape({B, T, C}), 0.1, true, gen);
    Tensor y = engine::gelu_new(engine::add(input, a));
    Tensor logits = engine::matmul(y.select(1, T - 1), p[4]);
    return engine::cross_entropy(logits, t);
  };
  engine::Generator a(5), b(5);
  Tensor loss = forward(params, x, mask, targets, a);
  Tensor loss_g = forward(params_g, x.to(kGpu), mask.to(kGpu), targets.to(kGpu), b);
  require_near(loss_g, loss, 1e-5, "loss");
  loss.backward();
  loss_g.backward();
  for (size_t i = 0; i < params.size(); ++i) require_near(params_g[i].grad(), params[i].grad(), 1e-4, "param " + std::to_string(i));
}
