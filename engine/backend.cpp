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

View view_of(const Tensor& t) { return View{t.data_ptr(), t.dtype(), t.shape(), t.strides()}; }

namespace {

// Backend memory for the length of a scope.
class Buffer {
 public:
  Buffer(Backend& backend, size_t nbytes)
      : backend_(backend), nbytes_(nbytes), ptr_(nbytes ? backend.allocate(nbytes) : nullptr) {}
  ~Buffer() {
    if (ptr_) backend_.deallocate(ptr_, nbytes_);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void* get() const { return ptr_; }

 private:
  Backend& backend_;
  size_t nbytes_;
  void* ptr_;
};

}  // namespace

void gemm_with_f32_epilogue(Backend& backend, const GemmArgs& args) {
  check(args.dtype == DType::BF16 && args.c_dtype == DType::BF16 && args.beta == 0,
        "gemm: an f32 epilogue is for bf16 products into a bf16 C (beta 0), got {} into {}", dtype_name(args.dtype),
        dtype_name(args.c_dtype));
  check(!args.gelu || (args.ldc == args.n && (args.batch == 1 || args.stride_c == args.m * args.n)),
        "gemm: a GELU epilogue needs a contiguous C");
  const int64_t count = args.batch * args.m * args.n;
  const Shape shape{args.batch, args.m, args.n}, dense{args.m * args.n, args.n, 1};
  Buffer wide(backend, size_t(count) * sizeof(float)), bias(backend, args.bias ? size_t(args.n) * sizeof(float) : 0),
      pre(backend, args.gelu ? size_t(count) * sizeof(float) : 0);
  GemmArgs f32 = args;
  f32.c_dtype = DType::F32;
  f32.c = wide.get();
  f32.ldc = args.n;
  f32.stride_c = args.m * args.n;
  if (args.bias) {
    backend.copy(View{bias.get(), DType::F32, {args.n}, {1}},
                 View{const_cast<void*>(args.bias), DType::BF16, {args.n}, {1}});
    f32.bias = bias.get();
  }
  f32.pre_gelu = pre.get();
  backend.gemm(f32);
  backend.copy(View{args.c, DType::BF16, shape, {args.stride_c, args.ldc, 1}}, View{wide.get(), DType::F32, shape, dense});
  if (args.gelu)  // laid out as C, which a GELU epilogue needs contiguous
    backend.copy(View{args.pre_gelu, DType::BF16, {count}, {1}}, View{pre.get(), DType::F32, {count}, {1}});
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
