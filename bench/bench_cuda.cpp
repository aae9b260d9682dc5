// The CUDA backend's speed on GPT-2-large shapes: GEMMs through engine::matmul
// against raw cuBLAS on the same buffers (f32, TF32, bf16), a rank-8 adapter's
// memory-bound products and where its update rides in c_attn's GEMM, layer
// norm and AdamW bandwidth, the step's commonest elementwise passes, and
// attention forward/backward at B=32, H=20, T=256, D=64.
// Prints one JSON line per case. Run: build-gpu/bench/bench_cuda
#include "engine/backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/ops.h"
#include "engine/optim/optimizer.h"
#include "engine/precision.h"
#include "engine/rng.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

using engine::DType;
using engine::Tensor;

namespace {

const engine::Device kGpu = engine::Device::cuda(0);

// Median seconds per call of `body` (run `inner` times between two device
// synchronisations, so launch queues stay full), over `reps` repetitions after a warm-up.
double median_seconds(int reps, int inner, const std::function<void()>& body, const std::function<void()>& sync) {
  body();
  sync();
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < inner; ++i) body();
    sync();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / inner);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

void engine_sync() { engine::cuda_synchronize(0); }

Tensor randn(const engine::Shape& shape, uint64_t seed, DType dtype = DType::F32) {
  engine::Generator gen(seed);
  return Tensor::randn(shape, gen, 0, 1, DType::F32, kGpu).to(dtype);
}

// ---- GEMM: C [m, n] = A [m, k] @ B [k, n] (or B^T stored [n, k]) ----

void bench_gemm(cublasHandle_t handle, cudaStream_t stream, const char* mode, int64_t m, int64_t k, int64_t n,
                bool transpose_b) {
  const DType dtype = std::string(mode) == "bf16" ? DType::BF16 : DType::F32;
  engine::set_allow_tf32(std::string(mode) == "tf32");
  Tensor a = randn({m, k}, 1, dtype);
  Tensor b = transpose_b ? randn({n, k}, 2, dtype) : randn({k, n}, 2, dtype);
  Tensor c = Tensor::empty({m, n}, dtype, kGpu);
  engine::NoGradGuard no_grad;
  const Tensor b_op = transpose_b ? b.transpose(0, 1) : b;
  const double ours = median_seconds(5, 10, [&] { engine::matmul(a, b_op); }, engine_sync);

  // Raw cuBLAS, the same column-major mapping: C^T = op(B)^T A^T.
  const cudaDataType_t type = dtype == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F;
  const cublasComputeType_t compute = std::string(mode) == "tf32" ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  const float alpha = 1, beta = 0;
  engine_sync();  // the inputs were made on the engine's stream
  const double raw = median_seconds(
      5, 10,
      [&] {
        cublasGemmEx(handle, transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, int(n), int(m), int(k), &alpha,
                     b.data_ptr(), type, transpose_b ? int(k) : int(n), a.data_ptr(), type, int(k), &beta,
                     c.data_ptr(), type, int(n), compute, CUBLAS_GEMM_DEFAULT);
      },
      [&] { cudaStreamSynchronize(stream); });
  const double flops = 2.0 * double(m) * double(n) * double(k);
  fmt::print(R"({{"bench":"gemm","mode":"{}","m":{},"k":{},"n":{},"b_transposed":{},"engine_tflops":{:.1f},"cublas_tflops":{:.1f},"engine_over_cublas":{:.3f}}})"
             "\n",
             mode, m, k, n, transpose_b, flops / ours * 1e-12, flops / raw * 1e-12, raw / ours);
  engine::set_allow_tf32(false);
}

// ---- a rank-8 adapter's products: CURLoRA on gpt2-large's c_attn at 8192 tokens ----

struct ThinProduct {
  const char* what;
  int64_t m, k, n;
  bool trans_a, trans_b, accumulate;  // accumulate: C += A B (the base output as addend)
  DType c_dtype;
};

// The engine's product (cuBLASLt, through the backend's gemm) against cublasGemmEx on the same
// buffers, and the bytes it moves per second: these products are bound by memory, not FLOPs.
void bench_thin_gemm(cublasHandle_t handle, cudaStream_t stream, const ThinProduct& p) {
  const Tensor a = p.trans_a ? randn({p.k, p.m}, 1, DType::BF16) : randn({p.m, p.k}, 1, DType::BF16);
  const Tensor b = p.trans_b ? randn({p.n, p.k}, 2, DType::BF16) : randn({p.k, p.n}, 2, DType::BF16);
  Tensor c = randn({p.m, p.n}, 3, p.c_dtype);
  engine::GemmArgs g;
  g.dtype = DType::BF16, g.c_dtype = p.c_dtype;
  g.m = p.m, g.n = p.n, g.k = p.k;
  g.a = a.data_ptr(), g.trans_a = p.trans_a, g.lda = p.trans_a ? p.m : p.k;
  g.b = b.data_ptr(), g.trans_b = p.trans_b, g.ldb = p.trans_b ? p.k : p.n;
  g.c = c.data_ptr(), g.ldc = p.n, g.beta = p.accumulate ? 1 : 0;
  engine::Backend& gpu = engine::backend_for(kGpu);
  const double ours = median_seconds(5, 20, [&] { gpu.gemm(g); }, engine_sync);
  const float alpha = 1, beta = float(g.beta);
  engine_sync();
  const double raw = median_seconds(
      5, 20,
      [&] {
        cublasGemmEx(handle, p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, int(p.n),
                     int(p.m), int(p.k), &alpha, b.data_ptr(), CUDA_R_16BF, int(g.ldb), a.data_ptr(), CUDA_R_16BF,
                     int(g.lda), &beta, c.data_ptr(), p.c_dtype == DType::F32 ? CUDA_R_32F : CUDA_R_16BF, int(p.n),
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      },
      [&] { cudaStreamSynchronize(stream); });
  const double c_bytes = double(c.numel()) * (p.c_dtype == DType::F32 ? 4 : 2);
  const double bytes = double(a.numel() + b.numel()) * 2 + c_bytes * (p.accumulate ? 2 : 1);
  fmt::print(R"({{"bench":"thin_gemm","what":"{}","m":{},"k":{},"n":{},"engine_us":{:.1f},"cublas_us":{:.1f},)"
             R"("engine_gb_per_s":{:.0f}}})"
             "\n",
             p.what, p.m, p.k, p.n, ours * 1e6, raw * 1e6, bytes / ours * 1e-9);
}

// CURLoRA's update in c_attn's GEMM (gpt2-large, 8192 tokens, bf16): the
// plain product, with its bias, with the update as 8 more columns of K
// (engine::concat_linear: [x | t2] [W; R] + b), with the bias as one more row
// of K against a column of ones, padded to 1296 with zeros, and the update
// GEMM that concat_linear otherwise adds (base + t2 R + b); then the
// backward's dX over W, [W; R] (which also gives dt2) and [W; R; b; 0].
struct LayoutCase {
  const char* what;
  int64_t m, k, n;
  bool trans_b, bias, addend;
};

void bench_adapter_layouts() {
  const int64_t M = 32 * 256, C = 1280, N = 3 * C;
  const Tensor a = randn({M, C + 16}, 1, DType::BF16), w = randn({C + 16, N}, 2, DType::BF16);
  const Tensor bias = randn({N}, 3, DType::BF16), addend = randn({M, N}, 4, DType::BF16);
  Tensor out = Tensor::empty({M, N}, DType::BF16, kGpu);
  engine::Backend& gpu = engine::backend_for(kGpu);
  for (const LayoutCase& c : {LayoutCase{"x W", M, C, N, false, false, false},
                              LayoutCase{"x W + b", M, C, N, false, true, false},
                              LayoutCase{"[x | t2] [W; R] + b", M, C + 8, N, false, true, false},
                              LayoutCase{"[x | t2 | 1 | 0] [W; R; b; 0]", M, C + 16, N, false, false, false},
                              LayoutCase{"base + t2 R + b", M, 8, N, false, true, true},
                              LayoutCase{"dY W^T", M, N, C, true, false, false},
                              LayoutCase{"dY [W; R]^T", M, N, C + 8, true, false, false},
                              LayoutCase{"dY [W; R; b; 0]^T", M, N, C + 16, true, false, false}}) {
    engine::GemmArgs g;
    g.dtype = DType::BF16, g.c_dtype = DType::BF16;
    g.m = c.m, g.n = c.n, g.k = c.k;
    g.a = a.data_ptr(), g.lda = c.k;
    g.b = w.data_ptr(), g.trans_b = c.trans_b, g.ldb = c.trans_b ? c.k : c.n;
    g.c = out.data_ptr(), g.ldc = c.n;
    if (c.bias) g.bias = bias.data_ptr();
    if (c.addend) g.addend = addend.data_ptr(), g.beta = 1;
    const double t = median_seconds(5, 20, [&] { gpu.gemm(g); }, engine_sync);
    fmt::print(R"({{"bench":"adapter_layout","what":"{}","m":{},"k":{},"n":{},"us":{:.1f}}})"
               "\n",
               c.what, c.m, c.k, c.n, t * 1e6);
  }
}

// ---- layer norm and AdamW: bandwidth ----

// GPT-2's ln_1/ln_2 in a bf16 step: f32 rows in, bf16 out; the backward reads
// the bf16 gradient and adds the residual stream's f32 gradient (frozen
// weight and bias: no column sums). Bytes moved are the ideal, each operand once.
void bench_layer_norm(int64_t rows, int64_t cols) {
  const Tensor x = randn({rows, cols}, 3), w = randn({cols}, 4), b = randn({cols}, 5);
  const Tensor dy = randn({rows, cols}, 6, DType::BF16), residual = randn({rows, cols}, 7);
  Tensor y = Tensor::empty({rows, cols}, DType::BF16, kGpu), dx = Tensor::empty({rows, cols}, DType::F32, kGpu);
  Tensor mean = Tensor::empty({rows}, DType::F32, kGpu), rstd = Tensor::empty({rows}, DType::F32, kGpu);
  engine::Backend& gpu = engine::backend_for(kGpu);
  using engine::view_of;
  const double forward = median_seconds(
      5, 20,
      [&] {
        gpu.layer_norm_forward(view_of(y), view_of(mean), view_of(rstd), view_of(x), view_of(w), view_of(b), 1e-5);
      },
      engine_sync);
  const double backward = median_seconds(
      5, 20,
      [&] {
        gpu.layer_norm_backward(view_of(dx), {}, {}, view_of(dy), view_of(x), view_of(w), view_of(mean),
                                view_of(rstd), view_of(residual));
      },
      engine_sync);
  const double elements = double(rows * cols);
  fmt::print(R"({{"bench":"layer_norm","rows":{},"cols":{},"forward_us":{:.1f},"forward_gb_per_s":{:.0f},)"
             R"("backward_us":{:.1f},"backward_gb_per_s":{:.0f}}})"
             "\n",
             rows, cols, forward * 1e6, elements * (4 + 2) / forward * 1e-9, backward * 1e6,
             elements * (4 + 2 + 4 + 4) / backward * 1e-9);
}

void bench_adamw(int64_t elements) {
  Tensor p = randn({elements}, 7);
  p.set_requires_grad(true);
  p.set_grad(randn({elements}, 8));
  engine::optim::AdamW opt({p});
  const double t = median_seconds(5, 10, [&] { opt.step(); }, engine_sync);
  const double bytes = 7.0 * double(elements) * 4;  // read p, g, m, v; write p, m, v
  fmt::print(R"({{"bench":"adamw","elements":{},"us":{:.1f},"gb_per_s":{:.0f}}})"
             "\n",
             elements, t * 1e6, bytes / t * 1e-9);
}

// CURLoRA's trainable tensors on gpt2-large: 36 U matrices of 8 x 8 and a
// 1280 -> 2 head. Tiny updates: the time is launches, one for the whole list.
void bench_adamw_list() {
  std::vector<Tensor> params;
  for (int i = 0; i < 36; ++i) params.push_back(randn({8, 8}, uint64_t(20 + i)));
  params.push_back(randn({2, 1280}, 60));
  params.push_back(randn({2}, 61));
  for (Tensor& p : params) {
    p.set_requires_grad(true);
    p.set_grad(randn(p.shape(), 62));
  }
  engine::optim::AdamW opt(params);
  const double t = median_seconds(5, 20, [&] { opt.step(); }, engine_sync);
  fmt::print(R"({{"bench":"adamw_list","tensors":{},"us":{:.1f}}})"
             "\n",
             params.size(), t * 1e6);
}

// A checkpoint-sized upload and download (512 MiB of f32) from pageable host
// memory: ours through pinned staging, against one plain cudaMemcpy.
void bench_host_copies() {
  const int64_t n = int64_t(128) << 20;
  const Tensor host = Tensor::zeros({n});
  Tensor device = Tensor::empty({n}, DType::F32, kGpu);
  const double bytes = double(n) * 4;
  const double up = median_seconds(2, 3, [&] { device = host.to(kGpu); }, engine_sync);
  const double down = median_seconds(2, 3, [&] { (void)device.to(engine::Device::cpu()); }, engine_sync);
  std::vector<float> pageable(size_t(n), 0.f);
  void* raw = device.data_ptr();
  const double raw_up = median_seconds(
      2, 3, [&] { cudaMemcpy(raw, pageable.data(), size_t(bytes), cudaMemcpyHostToDevice); }, engine_sync);
  const double raw_down = median_seconds(
      2, 3, [&] { cudaMemcpy(pageable.data(), raw, size_t(bytes), cudaMemcpyDeviceToHost); }, engine_sync);
  fmt::print(R"({{"bench":"host_copies","mib":{},"to_device_gb_per_s":{:.1f},"raw_pageable_to_device_gb_per_s":{:.1f},"to_host_gb_per_s":{:.1f},"raw_pageable_to_host_gb_per_s":{:.1f}}})"
             "\n",
             n * 4 >> 20, bytes / up * 1e-9, bytes / raw_up * 1e-9, bytes / down * 1e-9, bytes / raw_down * 1e-9);
}

// ---- elementwise passes of the training step: bandwidth ----

// The copies the bf16 step makes most: an autocast cast (f32 -> bf16, the
// MLP's [tokens, 4C] activation), splitting c_attn's output into heads (a
// permuting f32 copy) and a residual add. GB/s counts bytes read + written.
void bench_elementwise(int64_t B, int64_t T, int64_t H, int64_t D) {
  const int64_t tokens = B * T, C = H * D;
  Tensor wide = randn({tokens, 4 * C}, 13), x = randn({tokens, C}, 14), y = randn({tokens, C}, 15);
  Tensor qkv = randn({B, T, 3 * C}, 16);
  const auto report = [](const char* name, double seconds, double bytes) {
    fmt::print(R"({{"bench":"elementwise","op":"{}","us":{:.1f},"gb_per_s":{:.0f}}})"
               "\n",
               name, seconds * 1e6, bytes / seconds * 1e-9);
  };
  engine::NoGradGuard no_grad;
  const double n_wide = double(wide.numel()), n = double(x.numel());
  report("cast_f32_to_bf16", median_seconds(5, 20, [&] { (void)wide.to(DType::BF16); }, engine_sync), 6 * n_wide);
  report("split_heads_f32",
         median_seconds(
             5, 20, [&] { (void)qkv.slice(2, 0, C).view({B, T, H, D}).permute({0, 2, 1, 3}).contiguous(); },
             engine_sync),
         8 * n);
  report("add_f32", median_seconds(5, 20, [&] { (void)engine::add(x, y); }, engine_sync), 12 * n);
}

// ---- attention at gpt2-large's shape ----

// bf16: q, k, v given in bf16 under autocast, so the tensor-core kernels are
// timed without the casts (torch's bf16 SDPA also takes bf16 inputs).
void bench_attention(int64_t B, int64_t H, int64_t T, int64_t D, bool padded, double dropout = 0, bool bf16 = false) {
  const engine::AutocastGuard autocast(bf16 ? DType::BF16 : DType::F32);
  const DType in = bf16 ? DType::BF16 : DType::F32;
  Tensor q = randn({B, H, T, D}, 9).to(in), k = randn({B, H, T, D}, 10).to(in), v = randn({B, H, T, D}, 11).to(in);
  Tensor dout = randn({B, H, T, D}, 12).to(in);
  Tensor mask;
  if (padded) {  // right padding: row b keeps its first T - 4b tokens
    std::vector<int32_t> m(size_t(B * T), 1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = std::max<int64_t>(1, T - 4 * b); t < T; ++t) m[size_t(b * T + t)] = 0;
    mask = Tensor::from_vector(m, {B, T}, kGpu);
  }
  double forward;
  {
    engine::NoGradGuard no_grad;
    engine::Generator gen(1);
    forward = median_seconds(
        5, 10, [&] { engine::scaled_dot_product_attention(q, k, v, mask, true, {}, dropout, &gen); }, engine_sync);
  }
  q.set_requires_grad(true), k.set_requires_grad(true), v.set_requires_grad(true);
  engine::Generator gen(2);
  const double both = median_seconds(
      5, 5,
      [&] {
        Tensor out = engine::scaled_dot_product_attention(q, k, v, mask, true, {}, dropout, &gen);
        out.backward(dout);
        q.zero_grad(), k.zero_grad(), v.zero_grad();  // times the backward, not a gradient sum
      },
      engine_sync);
  const double causal_flops = 4.0 * double(B * H) * double(T) * double(T) * double(D) * 0.5;
  const double backward = both - forward;
  fmt::print(R"({{"bench":"attention","dtype":"{}","B":{},"H":{},"T":{},"D":{},"causal":true,"padded":{},"dropout":{},"forward_ms":{:.3f},"forward_tflops":{:.1f},"backward_ms":{:.3f},"backward_tflops":{:.1f}}})"
             "\n",
             bf16 ? "bf16" : "f32", B, H, T, D, padded, dropout, forward * 1e3, causal_flops / forward * 1e-12, backward * 1e3,
             2.5 * causal_flops / backward * 1e-12);
}

}  // namespace

int main() {
  if (!engine::cuda_available()) {
    std::fprintf(stderr, "bench_cuda: no CUDA device\n");
    return 77;
  }
  // Raw cuBLAS gets its own handle and stream, with the same workspace size the engine uses.
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  cublasHandle_t handle;
  cublasCreate(&handle);
  cublasSetStream(handle, stream);

  // gpt2-large at batch 32 x 256 tokens: c_attn, attn c_proj, mlp c_fc, mlp c_proj,
  // and the weight-gradient GEMM of c_attn (x^T @ dy).
  const int64_t tokens = 32 * 256, C = 1280;
  for (const char* mode : {"f32", "tf32", "bf16"}) {
    bench_gemm(handle, stream, mode, tokens, C, 3 * C, false);
    bench_gemm(handle, stream, mode, tokens, C, C, false);
    bench_gemm(handle, stream, mode, tokens, C, 4 * C, false);
    bench_gemm(handle, stream, mode, tokens, 4 * C, C, false);
    bench_gemm(handle, stream, mode, tokens, C, 3 * C, true);
    bench_gemm(handle, stream, mode, 4096, 4096, 4096, false);
  }
  for (const ThinProduct& p : {ThinProduct{"x C", tokens, C, 8, false, false, false, DType::BF16},
                               ThinProduct{"t1 U", tokens, 8, 8, false, false, false, DType::BF16},
                               ThinProduct{"base + t2 R", tokens, 8, 3 * C, false, false, true, DType::BF16},
                               ThinProduct{"dY R^T", tokens, 3 * C, 8, false, true, false, DType::BF16},
                               ThinProduct{"dU = t1^T dt2", 8, tokens, 8, true, false, false, DType::F32},
                               ThinProduct{"dt2 U^T", tokens, 8, 8, false, true, false, DType::BF16},
                               ThinProduct{"dx + dt1 C^T", tokens, 8, C, false, true, true, DType::BF16}})
    bench_thin_gemm(handle, stream, p);
  bench_adapter_layouts();
  bench_layer_norm(tokens, C);
  bench_adamw(int64_t(36) * C * 3 * C);  // all of gpt2-large's c_attn weights
  bench_adamw_list();
  bench_host_copies();
  bench_elementwise(32, 256, 20, 64);
  bench_attention(32, 20, 256, 64, false);
  bench_attention(32, 20, 256, 64, true);
  bench_attention(32, 20, 256, 64, false, 0.1);  // training: GPT-2's attn_pdrop
  bench_attention(32, 20, 256, 64, false, 0, true);
  bench_attention(32, 20, 256, 64, false, 0.1, true);
  bench_attention(8, 20, 1024, 64, false, 0.1, true);  // the eval forward's shape (dropout on, as the peer's)
  const engine::CudaMemoryStats stats = engine::cuda_memory_stats(0);
  fmt::print(R"({{"bench":"memory","peak_gib":{:.2f},"reserved_gib":{:.2f}}})"
             "\n",
             double(stats.peak_bytes) / double(1ull << 30), double(stats.reserved_bytes) / double(1ull << 30));
  cublasDestroy(handle);
  cudaStreamDestroy(stream);
  return 0;
}
