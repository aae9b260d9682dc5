// The CUDA kernels' launchers: plain pointers, sizes and a stream in, the
// launch status out. nvcc compiles the .cu files that define them and cannot
// compile {fmt}, so nothing here may include engine/error.h; CudaBackend
// (cuda_backend.cpp) checks arguments and turns statuses into engine::Error.
#pragma once

#include "engine/backend.h"  // DType, UnaryOp, BinaryOp, ReduceOp

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace engine::cuda {

// What every launcher needs to know about the device it runs on.
struct LaunchContext {
  cudaStream_t stream = nullptr;
  int sm_count = 1;  // multiprocessors: sizes grids that must fill the GPU
};

// ---- strided iteration ----
// Up to kMaxDims dims after merging (cpu::coalesce): more is an error the host reports.
constexpr int kMaxDims = 8;

// N operands that share a shape but not strides (in elements; 0 = broadcast).
template <int N>
struct StridedLayout {
  int rank = 0;
  int64_t numel = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[N][kMaxDims] = {};
  bool contiguous = false;  // every operand walks memory in order: the fast path
};

// ---- copies, fills, elementwise (elementwise.cu) ----
cudaError_t launch_copy(const LaunchContext& ctx, DType dst_dtype, DType src_dtype, const StridedLayout<2>& layout,
                        void* dst, const void* src);
// Writes the element bit pattern `bits` (elem_size bytes: 1, 2, 4 or 8) everywhere.
cudaError_t launch_fill(const LaunchContext& ctx, size_t elem_size, const StridedLayout<1>& layout, void* dst,
                        uint64_t bits);
cudaError_t launch_unary(const LaunchContext& ctx, UnaryOp op, DType dtype, const StridedLayout<2>& layout, void* out,
                         const void* in, double scalar);
// a and b have out's dtype, or out is f32 and either may be bf16 (mixed precision's residual adds).
cudaError_t launch_binary(const LaunchContext& ctx, BinaryOp op, DType out_dtype, DType a_dtype, DType b_dtype,
                          const StridedLayout<3>& layout, void* out, const void* a, const void* b);
// out = condition != 0 ? a : b; the condition may have any dtype.
cudaError_t launch_where(const LaunchContext& ctx, DType dtype, DType condition_dtype, const StridedLayout<4>& layout,
                         void* out, const void* condition, const void* a, const void* b);

// ---- reductions (reduce.cu) ----
// `in` split into kept dims (one output each) and reduced dims, both merged.
struct ReduceLayout {
  int kept_rank = 0, reduced_rank = 0;
  int64_t kept_shape[kMaxDims] = {}, kept_in_strides[kMaxDims] = {}, kept_out_strides[kMaxDims] = {};
  int64_t reduced_shape[kMaxDims] = {}, reduced_strides[kMaxDims] = {};
  int64_t outputs = 1, block = 1;  // output count, elements reduced into each
};
// Scratch the reduction needs for partial results (0 when it runs in one pass).
size_t reduce_scratch_bytes(const LaunchContext& ctx, DType dtype, const ReduceLayout& layout);
cudaError_t launch_reduce(const LaunchContext& ctx, ReduceOp op, DType dtype, const ReduceLayout& layout, void* out,
                          const void* in, void* scratch);
cudaError_t launch_argmax_last(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols, int64_t* out,
                               const void* in);

// ---- random draws (random.cu): the element -> Philox mapping of engine/rng.h ----
cudaError_t launch_fill_uniform(const LaunchContext& ctx, DType dtype, int64_t n, void* out, uint64_t seed,
                                uint64_t offset, double low, double high);
cudaError_t launch_fill_normal(const LaunchContext& ctx, DType dtype, int64_t n, void* out, uint64_t seed,
                               uint64_t offset, double mean, double std);
// out = residual + dropout(in) (residual may be null): in and out of one dtype, or bf16 and f32 either way.
cudaError_t launch_dropout(const LaunchContext& ctx, DType in_dtype, DType out_dtype, int64_t n, void* out,
                           const void* in, const void* residual, double p, uint64_t seed, uint64_t offset);

// ---- indexing (nn.cu) ----
// Sets *first_bad (initialised by the caller to ~0) to the smallest position i
// whose index is outside [0, rows) and is not `ignore` (when has_ignore).
cudaError_t launch_find_bad_index(const LaunchContext& ctx, const void* index, DType index_dtype, int64_t n,
                                  int64_t rows, bool has_ignore, int64_t ignore, unsigned long long* first_bad);
// out[i, :] = table[index[i], :], rows of row_bytes bytes (any dtype). Indices already validated.
cudaError_t launch_index_select_rows(const LaunchContext& ctx, int64_t n, size_t row_bytes, void* out,
                                     const void* table, const void* index, DType index_dtype);
// table[index[i], :] += grad[i, :] (atomic adds: repeated indices accumulate in any order).
cudaError_t launch_index_add_rows(const LaunchContext& ctx, DType dtype, int64_t n, int64_t cols, void* table,
                                  const void* index, DType index_dtype, const void* grad);

// ---- fused nn kernels over contiguous [rows, cols] (nn.cu) ----
// Layer norm computes in `dtype` (f32 or f64); for f32, y (forward) and dy
// (backward) may be bf16 instead (y_bf16, dy_bf16): rounded once, read widened.
// The forward's y rows start y_ld >= cols elements apart (room after each row).
cudaError_t launch_layer_norm_forward(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols, void* y,
                                      int64_t y_ld, bool y_bf16, void* mean, void* rstd, const void* x,
                                      const void* weight, const void* bias, double eps);
// Whether f32 rows of `cols`, through these pointers, fit the layer norm
// kernels that hold a row in registers, which the two launchers below need.
bool layer_norm_rows_fit(int64_t cols, std::initializer_list<const void*> pointers);
// r = residual + dropout(in) (launch_dropout's terms), then y = layer_norm(r),
// in one pass: f32 r, residual, weight and bias, and in f32 or bf16. The
// caller runs any other case as the two launches.
cudaError_t launch_dropout_add_layer_norm(const LaunchContext& ctx, DType in_dtype, int64_t rows, int64_t cols,
                                          void* r, const void* in, const void* residual, double p, uint64_t seed,
                                          uint64_t offset, void* y, int64_t y_ld, bool y_bf16, void* mean,
                                          void* rstd, const void* weight, const void* bias, double eps);
// dx = residual (null: none) + the input's gradient.
cudaError_t launch_layer_norm_backward_input(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols,
                                             void* dx, const void* dy, bool dy_bf16, const void* x,
                                             const void* weight, const void* mean, const void* rstd,
                                             const void* residual);
// The same for f32 rows that fit (layer_norm_rows_fit), writing dropped =
// dropout(dx) (launch_dropout's terms; f32 or bf16) in the same pass.
cudaError_t launch_layer_norm_backward_dropout(const LaunchContext& ctx, int64_t rows, int64_t cols, void* dx,
                                               const void* dy, bool dy_bf16, const void* x, const void* weight,
                                               const void* mean, const void* rstd, const void* residual,
                                               void* dropped, bool dropped_bf16, double p, uint64_t seed,
                                               uint64_t offset);
// dweight and dbias (either may be null) are column sums over rows; scratch
// holds per-chunk partial sums so that the result does not depend on timing.
size_t layer_norm_params_scratch_bytes(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols);
cudaError_t launch_layer_norm_backward_params(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols,
                                              void* dweight, void* dbias, const void* dy, bool dy_bf16,
                                              const void* x, const void* mean, const void* rstd, void* scratch);
cudaError_t launch_gelu_forward(const LaunchContext& ctx, DType dtype, int64_t n, void* y, const void* x);
cudaError_t launch_gelu_backward(const LaunchContext& ctx, DType dtype, int64_t n, void* dx, const void* dy,
                                 const void* x);

// ---- softmax and cross-entropy over contiguous [rows, cols] (softmax.cu) ----
cudaError_t launch_softmax_forward(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols, void* y,
                                   const void* x, bool log);
cudaError_t launch_softmax_backward(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols, void* dx,
                                    const void* dy, const void* y, bool log);
// Targets already validated (launch_find_bad_index).
cudaError_t launch_cross_entropy_forward(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols,
                                         void* loss, void* lse, const void* logits, const void* targets,
                                         DType target_dtype, int64_t ignore_index);
cudaError_t launch_cross_entropy_backward(const LaunchContext& ctx, DType dtype, int64_t rows, int64_t cols,
                                          void* dlogits, const void* dloss, const void* logits, const void* lse,
                                          const void* targets, DType target_dtype, int64_t ignore_index);

// ---- attention (attention.cu, attention_bf16.cu) ----
// q [B, H, Tq, D], k and v [B, H, Tk, D], key_mask i32 [B, Tk] or null.
// `dtype` is q's, k's, v's (and dO's): f32 or f64, contiguous, with outputs
// of the same dtype; or bf16 (D <= 128) with an output and gradients each in
// f32 or bf16, every operand read and written through its strides. Query i
// sees key j when key_mask[b, j] != 0 and, if causal, j <= i + (Tk - Tq)
// (bottom-right aligned, as PyTorch).

// Element strides over B, H and T of one [B, H, T, D] operand; D is contiguous.
struct HeadStrides {
  int64_t batch = 0, head = 0, row = 0;
};
struct AttentionStrides {
  HeadStrides q, k, v, out, dout, dq, dk, dv;
};

struct AttentionShape {
  int64_t B = 0, H = 0, Tq = 0, Tk = 0, D = 0;
  const int32_t* key_mask = nullptr;
  bool causal = true;
  double scale = 1;
  double dropout_p = 0;  // engine/backend.h's AttentionArgs: probabilities dropped by Philox
  uint64_t dropout_seed = 0, dropout_offset = 0;
  AttentionStrides strides;
  bool out_bf16 = false, grads_bf16 = false;  // bf16 inputs only
};
// out [B, H, Tq, D]; lse f32 [B, H, Tq] (-inf for a query that sees no key).
cudaError_t launch_attention_forward(const LaunchContext& ctx, DType dtype, const AttentionShape& shape, void* out,
                                     float* lse, const void* q, const void* k, const void* v);
// Scratch for the per-query rowsum(dO * O) and, for bf16 inputs, the score
// gradients dS of as many heads as fit a fixed budget (at least one head).
size_t attention_backward_scratch_bytes(DType dtype, const AttentionShape& shape);
// dq, dk, dv may each be null (not wanted). scratch_bytes: what scratch
// holds; less than attention_backward_scratch_bytes only means more slices.
cudaError_t launch_attention_backward(const LaunchContext& ctx, DType dtype, const AttentionShape& shape, void* dq,
                                      void* dk, void* dv, const void* dout, const void* q, const void* k,
                                      const void* v, const void* out, const float* lse, void* scratch,
                                      size_t scratch_bytes);

// ---- optimiser (optim.cu) ----
// AdamW's per-step scalars, formed on the host in double exactly as the CPU
// kernel forms them; the kernel rounds each to the parameter's type.
struct AdamWScalars {
  double decay, beta1, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps;
};
// One parameter: n elements of param, grad and the moments m and v.
struct AdamWBuffers {
  int64_t n;
  void* param;
  const void* grad;
  void* m;
  void* v;
};
// Updates every listed parameter, a few dozen per launch.
cudaError_t launch_adamw(const LaunchContext& ctx, DType dtype, const std::vector<AdamWBuffers>& tensors,
                         const AdamWScalars& scalars);

}  // namespace engine::cuda
