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
