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
#include "engine/cuda/cuda_backend_impl.h"
#include "engine/cuda/op_scope.h"

#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace engine::cuda {

namespace {

// ---- argument helpers (the shared ones are in cuda_backend_impl.h) ----

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


}  // namespace

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

}  // namespace engine::cuda

namespace engine {

using cuda::CudaBackend;

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
