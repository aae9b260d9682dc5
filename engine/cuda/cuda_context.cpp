// Per-device state of the CUDA backend: the stream, the cuBLAS handle, the
// stream-ordered memory pool with its counters, and CUDA error reporting.
#include "engine/cuda/cuda_context.h"

#include "engine/error.h"

#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

namespace engine::cuda {

void check_cuda(cudaError_t status, int device, const char* what) {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error, so the next check does not report it again
  fail("cuda:{}: {} failed: {} ({})", device, what, cudaGetErrorString(status), cudaGetErrorName(status));
}

void check_cublas(cublasStatus_t status, int device, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  fail("cuda:{}: {} failed in cuBLAS: {}", device, what, cublasGetStatusString(status));
}

std::string format_bytes(size_t bytes) {
  const double b = double(bytes);
  if (b >= double(1ull << 40)) return fmt::format("{:.2f} TiB", b / double(1ull << 40));
  if (b >= double(1ull << 30)) return fmt::format("{:.2f} GiB", b / double(1ull << 30));
  if (b >= double(1ull << 20)) return fmt::format("{:.1f} MiB", b / double(1ull << 20));
  if (b >= double(1ull << 10)) return fmt::format("{:.1f} KiB", b / double(1ull << 10));
  return fmt::format("{} B", bytes);
}

namespace {

// The device the calling thread last made current through us. cudaSetDevice
// is cheap, but is called on every op; this skips it when nothing changed.
// (Code that calls cudaSetDevice itself should switch back before using us.)
thread_local int current_device = -1;

}  // namespace

DeviceContext::DeviceContext(int index) : index_(index) {
  check_cuda(cudaSetDevice(index), index, "cudaSetDevice");
  current_device = index;
  check_cuda(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, index), index, "reading the SM count");
  // A non-blocking stream: it never waits for the legacy default stream.
  check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), index, "creating a stream");

  // The default pool keeps freed memory for reuse instead of returning it to
  // the driver at every synchronisation: training repeats the same sizes.
  check_cuda(cudaDeviceGetDefaultMemPool(&pool_, index), index, "getting the memory pool");
  uint64_t threshold = std::numeric_limits<uint64_t>::max();
  check_cuda(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &threshold), index,
             "setting the pool's release threshold");

  check_cublas(cublasCreate(&cublas_), index, "cublasCreate");
  check_cublas(cublasSetStream(cublas_, stream_), index, "cublasSetStream");
  check_cuda(cudaMalloc(&cublas_workspace_, kGemmWorkspaceBytes), index, "allocating the cuBLAS workspace");
  check_cublas(cublasSetWorkspace(cublas_, cublas_workspace_, kGemmWorkspaceBytes), index, "cublasSetWorkspace");
  check_cublas(cublasLtCreate(&cublas_lt_), index, "cublasLtCreate");

  check_cuda(cudaMalloc(&device_flag_, sizeof(*device_flag_)), index, "allocating the index-check flag");
  check_cuda(cudaMallocHost(&host_flag_, sizeof(*host_flag_)), index, "allocating the index-check flag");

  const char* sync = std::getenv("CURLORA_CUDA_SYNC");
  sync_each_launch_ = sync && std::strcmp(sync, "0") != 0 && sync[0] != '\0';
}

LaunchContext DeviceContext::launch() const {
  if (current_device != index_) {
    check_cuda(cudaSetDevice(index_), index_, "cudaSetDevice");
    current_device = index_;
  }
  return LaunchContext{stream_, sm_count_};
}

// ---- memory ----

void* DeviceContext::allocate(size_t nbytes, const char* what) {
  launch();
  void* ptr = nullptr;
  cudaError_t status = cudaMallocAsync(&ptr, nbytes, stream_);
  if (status != cudaSuccess) {
    // The pool may hold enough memory in freed blocks of the wrong sizes:
    // wait for pending frees, give everything unused back, and try once more.
    cudaGetLastError();
    cudaStreamSynchronize(stream_);
    cudaMemPoolTrimTo(pool_, 0);
    status = cudaMallocAsync(&ptr, nbytes, stream_);
  }
  if (status != cudaSuccess) {
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    cudaGetLastError();
    if (status == cudaErrorMemoryAllocation)
      fail("cuda:{}: out of memory allocating {} for {} (tensors hold {}, peak {}; the device has {} free of {})",
           index_, format_bytes(nbytes), what, format_bytes(current_bytes_), format_bytes(peak_bytes_),
           format_bytes(free_bytes), format_bytes(total_bytes));
    fail("cuda:{}: allocating {} for {} failed: {}", index_, format_bytes(nbytes), what, cudaGetErrorString(status));
  }
  const size_t now = current_bytes_ += nbytes;
  size_t peak = peak_bytes_.load();
  while (now > peak && !peak_bytes_.compare_exchange_weak(peak, now)) {
  }
  return ptr;
}

void DeviceContext::deallocate(void* ptr, size_t nbytes) noexcept {
  if (!ptr) return;
  if (current_device != index_ && cudaSetDevice(index_) == cudaSuccess) current_device = index_;
  // Stream-ordered: the block returns to the pool after every kernel queued
  // so far (which may still read it) has run. At process exit the runtime may
  // already be gone; there is nothing useful to do with that error.
  if (cudaFreeAsync(ptr, stream_) != cudaSuccess) cudaGetLastError();
  current_bytes_ -= nbytes;
}

CudaMemoryStats DeviceContext::memory_stats() const {
  CudaMemoryStats stats;
  stats.current_bytes = current_bytes_;
  stats.peak_bytes = peak_bytes_;
  uint64_t reserved = 0;
  check_cuda(cudaMemPoolGetAttribute(pool_, cudaMemPoolAttrReservedMemCurrent, &reserved), index_,
             "reading the pool's size");
  stats.reserved_bytes = size_t(reserved);
  return stats;
}

void DeviceContext::reset_peak() { peak_bytes_ = current_bytes_.load(); }

// ---- errors ----

void DeviceContext::check_launch(cudaError_t status, const char* op) {
  check_cuda(status, index_, op);
  if (sync_each_launch_) check_cuda(cudaStreamSynchronize(stream_), index_, op);
}

void DeviceContext::synchronize(const char* what) {
  launch();
  const cudaError_t status = cudaStreamSynchronize(stream_);
  if (status == cudaSuccess) return;
  cudaGetLastError();
  fail("cuda:{}: {} failed: {} ({}; an earlier kernel may have faulted: run with CURLORA_CUDA_SYNC=1 to find it)",
       index_, what, cudaGetErrorString(status), cudaGetErrorName(status));
}

std::optional<int64_t> DeviceContext::find_bad_index(const View& index, int64_t rows, std::optional<int64_t> ignore,
                                                      const char* op) {
  const LaunchContext ctx = launch();
  check_cuda(cudaMemsetAsync(device_flag_, 0xff, sizeof(*device_flag_), stream_), index_, op);
  check_launch(launch_find_bad_index(ctx, index.data, index.dtype, index.numel(), rows, ignore.has_value(),
                                     ignore.value_or(0), device_flag_),
               op);
  check_cuda(cudaMemcpyAsync(host_flag_, device_flag_, sizeof(*host_flag_), cudaMemcpyDeviceToHost, stream_), index_,
             op);
  synchronize(op);
  if (*host_flag_ == ~0ull) return std::nullopt;
  return int64_t(*host_flag_);
}

int64_t DeviceContext::read_index(const View& index, int64_t position) {
  launch();
  const size_t size = dtype_size(index.dtype);
  int64_t value = 0;
  int32_t narrow = 0;
  void* dst = size == 4 ? static_cast<void*>(&narrow) : static_cast<void*>(&value);
  check_cuda(cudaMemcpyAsync(dst, static_cast<const char*>(index.data) + size_t(position) * size, size,
                             cudaMemcpyDeviceToHost, stream_),
             index_, "reading an index");
  synchronize("reading an index");
  return size == 4 ? int64_t(narrow) : value;
}

DeviceContext& device_context(int index) {
  static std::mutex mutex;
  static auto* contexts = new std::vector<std::unique_ptr<DeviceContext>>();  // never destroyed, see the header
  const int count = cuda_device_count();
  check(index >= 0 && index < count, "cuda:{} requested, but {} CUDA device(s) are present", index, count);
  std::lock_guard<std::mutex> lock(mutex);
  if (contexts->size() < size_t(count)) contexts->resize(size_t(count));
  auto& slot = (*contexts)[size_t(index)];
  if (!slot) slot = std::make_unique<DeviceContext>(index);
  return *slot;
}

}  // namespace engine::cuda
