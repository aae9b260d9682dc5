// Seam for the CUDA backend: host code, compiled by the C++ compiler (kernels
// will live in .cu files). It finds devices but implements no kernels yet, so
// asking for a CUDA tensor is a clear error rather than a link failure.
#include "engine/cuda/cuda_backend.h"

#include "engine/error.h"

#include <cuda_runtime.h>

namespace engine {

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) return 0;
  return count;
}

Backend& cuda_backend(int index) {
  int count = cuda_device_count();
  check(index >= 0 && index < count, "cuda:{} requested, but {} CUDA device(s) are present", index, count);
  fail("cuda:{}: the CUDA backend has no kernels yet", index);
}

}  // namespace engine
