// CudaBackend, engine::Backend on one CUDA device, shared by its two source
// files: cuda_backend.cpp (memory, copies, elementwise maps, reductions, GEMM,
// indexing, and the public API) and cuda_backend_nn.cpp (the fused nn ops,
// attention, dropout and AdamW). Host code only (g++), internal to engine/cuda.
#pragma once

#include "engine/backend.h"
#include "engine/cuda/cuda_context.h"
#include "engine/cuda/staging.h"
#include "engine/error.h"

#include <span>

namespace engine::cuda {

// ---- argument helpers ----

// Our kernels compute in f32 or f64; bf16 is a storage type, which copies,
// GEMMs, attention, GELU, dropout and the unary and binary maps read and
// write (computing in f32); other ops take it on f32 copies (KernelOperands).
inline void require_floating(DType dtype, const char* op) {
  check(dtype == DType::F32 || dtype == DType::F64, "{} on CUDA: computes in f32 or f64, got {}", op,
        dtype_name(dtype));
}

// For kernels that also read and write bf16, computing in f32.
inline void require_floating_or_bf16(DType dtype, const char* op) {
  check(dtype == DType::F32 || dtype == DType::F64 || dtype == DType::BF16,
        "{} on CUDA: computes in f32 or f64 (or f32 on bf16 storage), got {}", op, dtype_name(dtype));
}

// A contiguous view as [rows, cols] over its last dim.
struct Rows {
  int64_t rows, cols;
};
inline Rows rows_of(const View& v) {
  const int64_t cols = v.shape.empty() ? 1 : v.shape.back();
  return {cols == 0 ? 0 : v.numel() / cols, cols};
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int index) : ctx_(cuda::device_context(index)), staging_(index) {}
  Device device() const override { return Device::cuda(ctx_.index()); }

  // ---- memory ----

  void* allocate(size_t nbytes) override { return ctx_.allocate(nbytes, "a tensor"); }
  void deallocate(void* ptr, size_t) override;
  void copy_from_host(void* dst, const void* host_src, size_t nbytes) override;
  void copy_to_host(void* host_dst, const void* src, size_t nbytes) override;

  // ---- copies, fills, elementwise, reductions ----

  void copy(const View& dst, const View& src) override;
  void fill(const View& dst, double value) override;
  void fill_uniform(const View& dst, uint64_t seed, uint64_t offset, double low, double high) override;
  void fill_normal(const View& dst, uint64_t seed, uint64_t offset, double mean, double std) override;
  void unary(UnaryOp op, const View& out, const View& in, double scalar) override;
  void binary(BinaryOp op, const View& out, const View& a, const View& b) override;
  void where(const View& out, const View& condition, const View& a, const View& b) override;
  void reduce(ReduceOp op, const View& out, const View& in) override;
  void argmax_last(const View& out, const View& in) override;

  void gemm(const GemmArgs& args) override;

  // ---- indexing and fused nn kernels ----

  // Both wait for the device: the answer is read back.
  void check_indices(const View& index, int64_t rows, const char* op) override;
  void check_targets(const View& targets, int64_t classes, int64_t ignore_index, const char* op) override;
  void index_select_rows(const View& out, const View& table, const View& index) override;
  void index_add_rows(const View& grad_table, const View& index, const View& grad_out) override;
  void layer_norm_forward(const View& y, const View& mean, const View& rstd, const View& x, const View& weight,
                          const View& bias, double eps) override;
  void layer_norm_backward(const View& dx, const View& dweight, const View& dbias, const View& dy, const View& x,
                           const View& weight, const View& mean, const View& rstd, const View& residual) override;
  void gelu_forward(const View& y, const View& x) override;
  void gelu_backward(const View& dx, const View& dy, const View& x) override;
  void softmax_forward(const View& y, const View& x, bool log) override;
  void softmax_backward(const View& dx, const View& dy, const View& y, bool log) override;
  void cross_entropy_forward(const View& loss, const View& lse, const View& logits, const View& targets,
                             int64_t ignore_index) override;
  void cross_entropy_backward(const View& dlogits, const View& dloss, const View& logits, const View& lse,
                              const View& targets, int64_t ignore_index) override;
  void attention_forward(const View& out, const View& lse, const View& q, const View& k, const View& v,
                         const View& key_mask, const AttentionArgs& args) override;
  void attention_backward(const View& dq, const View& dk, const View& dv, const View& dout, const View& q,
                          const View& k, const View& v, const View& out, const View& lse, const View& key_mask,
                          const AttentionArgs& args) override;
  void dropout(const View& out, const View& in, double p, uint64_t seed, uint64_t offset,
               const View& residual) override;
  void dropout_add_layer_norm(const View& r, const View& in, const View& residual, double p, uint64_t seed,
                              uint64_t offset, const View& y, const View& mean, const View& rstd, const View& weight,
                              const View& bias, double eps) override;
  void layer_norm_backward_dropout(const View& dx, const View& dy, const View& x, const View& weight,
                                   const View& mean, const View& rstd, const View& residual, const View& dropped,
                                   double p, uint64_t seed, uint64_t offset) override;
  void adamw_step(std::span<const AdamWTensors> tensors, const AdamWArgs& args) override;

 private:
  DeviceContext& ctx_;
  cuda::PinnedStaging staging_;  // for large uploads
};

}  // namespace engine::cuda
