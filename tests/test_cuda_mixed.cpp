// Mixed precision on CUDA against the CPU (engine/precision.h): autocast
// matmul and its gradients, addmm, bf16 linear_gelu (and its GEMMs' tuning),
// concat_linear over a layer norm's room, layer norm into bf16, the
// tensor-core attention kernels for every head size, padding and dropout, and
// a GPT-2 with bf16 frozen weights. The CPU multiplies the same bf16-rounded
// operands in f32, so it is the reference.
// Exits 77 (SKIP in Meson) without a GPU.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_context.h"
#include "engine/cuda/kernels.h"
#include "engine/nn/layers.h"
#include "engine/nn/var_builder.h"
#include "engine/ops.h"
#include "engine/profiler.h"
#include "engine/precision.h"
#include "models/gpt2.h"
#include "tests/cuda_test_util.h"

#include <string>
#include <vector>

using engine::AutocastGuard;
using namespace cuda_test;  // Device, DType, Shape, Tensor and the helpers

int main(int argc, char** argv) { return run_or_skip(argc, argv); }

TEST_CASE("cuda mixed: autocast matmul and its gradients match the CPU's", "[cuda][precision]") {
  for (const auto& [M, K, N] : {std::tuple{7, 33, 5}, std::tuple{300, 64, 96}, std::tuple{1, 1000, 3}}) {
    INFO("M " << M << " K " << K << " N " << N);
    Tensor x = random({2, M, K}, 1), w = random({K, N}, 2), up = random({2, M, N}, 3);
    x.set_requires_grad(true), w.set_requires_grad(true);
    Tensor xg = gpu_leaf(x), wg = gpu_leaf(w);
    Tensor y, yg;
    {
      AutocastGuard autocast(DType::BF16);
      y = engine::matmul(x, w);
      yg = engine::matmul(xg, wg.transpose(0, 1).contiguous().transpose(0, 1));  // a transposed operand too
    }
    REQUIRE(yg.dtype() == DType::BF16);
    // The same bf16 products on both devices, summed in different orders in
    // f32, then rounded to bf16: at worst neighbouring values, one ulp apart,
    // which is at most 2^-7 of the value.
    require_near(yg, y, 1.0 / 128, "forward");
    engine::sum(engine::mul(y, up)).backward();
    engine::sum(engine::mul(yg, up.to(kGpu))).backward();
    require_near(xg.grad(), x.grad(), 2 * kF32Eps * double(N), "dx");
    require_near(wg.grad(), w.grad(), 2 * kF32Eps * double(2 * M), "dw");
  }
}

TEST_CASE("cuda mixed: autocast addmm rounds c + a @ b (+ bias) once on both devices", "[cuda][precision]") {
  // cuBLASLt reads the addend; or it is copied into C first. The bias as an adapter's base layer gives it.
  for (const auto& [permuted, biased] : {std::pair{false, false}, std::pair{true, false}, std::pair{false, true},
                                         std::pair{true, true}}) {
    INFO("permuted " << permuted << " bias " << biased);
    Tensor x = random({2, 70, 48}, 1), w = random({48, 40}, 2), bias = biased ? random({40}, 4) : Tensor();
    auto view = [&](const Tensor& t) { return permuted ? t.permute({1, 0, 2}) : t; };
    Tensor c, cg, y, yg;
    {
      AutocastGuard autocast(DType::BF16);
      c = engine::matmul(x, random({48, 40}, 3));  // a bf16 base output, as an adapter's
      cg = c.to(kGpu);
      y = engine::addmm(view(c), view(x), w, bias);
      yg = engine::addmm(view(cg), view(x.to(kGpu)), w.to(kGpu), biased ? bias.to(kGpu) : Tensor());
    }
    REQUIRE(yg.dtype() == DType::BF16);
    require_near(yg, y, 1.0 / 128, "forward");  // one bf16 ulp: f32 sums in different orders, rounded once
  }
}

TEST_CASE("cuda mixed: bf16 linear_gelu, in cuBLASLt's epilogue or through f32, matches the CPU",
          "[cuda][precision][matmul]") {
  // N = 16: cuBLASLt's GELU_AUX epilogue writes bf16 C and pre-activation; N = 12 is no multiple
  // of 8, which that epilogue needs, so the product and epilogue run in f32 and are rounded after.
  // A permuted input is made contiguous on the way in.
  for (const auto& [N, permuted] : {std::pair{16, false}, std::pair{12, false}, std::pair{16, true}}) {
    INFO("N " << N << " permuted " << permuted);
    const int64_t K = 40;
    Tensor x = random({2, 9, K}, 1), w = random({K, N}, 2), bias = random({N}, 3);
    const Tensor w2 = random({N, 5}, 4), up = random({2, 9, 5}, 5);
    for (Tensor* t : {&x, &w, &bias}) t->set_requires_grad(true);
    Tensor xg = gpu_leaf(x), wg = gpu_leaf(w), bg = gpu_leaf(bias);
    auto input = [&](const Tensor& t) { return permuted ? t.permute({1, 0, 2}).contiguous().permute({1, 0, 2}) : t; };
    Tensor h, hg, y, yg;
    {
      AutocastGuard autocast(DType::BF16);
      h = engine::linear_gelu(input(x), w, bias, engine::WeightLayout::InOut);
      hg = engine::linear_gelu(input(xg), wg, bg, engine::WeightLayout::InOut);
      y = engine::matmul(h, w2);
      yg = engine::matmul(hg, w2.to(kGpu));
    }
    REQUIRE(hg.dtype() == DType::BF16);
    // Sums in different orders may round to neighbouring bf16 values: one ulp, at most 2^-7 of the value.
    require_near(hg, h, 1.0 / 128, "forward");
    engine::sum(engine::mul(y, up)).backward();
    engine::sum(engine::mul(yg, up.to(kGpu))).backward();
    require_near(xg.grad(), x.grad(), 1e-2, "dx");
    require_near(wg.grad(), w.grad(), 1e-2, "dw");
    require_near(bg.grad(), bias.grad(), 1e-2, "dbias");
  }
}

TEST_CASE("cuda mixed: linear_gelu_linear's GELU backward in cuBLASLt's DGELU epilogue matches the CPU",
          "[cuda][precision][matmul]") {
  // N = 16 (the hidden width): cuBLASLt's DGELU reads the saved bf16 pre-activation; N = 12 takes the f32
  // fallback. In f32 as well as under autocast; frozen weights (dX alone) and trained ones.
  for (const auto& [N, bf16, frozen] : {std::tuple{16, true, true}, std::tuple{16, true, false},
                                        std::tuple{12, true, false}, std::tuple{16, false, false}}) {
    INFO("N " << N << " bf16 " << bf16 << " frozen " << frozen);
    const int64_t K = 40;
    Tensor x = random({2, 9, K}, 1), w1 = random({K, N}, 2), b1 = random({N}, 3), w2 = random({N, 24}, 4);
    Tensor b2 = random({24}, 5);
    const Tensor up = random({2, 9, 24}, 6);
    x.set_requires_grad(true);
    for (Tensor* t : {&w1, &b1, &w2, &b2}) t->set_requires_grad(!frozen);
    std::vector<Tensor> cpu = {x, w1, b1, w2, b2}, gpu;
    for (const Tensor& t : cpu) gpu.push_back(gpu_leaf(t));
    auto mlp = [](const std::vector<Tensor>& in) {
      return engine::linear_gelu_linear(in[0], in[1], in[2], in[3], in[4], engine::WeightLayout::InOut);
    };
    Tensor y, yg;
    {
      AutocastGuard autocast(bf16 ? DType::BF16 : DType::F32);
      y = mlp(cpu);
      yg = mlp(gpu);
    }
    REQUIRE(yg.dtype() == (bf16 ? DType::BF16 : DType::F32));
    require_near(yg, y, bf16 ? 1.0 / 128 : 64 * kF32Eps, "forward");
    engine::sum(engine::mul(y.to(DType::F32), up)).backward();
    engine::sum(engine::mul(yg.to(DType::F32), up.to(kGpu))).backward();
    const char* names[] = {"dx", "dw1", "db1", "dw2", "db2"};
    for (size_t i = 0; i < 5; ++i)
      if (cpu[i].requires_grad()) require_near(gpu[i].grad(), cpu[i].grad(), bf16 ? 1e-2 : 256 * kF32Eps, names[i]);
  }
}

TEST_CASE("cuda mixed: GELU-epilogue GEMMs timed for their fastest algorithm give the first pick's bits",
          "[cuda][precision][matmul]") {
  // gpt2-large's MLP over 2048 tokens, frozen weights: c_fc in GELU_AUX, c_proj's dX in DGELU. Tuning
  // chooses among candidates that add up each sum in one pass, so every output bit must match.
  const int64_t C = 1280;
  const Tensor x = random({32, 64, C}, 1).to(kGpu), w1 = random({C, 4 * C}, 2, DType::F32, -0.03, 0.03).to(kGpu);
  const Tensor b1 = random({4 * C}, 3).to(kGpu), w2 = random({4 * C, C}, 4, DType::F32, -0.03, 0.03).to(kGpu);
  const Tensor b2 = random({C}, 5).to(kGpu), up = random({32, 64, C}, 6).to(kGpu);
  auto run = [&](bool tuned) {
    engine::set_gelu_gemm_tuning(tuned);
    Tensor in = x.detach();
    in.set_requires_grad(true);
    Tensor y;
    {
      AutocastGuard autocast(DType::BF16);
      y = engine::linear_gelu_linear(in, w1, b1, w2, b2, engine::WeightLayout::InOut);
    }
    engine::sum(engine::mul(y.to(DType::F32), up)).backward();
    return std::pair{y, in.grad()};
  };
  const auto [y_first, dx_first] = run(false);
  const auto [y_tuned, dx_tuned] = run(true);
  require_equal(y_tuned, y_first, "forward");
  require_equal(dx_tuned, dx_first, "dx");
  CHECK(engine::gelu_gemm_tuned());  // left on, the default
}

TEST_CASE("cuda mixed: concat_linear's one GEMM over a layer norm's room matches the CPU's", "[cuda][precision]") {
  // CURLoRA's c_attn under autocast: ln_1 writes bf16 rows with room, t2 = (x C) U goes into it, and [W; R]
  // (bf16, one buffer) multiplies both in one GEMM; the bias is one more row of it against a column of ones
  // in the room (room 16), or in its epilogue (room 8). The backward's [dx | dt2] = g [W; R]^T is one GEMM
  // too, and x C's backward adds dt1 C^T to dx's spaced rows in its own.
  const int64_t C = 64, N = 96, r = 8, rows = engine::joint_rows(C, r);
  REQUIRE(rows == C + 16);
  for (const int64_t room : {rows - C, r}) {
    INFO("room " << room);
    Tensor x = engine::add(random({4, 16, C}, 1), 2.0), u = random({r, r}, 2);
    x.set_requires_grad(true), u.set_requires_grad(true);
    const Tensor ln_w = random({C}, 3), ln_b = random({C}, 4), up = random({4, 16, N}, 7), c = random({C, r}, 8);
    const Tensor stacked = Tensor::zeros({rows, N}, DType::BF16);  // [W; R; b; 0]
    stacked.narrow(0, 0, C + r + 1).copy_(random({C + r + 1, N}, 5));
    Tensor xg = gpu_leaf(x), ug = gpu_leaf(u);
    auto layer = [&](const Tensor& in, const Tensor& core, Device device) {
      AutocastGuard autocast(DType::BF16);
      engine::Profiler profiler;
      const Tensor normed = engine::layer_norm(in, ln_w.to(device), ln_b.to(device), 1e-5, DType::BF16, room);
      const Tensor t2 = engine::matmul(engine::matmul(normed, c.to(DType::BF16).to(device)), core);
      const Tensor w = stacked.to(device);
      const Tensor y = engine::concat_linear(normed, t2, w.narrow(0, 0, C), w.narrow(0, C, r),
                                             w.narrow(0, C + r, 1).reshape({N}));
      if (device.is_cuda()) {
        CHECK(profiler.calls("gemm") == 3);  // (the CPU counts its f32 epilogue's too)
        CHECK(profiler.calls("fill") == (room > r ? 2 : 0));  // the bias row's ones, then zeros
      }
      return y;
    };
    const Tensor y = layer(x, u, kCpu), yg = layer(xg, ug, kGpu);
    REQUIRE(yg.dtype() == DType::BF16);
    require_near(yg, y, 1.0 / 64, "forward");
    engine::sum(engine::mul(y.to(DType::F32), up)).backward();
    engine::Profiler profiler;
    engine::sum(engine::mul(yg.to(DType::F32), up.to(kGpu))).backward();
    CHECK(profiler.calls("gemm") == 4);  // [dx | dt2], dt2 U^T, dU, dx + dt1 C^T (a copy first would count twice)
    require_near(xg.grad(), x.grad(), 1e-2, "dx");
    require_near(ug.grad(), u.grad(), 1e-2, "du");
  }
}

TEST_CASE("cuda mixed: layer_norm with a bf16 output and bf16 gradient matches the CPU", "[cuda][precision][nn]") {
  for (bool frozen : {false, true}) {
    INFO("frozen " << frozen);
    Tensor x = engine::add(random({300, 1280}, 1), 3.0), w = random({1280}, 2), b = random({1280}, 3);
    const Tensor up = random({300, 1280}, 4);
    x.set_requires_grad(true), w.set_requires_grad(!frozen), b.set_requires_grad(!frozen);
    Tensor xg = gpu_leaf(x), wg = gpu_leaf(w), bg = gpu_leaf(b);
    const Tensor y = engine::layer_norm(x, w, b, 1e-5, DType::BF16);
    const Tensor yg = engine::layer_norm(xg, wg, bg, 1e-5, DType::BF16);
    REQUIRE(yg.dtype() == DType::BF16);
    // f32 results a few ulps apart (tree vs sequential row sums) round to the same or neighbouring bf16 values.
    require_near(yg, y, 1.0 / 128, "forward");
    engine::sum(engine::mul(y, up)).backward();
    engine::sum(engine::mul(yg, up.to(kGpu))).backward();
    require_near(xg.grad(), x.grad(), 64 * kF32Eps, "dx");
    if (!frozen) {
      require_near(wg.grad(), w.grad(), 256 * kF32Eps, "dweight");
      require_near(bg.grad(), b.grad(), 256 * kF32Eps, "dbias");
    }
  }
}

namespace {

// Attention under autocast on both devices. The CPU multiplies the bf16 q, k,
// v (and dO) in f32 throughout; the tensor cores also round P and dS to bf16
// before their products, as flash attention does. Each rounding moves a term
// by at most 2^-9 of itself, and out = sum_j P_ij v_j (with sum_j P_ij = 1)
// moves by at most 2^-9 max|v|: with values in [-1, 1], 2e-3, plus a bf16
// ulp of the output's own rounding (2^-8 below 1). The gradients
// are sums of such terms too; 1e-2 of the largest entry (or of 1) leaves room
// for their sign cancellations while still catching any wrong term.
void check_mixed_attention(int64_t B, int64_t H, int64_t T, int64_t D, bool causal, Padding padding,
                           double dropout = 0) {
  INFO("B " << B << " H " << H << " T " << T << " D " << D << " causal " << causal << " padding " << int(padding)
            << " dropout " << dropout);
  Tensor q = random({B, H, T, D}, 1), k = random({B, H, T, D}, 2), v = random({B, H, T, D}, 3);
  for (Tensor* t : {&q, &k, &v}) t->set_requires_grad(true);
  Tensor qg = gpu_leaf(q), kg = gpu_leaf(k), vg = gpu_leaf(v);
  const Tensor mask = make_mask(padding, B, T);
  engine::Generator cpu_gen(7), gpu_gen(7);
  Tensor out, out_g;
  {
    AutocastGuard autocast(DType::BF16);
    out = engine::scaled_dot_product_attention(q, k, v, mask, causal, {}, dropout, &cpu_gen);
    out_g = engine::scaled_dot_product_attention(qg, kg, vg, mask.defined() ? mask.to(kGpu) : Tensor(), causal, {},
                                                 dropout, &gpu_gen);
  }
  REQUIRE(out_g.dtype() == DType::BF16);
  require_within(out_g, out, 8e-3 / (1 - dropout), "forward");
  const Tensor up = random({B, H, T, D}, 4);
  engine::sum(engine::mul(out.to(DType::F32), up)).backward();
  engine::sum(engine::mul(out_g.to(DType::F32), up.to(kGpu))).backward();
  auto near_terms = [](const Tensor& gpu, const Tensor& cpu, const std::string& what) {
    compare(gpu, cpu, [](double, double scale) { return 1e-2 * std::max(scale, 1.0); }, what);
  };
  near_terms(qg.grad(), q.grad(), "dq");
  near_terms(kg.grad(), k.grad(), "dk");
  near_terms(vg.grad(), v.grad(), "dv");
}

}  // namespace

TEST_CASE("cuda mixed: tensor-core attention at GPT-2's head size, T from 1 to 1024", "[cuda][precision][attention]") {
  for (int64_t T : {1, 7, 64, 65, 100, 256})
    for (bool causal : {true, false})
      for (Padding padding : {Padding::None, Padding::Left, Padding::Holes, Padding::FullRow})
        check_mixed_attention(3, 2, T, 64, causal, padding);
  check_mixed_attention(1, 2, 1024, 64, true, Padding::Right);
  check_mixed_attention(2, 1, 1024, 64, false, Padding::Left);
}

TEST_CASE("cuda mixed: other head sizes (padded, and widened past 128) and dropout", "[cuda][precision][attention]") {
  for (int64_t D : {8, 32, 48, 80, 128, 160})
    for (bool causal : {true, false}) check_mixed_attention(2, 2, 70, D, causal, Padding::Holes);
  // T a multiple of 8 draws one Philox block per eight scores, shared across lanes; others one per score.
  for (int64_t T : {1, 33, 64, 130, 200}) check_mixed_attention(2, 3, T, 64, true, Padding::Left, 0.3);
}

TEST_CASE("cuda mixed: packed attention reads GPT-2's strided q, k, v and writes gradients in their layout",
          "[cuda][precision][attention]") {
  // D = 64: rows start 16-byte aligned and load by cp.async; D = 60: element by element.
  for (int64_t D : {64, 60}) {
    INFO("D " << D);
    const int64_t B = 2, T = 70, H = 3;
    Tensor qkv = random({B, T, 3 * H * D}, 1);
    qkv.set_requires_grad(true);
    Tensor qkv_g = gpu_leaf(qkv);
    const Tensor mask = make_mask(Padding::Left, B, T);
    // As GPT2Attention splits and merges heads.
    auto attend = [&](const Tensor& x, const Tensor& keep) {
      const Tensor packed = x.reshape({B, T, 3, H, D}).permute({2, 0, 3, 1, 4});
      const Tensor a = engine::scaled_dot_product_attention_packed(packed, keep, true, {}, 0, nullptr);
      return a.permute({0, 2, 1, 3}).reshape({B, T, H * D});
    };
    Tensor a, a_g;
    {
      AutocastGuard autocast(DType::BF16);
      a = attend(qkv, mask);
      a_g = attend(qkv_g, mask.to(kGpu));
    }
    REQUIRE(a_g.dtype() == DType::BF16);
    REQUIRE(a_g.is_contiguous());  // the heads merged without a copy
    require_within(a_g, a, 8e-3, "forward");
    const Tensor up = random({B, T, H * D}, 2);
    engine::sum(engine::mul(a.to(DType::F32), up)).backward();
    engine::sum(engine::mul(a_g.to(DType::F32), up.to(kGpu))).backward();
    REQUIRE(qkv_g.grad().is_contiguous());  // dq, dk, dv written straight into [B, T, 3, H, D]
    compare(qkv_g.grad(), qkv.grad(), [](double, double scale) { return 1e-2 * std::max(scale, 1.0); }, "dqkv");
  }
}

// The tensor-core backward straight through its launcher: with scratch for
// one head's dS at a time (the slices a long sequence gets), or asked for
// some gradients only, it must give the whole backward's very bits: slicing
// and skipping reorder launches, not sums. Queries and keys of different
// lengths, a key tile that is all padding, holes and dropout, so that the dQ
// kernel must read exactly the tiles the dK/dV kernel wrote.
TEST_CASE("cuda mixed: the tensor-core backward in slices of heads, or for some gradients, is bit for bit the same",
          "[cuda][precision][attention]") {
  namespace cuda = engine::cuda;
  const int64_t B = 2, H = 3, Tq = 70, Tk = 150, D = 64;
  std::vector<int32_t> keep(size_t(B * Tk), 1);
  for (int64_t j = 0; j < Tk; ++j) keep[size_t(j)] = j % 5 != 1;  // holes
  for (int64_t j = 0; j < 64; ++j) keep[size_t(Tk + j)] = 0;      // batch 1's first key tile: all padding
  const Tensor mask = Tensor::from_vector(keep, {B, Tk}).to(kGpu);
  auto operand = [&](int64_t T, uint64_t seed) { return random({B, H, T, D}, seed).to(DType::BF16).to(kGpu); };
  const Tensor q = operand(Tq, 1), k = operand(Tk, 2), v = operand(Tk, 3), dout = operand(Tq, 4);
  auto strides = [&](int64_t T) { return cuda::HeadStrides{H * T * D, T * D, D}; };
  cuda::AttentionShape shape;
  shape.B = B, shape.H = H, shape.Tq = Tq, shape.Tk = Tk, shape.D = D;
  shape.key_mask = static_cast<const int32_t*>(mask.data_ptr());
  shape.causal = true, shape.scale = 0.125, shape.dropout_p = 0.2, shape.dropout_seed = 9;
  shape.strides = {strides(Tq), strides(Tk), strides(Tk), strides(Tq), strides(Tq), strides(Tq), strides(Tk),
                   strides(Tk)};
  shape.out_bf16 = shape.grads_bf16 = true;
  const cuda::LaunchContext ctx = cuda::device_context(0).launch();
  const Tensor out = Tensor::empty({B, H, Tq, D}, DType::BF16, kGpu), lse = Tensor::empty({B, H, Tq}, DType::F32, kGpu);
  REQUIRE(cuda::launch_attention_forward(ctx, DType::BF16, shape, out.data_ptr(), static_cast<float*>(lse.data_ptr()),
                                         q.data_ptr(), k.data_ptr(), v.data_ptr()) == cudaSuccess);

  const size_t full = cuda::attention_backward_scratch_bytes(DType::BF16, shape);
  const size_t delta = 256 * ((B * H * Tq * 4 + 255) / 256), head = 128 * 192 * 2;  // Tq, Tk padded to tiles
  REQUIRE(full == delta + B * H * head);  // six heads fit the budget: one slice
  auto backward = [&](bool want_dq, bool want_dkv, size_t scratch_bytes) {
    std::vector<Tensor> grads = {Tensor::zeros({B, H, Tq, D}, DType::BF16, kGpu),
                                 Tensor::zeros({B, H, Tk, D}, DType::BF16, kGpu),
                                 Tensor::zeros({B, H, Tk, D}, DType::BF16, kGpu)};
    const Tensor scratch = Tensor::empty({int64_t(scratch_bytes / 4)}, DType::F32, kGpu);
    REQUIRE(cuda::launch_attention_backward(ctx, DType::BF16, shape, want_dq ? grads[0].data_ptr() : nullptr,
                                            want_dkv ? grads[1].data_ptr() : nullptr,
                                            want_dkv ? grads[2].data_ptr() : nullptr, dout.data_ptr(), q.data_ptr(),
                                            k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                            static_cast<const float*>(lse.data_ptr()), scratch.data_ptr(),
                                            scratch_bytes) == cudaSuccess);
    return grads;
  };
  const std::vector<Tensor> whole = backward(true, true, full);
  const Tensor dq_wide = whole[0].to(DType::F32);
  REQUIRE(engine::sum(engine::mul(dq_wide, dq_wide)).item() > 0);  // dS reached dQ
  for (size_t scratch : {delta + head, delta + 4 * head}) {  // six slices of one head; slices of four and two
    INFO("scratch for " << (scratch - delta) / head << " heads");
    const std::vector<Tensor> sliced = backward(true, true, scratch);
    for (size_t i = 0; i < 3; ++i) require_equal(sliced[i], whole[i], "gradient " + std::to_string(i));
  }
  require_equal(backward(true, false, delta + head)[0], whole[0], "dq alone");
  const std::vector<Tensor> dkv = backward(false, true, delta);  // no dQ: no dS, so delta's room is enough
  require_equal(dkv[1], whole[1], "dk without dq");
  require_equal(dkv[2], whole[2], "dv without dq");
  CHECK(cuda::launch_attention_backward(ctx, DType::BF16, shape, whole[0].data_ptr(), nullptr, nullptr,
                                        dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                        static_cast<const float*>(lse.data_ptr()), nullptr,
                                        delta) == cudaErrorInvalidValue);  // dQ without room for one head's dS
}

TEST_CASE("cuda mixed: GPT-2 with bf16 frozen weights under autocast matches the CPU", "[cuda][precision][gpt2]") {
  models::GPT2Config config;
  config.n_layer = 2, config.n_head = 2, config.n_embd = 128, config.vocab_size = 300, config.n_positions = 64;
  auto make = [&](engine::Device device) {
    engine::Generator gen(5);
    auto source = std::make_shared<engine::nn::RandomSource>(gen, DType::F32, device);
    auto model = std::make_shared<models::GPT2LMHeadModel>(config, engine::nn::VarBuilder(source));
    model->freeze("*");
    model->unfreeze("transformer.ln_f.*");
    model->eval();
    return model;
  };
  auto cpu = make(kCpu);
  auto gpu = make(kGpu);
  const size_t before = engine::cuda_memory_stats(0).current_bytes;
  REQUIRE(engine::nn::store_frozen_linear_weights(*cpu, DType::BF16) == 16);  // weight and bias of 4 Conv1D per block
  REQUIRE(engine::nn::store_frozen_linear_weights(*gpu, DType::BF16) == 16);
  // c_attn, c_proj, c_fc, mlp.c_proj: 12 C^2 weights and 9 C biases per block, now 2 bytes each rather than 4.
  const size_t saved = size_t(2 * (12 * config.n_embd * config.n_embd + 9 * config.n_embd)) * 2;
  CHECK(before - engine::cuda_memory_stats(0).current_bytes == saved);

  std::vector<int64_t> ids(2 * 40);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int64_t((i * 37 + 11) % 300);
  const Tensor input = Tensor::from_vector(ids, {2, 40});
  Tensor logits, logits_g;
  {
    AutocastGuard autocast(DType::BF16);
    logits = cpu->forward(input);
    logits_g = gpu->forward(input.to(kGpu));
  }
  require_near(logits_g, logits, 1e-2, "logits");
  REQUIRE(logits_g.dtype() == DType::BF16);
  const Tensor wide = logits.to(DType::F32), wide_g = logits_g.to(DType::F32);
  engine::sum(engine::mul(wide, wide)).backward();
  engine::sum(engine::mul(wide_g, wide_g)).backward();
  require_near(gpu->get_parameter("transformer.ln_f.weight").grad(),
               cpu->get_parameter("transformer.ln_f.weight").grad(), 2e-2, "ln_f.weight grad");
}
