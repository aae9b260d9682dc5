// One CUDA device's state, for the host code of the CUDA backend: its stream
// (all work and all memory traffic is ordered on it), cuBLAS handle, memory
// pool and counters, and the error checks that turn CUDA statuses into
// engine::Error. Internal to engine/cuda; users see engine/cuda/cuda_backend.h.
#pragma once

#include "engine/cuda/kernels.h"
#include "engine/cuda/cuda_backend.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace engine::cuda {

// Throws engine::Error "cuda:N: <what> failed: <CUDA's message>" unless status is cudaSuccess.
void check_cuda(cudaError_t status, int device, const char* what);
void check_cublas(cublasStatus_t status, int device, const char* what);
std::string format_bytes(size_t bytes);  // "1.50 GiB"

class DeviceContext {
 public:
  explicit DeviceContext(int index);
  DeviceContext(const DeviceContext&) = delete;
  DeviceContext& operator=(const DeviceContext&) = delete;

  int index() const { return index_; }
  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return cublas_; }
  cublasLtHandle_t cublas_lt() const { return cublas_lt_; }
  // cuBLAS and cuBLASLt share one workspace (they run in order on the one
  // stream); 32 MiB is NVIDIA's recommendation for Hopper.
  void* gemm_workspace() const { return cublas_workspace_; }
  static constexpr size_t kGemmWorkspaceBytes = size_t(32) << 20;
  // Makes this device current on the calling thread and returns what launchers need.
  LaunchContext launch() const;

  // ---- memory: stream-ordered allocations from the device's default pool ----
  // Throws engine::Error naming `what` and the size when the device is out of memory.
  void* allocate(size_t nbytes, const char* what);
  void deallocate(void* ptr, size_t nbytes) noexcept;  // called from destructors: never throws
  CudaMemoryStats memory_stats() const;
  void reset_peak();

  // ---- errors ----
  // Checks a launcher's status; with CURLORA_CUDA_SYNC=1 it also waits for the
  // kernel, so that an asynchronous fault is reported against the op that caused it.
  void check_launch(cudaError_t status, const char* op);
  // Waits for all queued work; an earlier kernel's fault surfaces here.
  void synchronize(const char* what);
  bool sync_each_launch() const { return sync_each_launch_; }

  // The first position whose index is outside [0, rows) (and is not
  // `ignore`), or nothing. Kernels cannot throw, so ops that trust indices
  // call this first; it waits for the GPU to read the answer back.
  std::optional<int64_t> find_bad_index(const View& index, int64_t rows, std::optional<int64_t> ignore,
                                        const char* op);
  // One element of an i32/i64 device tensor, read back (for error messages).
  int64_t read_index(const View& index, int64_t position);

 private:
  int index_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  cublasLtHandle_t cublas_lt_ = nullptr;
  cudaMemPool_t pool_ = nullptr;
  int sm_count_ = 1;
  bool sync_each_launch_ = false;
  void* cublas_workspace_ = nullptr;
  unsigned long long* device_flag_ = nullptr;  // find_bad_index's answer on the device
  unsigned long long* host_flag_ = nullptr;    // ... and in pinned host memory
  std::atomic<size_t> current_bytes_{0}, peak_bytes_{0};
};

// The context of device `index`, created on first use and never destroyed
// (tensors may be freed during static destruction). Throws when the device does not exist.
DeviceContext& device_context(int index);

// A temporary device buffer from the pool, released (stream-ordered) at scope exit.
class Scratch {
 public:
  Scratch(DeviceContext& ctx, size_t nbytes, const char* what)
      : ctx_(ctx), nbytes_(nbytes), ptr_(nbytes ? ctx.allocate(nbytes, what) : nullptr) {}
  ~Scratch() {
    if (ptr_) ctx_.deallocate(ptr_, nbytes_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get() const { return ptr_; }

 private:
  DeviceContext& ctx_;
  size_t nbytes_;
  void* ptr_;
};

// cuBLAS GEMM for the backend (cuda_gemm.cpp), args.bias ignored.
void gemm(DeviceContext& ctx, const GemmArgs& args);
// The same by cuBLASLt, with args' epilogue (bias, GELU) in the GEMM's own pass
// over C and the algorithm chosen once per shape. False (nothing done) for what
// it does not take (batches, f64) or where cuBLASLt offers no kernel.
bool gemm_lt(DeviceContext& ctx, const GemmArgs& args);

}  // namespace engine::cuda
