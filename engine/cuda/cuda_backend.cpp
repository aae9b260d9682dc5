// CudaBackend: engine::Backend on one CUDA device. Host code only (g++): it
// checks what the kernels cannot (dtypes, ranks, index ranges), prepares
// layouts and scratch memory, calls the launchers of engine/cuda/*.cu on the
// device's stream, and reports every failure as engine::Error.
//
// Ordering: all kernels, copies, cuBLAS calls, allocations and frees go to
// one stream per device, so they run in the order issued and a freed block
// is never reused before the kernels that read it have run. Host code waits
// only where it must: copy_to_host, and reading back an index check.
#include "engine/cuda/cuda_backend.h"

#include "engine/cpu/strided.h"
#include "engine/cuda/attention_plan.h"
#include "engine/cuda/cuda_context.h"
#include "engine/cuda/op_scope.h"
#include "engine/cuda/staging.h"
#include "engine/error.h"

#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace engine {

namespace {

using cuda::DeviceContext;
using cuda::OpScope;
using cuda::Scratch;

// ---- argument helpers ----

// Our kernels compute in f32 or f64; bf16 is a storage type, which copies,
// GEMMs, attention, GELU, dropout and the unary and binary maps read and
// write (computing in f32); other ops take it on f32 copies (KernelOperands).
void require_floating(DType dtype, const char* op) {
  check(dtype == DType::F32 || dtype == DType::F64, "{} on CUDA: computes in f32 or f64, got {}", op,
        dtype_name(dtype));
}

// For kernels that also read and write bf16, computing in f32.
void require_floating_or_bf16(DType dtype, const char* op) {
  check(dtype == DType::F32 || dtype == DType::F64 || dtype == DType::BF16,
        "{} on CUDA: computes in f32 or f64 (or f32 on bf16 storage), got {}", op, dtype_name(dtype));
}

// N operands of one shape with their own strides, dims merged where every
// operand allows it (cpu::coalesce), as the kernels' StridedLayout.
template <int N>
cuda::StridedLayout<N> layout_of(const Shape& shape, const std::array<const Shape*, size_t(N)>& strides,
                                 const char* op) {
  cuda::StridedLayout<N> layout;
  layout.numel = numel(shape);
  if (layout.numel == 0) return layout;
  const cpu::StridedLayout<size_t(N)> merged = cpu::coalesce<size_t(N)>(shape, strides);
  check(merged.shape.size() <= size_t(cuda::kMaxDims),
        "{} on CUDA: shape {} has {} dims that cannot be merged; at most {} are supported", op, shape_str(shape),
        merged.shape.size(), cuda::kMaxDims);
  layout.rank = int(merged.shape.size());
  layout.contiguous = true;
  for (int d = 0; d < layout.rank; ++d) {
    layout.shape[d] = merged.shape[size_t(d)];
    for (int k = 0; k < N; ++k) layout.strides[k][d] = merged.strides[size_t(k)][size_t(d)];
  }
  // Contiguous means one merged dim of unit stride everywhere (or one element).
  if (layout.rank > 1) layout.contiguous = false;
  for (int k = 0; k < N && layout.rank == 1; ++k) layout.contiguous &= layout.strides[k][0] == 1;
  return layout;
}

// A contiguous view as [rows, cols] over its last dim.
struct Rows {
  int64_t rows, cols;
};
Rows rows_of(const View& v) {
  const int64_t cols = v.shape.empty() ? 1 : v.shape.back();
  return {cols == 0 ? 0 : v.numel() / cols, cols};
}

// The element bit pattern of `value` in `dtype`, rounded as the CPU rounds it.
uint64_t fill_bits(DType dtype, double value) {
  uint64_t bits = 0;
  auto store = [&](auto x) { std::memcpy(&bits, &x, sizeof(x)); };
  switch (dtype) {
    case DType::F32: store(float(value)); break;
    case DType::F64: store(value); break;
    case DType::BF16: store(float_to_bf16(float(value)).bits); break;
    case DType::F16: store(float_to_f16(float(value)).bits); break;
    case DType::I32: store(int32_t(value)); break;
    case DType::I64: store(int64_t(value)); break;
  }
  return bits;
}

const char* op_name(UnaryOp op) {
  static const char* const names[] = {"neg",    "exp",        "log",        "sqrt", "rsqrt",  "tanh",   "abs",
                                      "square", "pow",        "add_scalar", "mul_scalar", "relu", "sigmoid"};
  return names[int(op)];
}
const char* op_name(BinaryOp op) {
  static const char* const names[] = {"add", "sub", "mul", "div", "maximum", "minimum", "equal", "greater"};
  return names[int(op)];
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

// ---- memory ----

void CudaBackend::deallocate(void* ptr, size_t nbytes) { ctx_.deallocate(ptr, nbytes); }

// Large uploads (checkpoints) go through pinned staging buffers. Small ones
// (batches of token ids) go straight from pageable memory: cudaMemcpyAsync
// returns once the driver has staged them, so either way the caller may free
// its buffer as soon as the call returns.
void CudaBackend::copy_from_host(void* dst, const void* host_src, size_t nbytes) {
  ctx_.launch();
  if (nbytes >= cuda::PinnedStaging::kMinBytes) return staging_.to_device(dst, host_src, nbytes, ctx_.stream());
  cuda::check_cuda(cudaMemcpyAsync(dst, host_src, nbytes, cudaMemcpyHostToDevice, ctx_.stream()), ctx_.index(),
                   "copy_from_host");
}

void CudaBackend::copy_to_host(void* host_dst, const void* src, size_t nbytes) {
  ctx_.launch();
  cuda::check_cuda(cudaMemcpyAsync(host_dst, src, nbytes, cudaMemcpyDeviceToHost, ctx_.stream()), ctx_.index(),
                   "copy_to_host");
  ctx_.synchronize("copy_to_host");
}

// ---- copies and fills ----

void CudaBackend::copy(const View& dst, const View& src) {
  OpScope op(ctx_, "copy");
  if (dst.numel() == 0) return;
  const cuda::LaunchContext lc = ctx_.launch();
  if (dst.dtype == src.dtype && dst.is_contiguous() && src.is_contiguous()) {
    cuda::check_cuda(cudaMemcpyAsync(dst.data, src.data, size_t(dst.numel()) * dtype_size(dst.dtype),
                                     cudaMemcpyDeviceToDevice, ctx_.stream()),
                     ctx_.index(), "copy");
    return;
  }
  const auto layout = layout_of<2>(dst.shape, {&dst.strides, &src.strides}, "copy");
  ctx_.check_launch(cuda::launch_copy(lc, dst.dtype, src.dtype, layout, dst.data, src.data), "copy");
}

void CudaBackend::fill(const View& dst, double value) {
  OpScope op(ctx_, "fill");
  if (dst.numel() == 0) return;
  const cuda::LaunchContext lc = ctx_.launch();
  const uint64_t bits = fill_bits(dst.dtype, value);
  if (bits == 0 && dst.is_contiguous()) {
    cuda::check_cuda(cudaMemsetAsync(dst.data, 0, size_t(dst.numel()) * dtype_size(dst.dtype), ctx_.stream()),
                     ctx_.index(), "fill");
    return;
  }
  const auto layout = layout_of<1>(dst.shape, {&dst.strides}, "fill");
  ctx_.check_launch(cuda::launch_fill(lc, dtype_size(dst.dtype), layout, dst.data, bits), "fill");
}

void CudaBackend::fill_uniform(const View& dst, uint64_t seed, uint64_t offset, double low, double high) {
  OpScope op(ctx_, "fill_uniform");
  check(dst.is_contiguous(), "fill_uniform needs a contiguous tensor");
  ctx_.check_launch(cuda::launch_fill_uniform(ctx_.launch(), dst.dtype, dst.numel(), dst.data, seed, offset, low, high),
                    "fill_uniform");
}

void CudaBackend::fill_normal(const View& dst, uint64_t seed, uint64_t offset, double mean, double std) {
  OpScope op(ctx_, "fill_normal");
  check(dst.is_contiguous(), "fill_normal needs a contiguous tensor");
  ctx_.check_launch(cuda::launch_fill_normal(ctx_.launch(), dst.dtype, dst.numel(), dst.data, seed, offset, mean, std),
                    "fill_normal");
}

// ---- elementwise ----

void CudaBackend::unary(UnaryOp op, const View& out, const View& in, double scalar) {
  OpScope scope(ctx_, op_name(op));
  require_floating_or_bf16(out.dtype, "unary");
  const auto layout = layout_of<2>(out.shape, {&out.strides, &in.strides}, "unary");
  ctx_.check_launch(cuda::launch_unary(ctx_.launch(), op, out.dtype, layout, out.data, in.data, scalar), "unary");
}

void CudaBackend::binary(BinaryOp op, const View& out, const View& a, const View& b) {
  // The kernels read bf16 operands of an f32 result as they are; other mixes are widened first.
  auto direct = [&](const View& v) {
    return v.dtype == out.dtype || (out.dtype == DType::F32 && v.dtype == DType::BF16);
  };
  if (!direct(a) || !direct(b)) {
    KernelOperands wide(*this);
    return binary(op, out, direct(a) ? a : wide.in(a, out.dtype), direct(b) ? b : wide.in(b, out.dtype));
  }
  OpScope scope(ctx_, op_name(op));
  require_floating_or_bf16(out.dtype, "binary");
  const auto layout = layout_of<3>(out.shape, {&out.strides, &a.strides, &b.strides}, "binary");
  ctx_.check_launch(
      cuda::launch_binary(ctx_.launch(), op, out.dtype, a.dtype, b.dtype, layout, out.data, a.data, b.data),
      "binary");
}

void CudaBackend::where(const View& out, const View& condition, const View& a, const View& b) {
  if (out.dtype == DType::BF16) {  // rare: on f32 copies, rounded once
    KernelOperands f32(*this);
    where(f32.out(out, DType::F32), condition, f32.in(a, DType::F32), f32.in(b, DType::F32));
    return f32.finish();
  }
  OpScope op(ctx_, "where");
  require_floating(out.dtype, "where");
  const auto layout =
      layout_of<4>(out.shape, {&out.strides, &condition.strides, &a.strides, &b.strides}, "where");
  ctx_.check_launch(
      cuda::launch_where(ctx_.launch(), out.dtype, condition.dtype, layout, out.data, condition.data, a.data, b.data),
      "where");
}

// ---- reductions ----

// `in` split into kept dims (out has the same size there) and reduced dims
// (out has 1, in more), each merged where memory allows, as the CPU splits it.
void CudaBackend::reduce(ReduceOp op, const View& out, const View& in) {
  if (in.dtype == DType::BF16) {  // summed in f32 (as every f32 sum), rounded once
    KernelOperands f32(*this);
    reduce(op, f32.out(out, DType::F32), f32.in(in, DType::F32));
    return f32.finish();
  }
  OpScope scope(ctx_, op == ReduceOp::Sum ? "sum" : "max");
  require_floating(in.dtype, "reduce");
  if (in.numel() == 0) return;
  Shape kept_shape, kept_in, kept_out, reduced_shape, reduced_in;
  for (size_t d = 0; d < in.shape.size(); ++d) {
    if (out.shape[d] == 1 && in.shape[d] != 1) {
      reduced_shape.push_back(in.shape[d]);
      reduced_in.push_back(in.strides[d]);
    } else {
      kept_shape.push_back(in.shape[d]);
      kept_in.push_back(in.strides[d]);
      kept_out.push_back(out.strides[d]);
    }
  }
  const auto kept = cpu::coalesce<2>(kept_shape, {&kept_in, &kept_out});
  const auto reduced = cpu::coalesce<1>(reduced_shape, {&reduced_in});
  check(kept.shape.size() <= size_t(cuda::kMaxDims) && reduced.shape.size() <= size_t(cuda::kMaxDims),
        "reduce on CUDA: shape {} has too many dims that cannot be merged", shape_str(in.shape));
  cuda::ReduceLayout layout;
  layout.kept_rank = int(kept.shape.size());
  layout.reduced_rank = int(reduced.shape.size());
  for (int d = 0; d < layout.kept_rank; ++d) {
    layout.kept_shape[d] = kept.shape[size_t(d)];
    layout.kept_in_strides[d] = kept.strides[0][size_t(d)];
    layout.kept_out_strides[d] = kept.strides[1][size_t(d)];
  }
  for (int d = 0; d < layout.reduced_rank; ++d) {
    layout.reduced_shape[d] = reduced.shape[size_t(d)];
    layout.reduced_strides[d] = reduced.strides[0][size_t(d)];
  }
  layout.outputs = numel(kept_shape);
  layout.block = numel(reduced_shape);
  const cuda::LaunchContext lc = ctx_.launch();
  Scratch partials(ctx_, cuda::reduce_scratch_bytes(lc, in.dtype, layout), "reduce partial sums");
  ctx_.check_launch(cuda::launch_reduce(lc, op, in.dtype, layout, out.data, in.data, partials.get()), "reduce");
}

void CudaBackend::argmax_last(const View& out, const View& in) {
  if (in.dtype == DType::BF16) {
    KernelOperands f32(*this);
    return argmax_last(out, f32.in(in, DType::F32));
  }
  OpScope op(ctx_, "argmax");
  require_floating(in.dtype, "argmax");
  const auto [rows, cols] = rows_of(in);
  ctx_.check_launch(cuda::launch_argmax_last(ctx_.launch(), in.dtype, rows, cols, out.ptr<int64_t>(), in.data),
                    "argmax");
}

// ---- matrix multiply ----

// The epilogue (bias, GELU) goes into the GEMM where cuBLASLt has a kernel
// for the case; elsewhere (f64, batches) it runs as separate passes, in f32
// for a bf16 C.
void CudaBackend::gemm(const GemmArgs& args) {
  const bool by_shape = OpScope::profiling_on_device(ctx_);
  const char* epilogue = args.gelu ? " gelu" : args.gelu_grad ? " gelu_grad" : args.bias ? " bias" : "";
  OpScope op(ctx_, "gemm", 2.0 * double(args.m) * double(args.n) * double(args.k) * double(args.batch),
             by_shape ? fmt::format("gemm {}x{}x{}{}{}{}", args.m, args.k, args.n, args.batch > 1 ? " batched" : "",
                                    epilogue, args.addend ? " addend" : "")
                      : std::string());
  if (cuda::gemm_lt(ctx_, args)) return;
  if (args.addend) return gemm(addend_into_c(*this, args));
  check(!args.gelu_grad || (!args.bias && !args.gelu), "gemm: GELU's backward epilogue takes no bias and no GELU");
  if (args.c_dtype == DType::BF16 && (args.bias || args.gelu || args.gelu_grad))
    return gemm_with_f32_epilogue(*this, args);
  GemmArgs plain = args;
  plain.bias = nullptr;
  plain.gelu = plain.gelu_grad = false;
  cuda::gemm(ctx_, plain);
  if (args.m == 0 || args.n == 0) return;
  const Shape shape{args.batch, args.m, args.n};
  const View c{args.c, args.c_dtype, shape, {args.stride_c, args.ldc, 1}};
  if (args.bias) binary(BinaryOp::Add, c, c, {const_cast<void*>(args.bias), args.c_dtype, shape, {0, 0, 1}});
  if (args.gelu || args.gelu_grad) {
    check(args.c_is_contiguous(), "gemm on CUDA: a GELU epilogue needs a contiguous C");
    const View flat{args.c, args.c_dtype, {args.batch * args.m * args.n}, {1}};
    const View pre{args.pre_gelu, args.c_dtype, flat.shape, {1}};
    if (args.gelu_grad) return gelu_backward(flat, flat, pre);
    copy(pre, flat);
    gelu_forward(flat, pre);
  }
}

// ---- indexing ----

// The messages are the CPU backend's, word for word.
void CudaBackend::check_indices(const View& index, int64_t rows, const char* op) {
  if (auto bad = ctx_.find_bad_index(index, rows, std::nullopt, op))
    fail("{}: index {} (at position {}) is out of range for {} rows", op, ctx_.read_index(index, *bad), *bad, rows);
}

void CudaBackend::check_targets(const View& targets, int64_t classes, int64_t ignore_index, const char* op) {
  if (auto bad = ctx_.find_bad_index(targets, classes, ignore_index, op))
    fail("{}: target {} (row {}) is out of range for {} classes (ignore_index {})", op,
         ctx_.read_index(targets, *bad), *bad, classes, ignore_index);
}

void CudaBackend::index_select_rows(const View& out, const View& table, const View& index) {
  OpScope op(ctx_, "index_select");
  const int64_t n = index.numel();
  if (n == 0 || out.numel() == 0) return;
  const size_t row_bytes = size_t(out.numel() / n) * dtype_size(out.dtype);  // rows move as bytes: any dtype
  ctx_.check_launch(
      cuda::launch_index_select_rows(ctx_.launch(), n, row_bytes, out.data, table.data, index.data, index.dtype),
      "index_select");
}

void CudaBackend::index_add_rows(const View& grad_table, const View& index, const View& grad_out) {
  OpScope op(ctx_, "index_add");
  require_floating(grad_table.dtype, "index_add");
  const int64_t n = index.numel();
  if (n == 0 || grad_out.numel() == 0) return;
  ctx_.check_launch(cuda::launch_index_add_rows(ctx_.launch(), grad_table.dtype, n, grad_out.numel() / n,
                                                grad_table.data, index.data, index.dtype, grad_out.data),
                    "index_add");
}

// ---- layer norm, gelu, softmax, cross-entropy ----

void CudaBackend::layer_norm_forward(const View& y, const View& mean, const View& rstd, const View& x,
                                     const View& weight, const View& bias, double eps) {
  OpScope op(ctx_, "layer_norm");
  require_floating(x.dtype, "layer_norm");
  const auto [rows, cols] = rows_of(x);
  ctx_.check_launch(cuda::launch_layer_norm_forward(ctx_.launch(), x.dtype, rows, cols, y.data,
                                                    y.dtype == DType::BF16, mean.data, rstd.data, x.data, weight.data,
                                                    bias.data, eps),
                    "layer_norm");
}

void CudaBackend::layer_norm_backward(const View& dx, const View& dweight, const View& dbias, const View& dy,
                                      const View& x, const View& weight, const View& mean, const View& rstd,
                                      const View& residual) {
  OpScope op(ctx_, "layer_norm_backward");
  require_floating(x.dtype, "layer_norm_backward");
  const auto [rows, cols] = rows_of(x);
  const cuda::LaunchContext lc = ctx_.launch();
  const bool dy_bf16 = dy.dtype == DType::BF16;
  if (dx.data)
    ctx_.check_launch(cuda::launch_layer_norm_backward_input(lc, x.dtype, rows, cols, dx.data, dy.data, dy_bf16,
                                                             x.data, weight.data, mean.data, rstd.data,
                                                             residual.data),
                      "layer_norm_backward");
  if (!dweight.data && !dbias.data) return;  // frozen: no column sums at all
  Scratch partials(ctx_, cuda::layer_norm_params_scratch_bytes(lc, x.dtype, rows, cols), "layer_norm partial sums");
  ctx_.check_launch(cuda::launch_layer_norm_backward_params(lc, x.dtype, rows, cols, dweight.data, dbias.data, dy.data,
                                                            dy_bf16, x.data, mean.data, rstd.data, partials.get()),
                    "layer_norm_backward");
}

void CudaBackend::gelu_forward(const View& y, const View& x) {
  OpScope op(ctx_, "gelu");
  require_floating_or_bf16(x.dtype, "gelu");
  ctx_.check_launch(cuda::launch_gelu_forward(ctx_.launch(), x.dtype, x.numel(), y.data, x.data), "gelu");
}

void CudaBackend::gelu_backward(const View& dx, const View& dy, const View& x) {
  OpScope op(ctx_, "gelu_backward");
  require_floating_or_bf16(x.dtype, "gelu_backward");
  ctx_.check_launch(cuda::launch_gelu_backward(ctx_.launch(), x.dtype, x.numel(), dx.data, dy.data, x.data),
                    "gelu_backward");
}

void CudaBackend::softmax_forward(const View& y, const View& x, bool log) {
  OpScope op(ctx_, "softmax");
  require_floating(x.dtype, "softmax");
  const auto [rows, cols] = rows_of(x);
  ctx_.check_launch(cuda::launch_softmax_forward(ctx_.launch(), x.dtype, rows, cols, y.data, x.data, log), "softmax");
}

void CudaBackend::softmax_backward(const View& dx, const View& dy, const View& y, bool log) {
  OpScope op(ctx_, "softmax_backward");
  require_floating(y.dtype, "softmax_backward");
  const auto [rows, cols] = rows_of(y);
  ctx_.check_launch(cuda::launch_softmax_backward(ctx_.launch(), y.dtype, rows, cols, dx.data, dy.data, y.data, log),
                    "softmax_backward");
}

void CudaBackend::cross_entropy_forward(const View& loss, const View& lse, const View& logits, const View& targets,
                                        int64_t ignore_index) {
  OpScope op(ctx_, "cross_entropy");
  require_floating(logits.dtype, "cross_entropy");
  const auto [rows, cols] = rows_of(logits);
  ctx_.check_launch(cuda::launch_cross_entropy_forward(ctx_.launch(), logits.dtype, rows, cols, loss.data, lse.data,
                                                       logits.data, targets.data, targets.dtype, ignore_index),
                    "cross_entropy");
}

void CudaBackend::cross_entropy_backward(const View& dlogits, const View& dloss, const View& logits, const View& lse,
                                         const View& targets, int64_t ignore_index) {
  OpScope op(ctx_, "cross_entropy_backward");
  require_floating(logits.dtype, "cross_entropy_backward");
  const auto [rows, cols] = rows_of(logits);
  ctx_.check_launch(cuda::launch_cross_entropy_backward(ctx_.launch(), logits.dtype, rows, cols, dlogits.data,
                                                        dloss.data, logits.data, lse.data, targets.data,
                                                        targets.dtype, ignore_index),
                    "cross_entropy_backward");
}

// ---- attention ----
// The tensor-core kernels take the operands as they are (attention_plan.h).
// Every other call runs on contiguous operands in the compute dtype (f32, or
// f64): bf16 inputs of larger heads are widened, which the f32 kernels then
// multiply exactly, and a bf16 output is rounded once at the end.

namespace {

DType compute_dtype(const View& q) { return q.dtype == DType::F64 ? DType::F64 : DType::F32; }

}  // namespace

void CudaBackend::attention_forward(const View& out, const View& lse, const View& q, const View& k, const View& v,
                                    const View& key_mask, const AttentionArgs& args) {
  cuda::check_attention_dtypes(q, out, "attention");
  const cuda::AttentionViews views{q, k, v, out};
  if (!cuda::tensor_core_fits(views)) {
    const DType t = compute_dtype(q);
    if (!KernelOperands::fit({&out, &q, &k, &v}, t)) {
      KernelOperands ops(*this);
      attention_forward(ops.out(out, t), lse, ops.in(q, t), ops.in(k, t), ops.in(v, t), key_mask, args);
      return ops.finish();
    }
  }
  const cuda::AttentionShape s = cuda::attention_shape(views, key_mask, args);
  OpScope op(ctx_, "attention_forward", cuda::attention_flops(s, 4));
  ctx_.check_launch(cuda::launch_attention_forward(ctx_.launch(), q.dtype, s, out.data, lse.ptr<float>(), q.data,
                                                   k.data, v.data),
                    "attention_forward");
}

void CudaBackend::attention_backward(const View& dq, const View& dk, const View& dv, const View& dout, const View& q,
                                     const View& k, const View& v, const View& out, const View& lse,
                                     const View& key_mask, const AttentionArgs& args) {
  cuda::check_attention_dtypes(q, out, "attention_backward");
  const cuda::AttentionViews views{q, k, v, out, dout, dq, dk, dv};
  if (!cuda::tensor_core_fits(views)) {
    const DType t = compute_dtype(q);
    if (!KernelOperands::fit({&dq, &dk, &dv, &dout, &q, &k, &v, &out}, t)) {
      KernelOperands ops(*this);
      attention_backward(ops.out(dq, t), ops.out(dk, t), ops.out(dv, t), ops.in(dout, t), ops.in(q, t),
                         ops.in(k, t), ops.in(v, t), ops.in(out, t), lse, key_mask, args);
      return ops.finish();
    }
  }
  const cuda::AttentionShape s = cuda::attention_shape(views, key_mask, args);
  OpScope op(ctx_, "attention_backward", cuda::attention_flops(s, 10));
  const size_t scratch_bytes = cuda::attention_backward_scratch_bytes(q.dtype, s);
  Scratch scratch(ctx_, scratch_bytes, "attention_backward rowsum(dO * O) and score gradients");
  ctx_.check_launch(cuda::launch_attention_backward(ctx_.launch(), q.dtype, s, dq.data, dk.data, dv.data, dout.data,
                                                    q.data, k.data, v.data, out.data, lse.ptr<const float>(),
                                                    scratch.get(), scratch_bytes),
                    "attention_backward");
}

// ---- dropout and AdamW ----

void CudaBackend::dropout_add_layer_norm(const View& r, const View& in, const View& residual, double p,
                                         uint64_t seed, uint64_t offset, const View& y, const View& mean,
                                         const View& rstd, const View& weight, const View& bias, double eps) {
  const auto [rows, cols] = rows_of(r);
  const bool f32 = r.dtype == DType::F32 && residual.dtype == DType::F32 && weight.dtype == DType::F32 &&
                   bias.dtype == DType::F32 && (in.dtype == DType::F32 || in.dtype == DType::BF16);
  if (!f32 || !cuda::layer_norm_rows_fit(cols, {r.data, in.data, residual.data, y.data, weight.data, bias.data}))
    return Backend::dropout_add_layer_norm(r, in, residual, p, seed, offset, y, mean, rstd, weight, bias, eps);
  OpScope op(ctx_, "dropout_add_layer_norm");
  ctx_.check_launch(cuda::launch_dropout_add_layer_norm(ctx_.launch(), in.dtype, rows, cols, r.data, in.data,
                                                        residual.data, p, seed, offset, y.data,
                                                        y.dtype == DType::BF16, mean.data, rstd.data, weight.data,
                                                        bias.data, eps),
                    "dropout_add_layer_norm");
}

void CudaBackend::layer_norm_backward_dropout(const View& dx, const View& dy, const View& x, const View& weight,
                                              const View& mean, const View& rstd, const View& residual,
                                              const View& dropped, double p, uint64_t seed, uint64_t offset) {
  const auto [rows, cols] = rows_of(x);
  auto f32_or_bf16 = [](DType t) { return t == DType::F32 || t == DType::BF16; };
  const bool f32 = x.dtype == DType::F32 && weight.dtype == DType::F32 && f32_or_bf16(dy.dtype) &&
                   f32_or_bf16(dropped.dtype) && (!residual.data || residual.dtype == DType::F32);
  if (!f32 || !cuda::layer_norm_rows_fit(cols, {dx.data, dy.data, x.data, weight.data, residual.data, dropped.data}))
    return Backend::layer_norm_backward_dropout(dx, dy, x, weight, mean, rstd, residual, dropped, p, seed, offset);
  OpScope op(ctx_, "layer_norm_backward_dropout");
  ctx_.check_launch(cuda::launch_layer_norm_backward_dropout(
                        ctx_.launch(), rows, cols, dx.data, dy.data, dy.dtype == DType::BF16, x.data, weight.data,
                        mean.data, rstd.data, residual.data, dropped.data, dropped.dtype == DType::BF16, p, seed,
                        offset),
                    "layer_norm_backward_dropout");
}

void CudaBackend::dropout(const View& out, const View& in, double p, uint64_t seed, uint64_t offset,
                          const View& residual) {
  OpScope op(ctx_, "dropout");
  require_floating_or_bf16(in.dtype, "dropout");
  ctx_.check_launch(cuda::launch_dropout(ctx_.launch(), in.dtype, out.dtype, in.numel(), out.data, in.data,
                                         residual.data, p, seed, offset),
                    "dropout");
}

// The per-step scalars are formed in double exactly as cpu_optim.cpp forms
// them (this file is also built with -ffp-contract=off); see optim.cu.
void CudaBackend::adamw_step(std::span<const AdamWTensors> tensors, const AdamWArgs& a) {
  OpScope op(ctx_, "adamw");
  if (tensors.empty()) return;
  const DType dtype = tensors[0].param.dtype;
  require_floating(dtype, "adamw_step");
  std::vector<cuda::AdamWBuffers> buffers;
  buffers.reserve(tensors.size());
  for (const AdamWTensors& t : tensors)
    buffers.push_back({t.param.numel(), t.param.data, t.grad.data, t.m.data, t.v.data});
  const double bias_correction1 = 1 - std::pow(a.beta1, double(a.step));
  const double bias_correction2 = 1 - std::pow(a.beta2, double(a.step));
  cuda::AdamWScalars s;
  s.decay = 1 - a.lr * a.weight_decay;
  s.beta1 = a.beta1;
  s.one_minus_beta1 = 1 - a.beta1;
  s.beta2 = a.beta2;
  s.one_minus_beta2 = 1 - a.beta2;
  s.neg_step_size = -(a.lr / bias_correction1);
  s.bias_correction2_sqrt = std::sqrt(bias_correction2);
  s.eps = a.eps;
  ctx_.check_launch(cuda::launch_adamw(ctx_.launch(), dtype, buffers, s), "adamw_step");
}

}  // namespace

// ---- the public API of cuda_backend.h ----

int cuda_device_count() {
  // Devices do not come and go while we run; asking once keeps backend_for cheap.
  static const int count = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // no driver or no device: not an error for the caller
      return 0;
    }
    return n;
  }();
  return count;
}

Backend& cuda_backend(int index) {
  static std::mutex mutex;
  static auto* backends = new std::vector<std::unique_ptr<CudaBackend>>();  // never destroyed: tensors outlive statics
  cuda::DeviceContext& ctx = cuda::device_context(index);                    // checks the index
  std::lock_guard<std::mutex> lock(mutex);
  if (backends->size() <= size_t(index)) backends->resize(size_t(index) + 1);
  auto& slot = (*backends)[size_t(index)];
  if (!slot) slot = std::make_unique<CudaBackend>(ctx.index());
  return *slot;
}

CudaMemoryStats cuda_memory_stats(int index) { return cuda::device_context(index).memory_stats(); }
void cuda_reset_peak(int index) { cuda::device_context(index).reset_peak(); }
void cuda_synchronize(int index) { cuda::device_context(index).synchronize("cuda_synchronize"); }

}  // namespace engine
