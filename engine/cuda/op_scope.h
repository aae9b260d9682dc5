// OpScope: the profiler's view of one CUDA backend call, timed as launch
// time, or with CURLORA_CUDA_SYNC=1 as the GPU's own time by CUDA events.
// Included by cuda_backend.cpp only.
#pragma once

#include "engine/cuda/cuda_context.h"
#include "engine/profiler.h"

#include <cuda_runtime.h>

#include <optional>
#include <string>

namespace engine::cuda {

// Times one backend call into the active Profiler (engine/profiler.h). Work
// is queued asynchronously, so the seconds are launch times, unless
// CURLORA_CUDA_SYNC=1 makes every call wait for its work: then CUDA events
// on the stream time the GPU's work alone (neither the launch nor the wait),
// and `bench_step --profile` gives a per-op breakdown of kernel time. `name`
// may then be a finer one (a GEMM's shape).
class OpScope {
 public:
  OpScope(DeviceContext& ctx, const char* op, double flops = 0, std::string name = {})
      : ctx_(ctx), op_(op), name_(std::move(name)), flops_(flops) {
    if (!ctx_.sync_each_launch()) {
      host_.emplace(op, flops);
    } else if (Profiler::active()) {
      cudaEventCreate(&start_), cudaEventCreate(&stop_);
      cudaEventRecord(start_, ctx_.stream());
    }
  }
  ~OpScope() {
    if (!ctx_.sync_each_launch()) return;
    if (start_) cudaEventRecord(stop_, ctx_.stream());
    cudaStreamSynchronize(ctx_.stream());  // a fault is reported by the next check
    if (!start_) return;
    float ms = 0;
    if (cudaEventElapsedTime(&ms, start_, stop_) == cudaSuccess)
      Profiler::active()->add(name_.empty() ? op_ : name_.c_str(), flops_, ms * 1e-3);
    cudaEventDestroy(start_), cudaEventDestroy(stop_);
  }
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;

  static bool profiling_on_device(const DeviceContext& ctx) { return ctx.sync_each_launch() && Profiler::active(); }

 private:
  DeviceContext& ctx_;
  const char* op_;
  std::string name_;
  double flops_;
  std::optional<ProfileScope> host_;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

}  // namespace engine::cuda
