// The CUDA backend: engine::Backend on NVIDIA GPUs, with GEMMs on cuBLAS and
// our kernels (engine/cuda/*.cu) for the rest. Compiled only when the 'cuda'
// option finds nvcc; also here: memory counters, and the TF32 and GEMM tuning switches.
#pragma once

#include "engine/backend.h"

#include <cstddef>

namespace engine {

int cuda_device_count();  // 0 when there is no driver or no GPU
// Throws engine::Error when the device does not exist.
Backend& cuda_backend(int index);

// Bytes held by live tensors and scratch buffers on one device (what the
// engine asked for), their peak since the last reset, and what the memory
// pool has reserved from the driver (>= current: freed blocks are kept for reuse).
struct CudaMemoryStats {
  size_t current_bytes = 0;
  size_t peak_bytes = 0;
  size_t reserved_bytes = 0;
};
CudaMemoryStats cuda_memory_stats(int index = 0);
void cuda_reset_peak(int index = 0);  // peak := current

// Waits until the device has finished all queued work (for timing, and to
// surface an asynchronous kernel fault as engine::Error).
void cuda_synchronize(int index = 0);

// Whether f32 GEMMs may use TF32 tensor cores (10-bit mantissa products, f32
// accumulation): several times faster, about 1e-3 relative error. Off by
// default, as torch.backends.cuda.matmul.allow_tf32. Process-wide.
void set_allow_tf32(bool allow);
bool allow_tf32();

// Whether a GEMM with a GELU epilogue (GELU_AUX, DGELU) times cuBLASLt's
// candidates on the first call of each shape and keeps the fastest, instead
// of the heuristic's first pick. Only candidates that add up each sum in one
// pass are timed, so the results are the same either way. On by default. Process-wide.
void set_gelu_gemm_tuning(bool on);
bool gelu_gemm_tuned();

}  // namespace engine
