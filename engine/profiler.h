// Per-kernel call counts, FLOPs and wall time, collected while a Profiler is
// alive on the calling thread. Benchmarks use it for a per-op breakdown; tests
// use it to prove that frozen weights cost no weight-gradient GEMM.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <string>

namespace engine {

class Profiler {
 public:
  struct Entry {
    int64_t calls = 0;
    double flops = 0;
    double seconds = 0;
  };

  Profiler();  // becomes the active profiler of this thread until destroyed
  ~Profiler();
  Profiler(const Profiler&) = delete;
  Profiler& operator=(const Profiler&) = delete;

  const std::map<std::string, Entry>& entries() const { return entries_; }
  int64_t calls(const std::string& kernel) const;

  static Profiler* active();
  void add(const char* kernel, double flops, double seconds);

 private:
  Profiler* previous_;
  std::map<std::string, Entry> entries_;
};

// Times one kernel call into the active profiler; free when none is active.
class ProfileScope {
 public:
  explicit ProfileScope(const char* kernel, double flops = 0)
      : profiler_(Profiler::active()), kernel_(kernel), flops_(flops) {
    if (profiler_) start_ = std::chrono::steady_clock::now();
  }
  ~ProfileScope() {
    if (profiler_)
      profiler_->add(kernel_, flops_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  }
  ProfileScope(const ProfileScope&) = delete;
  ProfileScope& operator=(const ProfileScope&) = delete;

 private:
  Profiler* profiler_;
  const char* kernel_;
  double flops_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace engine
