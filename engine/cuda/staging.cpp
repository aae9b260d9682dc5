// Pinned double-buffered staging for host-to-device copies (staging.h).
#include "engine/cuda/staging.h"

#include "engine/cuda/cuda_context.h"

#include <algorithm>
#include <cstring>

namespace engine::cuda {

PinnedStaging::~PinnedStaging() {
  // Process exit: the driver may already be gone, so errors are ignored.
  for (int k = 0; k < 2; ++k) {
    if (done_[k]) cudaEventDestroy(done_[k]);
    if (buffer_[k]) cudaFreeHost(buffer_[k]);
  }
}

void PinnedStaging::ensure_buffers() {
  if (buffer_[0]) return;
  for (int k = 0; k < 2; ++k) {
    check_cuda(cudaHostAlloc(&buffer_[k], kChunkBytes, cudaHostAllocDefault), device_, "pinned staging buffer");
    check_cuda(cudaEventCreateWithFlags(&done_[k], cudaEventDisableTiming), device_, "pinned staging event");
  }
}

void PinnedStaging::to_device(void* device_dst, const void* host_src, size_t nbytes, cudaStream_t stream) {
  ensure_buffers();
  auto* dst = static_cast<char*>(device_dst);
  const auto* src = static_cast<const char*>(host_src);
  for (size_t offset = 0, chunk = 0; offset < nbytes; offset += kChunkBytes, ++chunk) {
    const int k = int(chunk % 2);
    const size_t n = std::min(kChunkBytes, nbytes - offset);
    check_cuda(cudaEventSynchronize(done_[k]), device_, "copy_from_host");  // its previous DMA is done
    std::memcpy(buffer_[k], src + offset, n);
    check_cuda(cudaMemcpyAsync(dst + offset, buffer_[k], n, cudaMemcpyHostToDevice, stream), device_,
               "copy_from_host");
    check_cuda(cudaEventRecord(done_[k], stream), device_, "copy_from_host");
  }
}

}  // namespace engine::cuda
