// Backend lookup by device, and the tensor-to-View bridge. The CUDA backend
// registers itself only when compiled in (meson option 'cuda').
#include "engine/backend.h"

#include "engine/cpu/cpu_backend.h"
#include "engine/error.h"
#include "engine/rng.h"
#include "engine/tensor.h"

#ifdef CURLORA_WITH_CUDA
#include "engine/cuda/cuda_backend.h"
#endif

namespace engine {

bool View::is_contiguous() const {
  if (numel() == 0) return true;
  int64_t expected = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

std::optional<int64_t> View::even_row_stride() const {
  const size_t dims = shape.size();
  const int64_t cols = dims == 0 ? 1 : shape.back();
  if (dims < 2 || numel() == 0) return cols;
  if (strides.back() != 1 && cols != 1) return std::nullopt;
  const int64_t ld = shape[dims - 2] == 1 ? cols : strides[dims - 2];
  int64_t expected = ld * shape[dims - 2];
  for (size_t d = dims - 2; d-- > 0;) {
    if (shape[d] != 1 && strides[d] != expected) return std::nullopt;
    expected *= shape[d];
  }
  return ld;
}

int64_t View::row_stride() const {
  const std::optional<int64_t> ld = even_row_stride();
  check(ld.has_value(), "rows of shape {} (strides {}): not evenly spaced with a contiguous last dim",
        shape_str(shape), shape_str(strides));
  return *ld;
}

View view_of(const Tensor& t) { return View{t.data_ptr(), t.dtype(), t.shape(), t.strides()}; }

KernelOperands::~KernelOperands() {
  for (const auto& [ptr, nbytes] : scratch_) backend_.deallocate(ptr, nbytes);
}

View KernelOperands::scratch(const View& like, DType dtype) {
  const size_t nbytes = size_t(like.numel()) * dtype_size(dtype);
  View v{nbytes ? backend_.allocate(nbytes) : nullptr, dtype, like.shape, contiguous_strides(like.shape)};
  if (v.data) scratch_.emplace_back(v.data, nbytes);
  return v;
}

View KernelOperands::in(const View& v, DType dtype) {
  if (fits(v, dtype)) return v;
  const View copy = scratch(v, dtype);
  backend_.copy(copy, v);
  return copy;
}

View KernelOperands::inout(const View& v, DType dtype) {
  const View copy = in(v, dtype);
  if (copy.data != v.data) results_.emplace_back(v, copy);
  return copy;
}

View KernelOperands::out(const View& v, DType dtype) {
  if (fits(v, dtype)) return v;
  const View written = scratch(v, dtype);
  results_.emplace_back(v, written);
  return written;
}

void KernelOperands::finish() {
  for (const auto& [caller, written] : results_) backend_.copy(caller, written);
  results_.clear();
}

void gemm_with_f32_epilogue(Backend& backend, const GemmArgs& args) {
  check(args.dtype == DType::BF16 && args.c_dtype == DType::BF16 && !args.addend,
        "gemm: an f32 epilogue is for bf16 products into a bf16 C (no addend), got {} into {}",
        dtype_name(args.dtype), dtype_name(args.c_dtype));
  check(!(args.gelu || args.gelu_grad) || args.c_is_contiguous(), "gemm: a GELU epilogue needs a contiguous C");
  KernelOperands f32(backend);
  GemmArgs wide = args;
  wide.c_dtype = DType::F32;
  const View c{args.c, DType::BF16, {args.batch, args.m, args.n}, {args.stride_c, args.ldc, 1}};
  wide.c = (args.beta != 0 ? f32.inout(c, DType::F32) : f32.out(c, DType::F32)).data;  // beta reads C
  wide.ldc = args.n;
  wide.stride_c = args.m * args.n;
  if (args.bias) wide.bias = f32.in(View{const_cast<void*>(args.bias), DType::BF16, {args.n}, {1}}, DType::F32).data;
  const View pre{args.pre_gelu, DType::BF16, {args.batch * args.m * args.n}, {1}};  // laid out as C
  if (args.gelu) wide.pre_gelu = f32.out(pre, DType::F32).data;
  if (args.gelu_grad) wide.pre_gelu = f32.in(pre, DType::F32).data;
  backend.gemm(wide);
  f32.finish();
}

void Backend::dropout_add_layer_norm(const View& r, const View& in, const View& residual, double p, uint64_t seed,
                                     uint64_t offset, const View& y, const View& mean, const View& rstd,
                                     const View& weight, const View& bias, double eps) {
  dropout(r, in, p, seed, offset, residual);
  layer_norm_forward(y, mean, rstd, r, weight, bias, eps);
}

void Backend::layer_norm_backward_dropout(const View& dx, const View& dy, const View& x, const View& weight,
                                          const View& mean, const View& rstd, const View& residual,
                                          const View& dropped, double p, uint64_t seed, uint64_t offset) {
  layer_norm_backward(dx, View{}, View{}, dy, x, weight, mean, rstd, residual);
  dropout(dropped, dx, p, seed, offset, View{});
}

GemmArgs addend_into_c(Backend& backend, const GemmArgs& args) {
  check(!args.gelu && !args.gelu_grad, "gemm: an addend takes no GELU epilogue");
  GemmArgs g = args;
  g.addend = nullptr;
  if (args.addend && args.addend != args.c) {
    const Shape shape{args.batch, args.m, args.n};
    const int64_t ld = args.ld_addend ? args.ld_addend : args.ldc;
    backend.copy(View{args.c, args.c_dtype, shape, {args.stride_c, args.ldc, 1}},
                 View{const_cast<void*>(args.addend), args.c_dtype, shape, {args.stride_c, ld, 1}});
  }
  return g;
}

Backend& backend_for(Device device) {
  if (device.is_cpu()) return cpu_backend();
#ifdef CURLORA_WITH_CUDA
  return cuda_backend(device.index);
#else
  fail("device {} requested, but this build has no CUDA backend (configure with -Dcuda=enabled)", device.str());
#endif
}

bool cuda_available() {
#ifdef CURLORA_WITH_CUDA
  return cuda_device_count() > 0;
#else
  return false;
#endif
}

Generator& default_generator() {
  static Generator generator(0);
  return generator;
}

void manual_seed(uint64_t seed) { default_generator().set_state(seed, 0); }

}  // namespace engine
