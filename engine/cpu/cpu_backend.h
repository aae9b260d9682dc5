// The CPU backend: engine::Backend on the host. GEMMs go to OpenBLAS, loops
// are parallelised with OpenMP. Its methods are spread over cpu_*.cpp by
// family; kernels compute in f32 or f64, and bf16/f16 are storage only.
#pragma once

#include "engine/backend.h"

namespace engine {

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::cpu(); }

  void* allocate(size_t nbytes) override;
  void deallocate(void* ptr, size_t nbytes) override;
  void copy_from_host(void* dst, const void* host_src, size_t nbytes) override;
  void copy_to_host(void* host_dst, const void* src, size_t nbytes) override;

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

  void adamw_step(std::span<const AdamWTensors> tensors, const AdamWArgs& args) override;
};

CpuBackend& cpu_backend();

// One thread count for our OpenMP loops and OpenBLAS, so the two never
// oversubscribe the cores (BLAS is never called from inside a parallel loop).
void set_num_threads(int threads);
int num_threads();

}  // namespace engine
