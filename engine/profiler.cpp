#include "engine/profiler.h"

namespace engine {

namespace {
thread_local Profiler* active_profiler = nullptr;
}

Profiler::Profiler() : previous_(active_profiler) { active_profiler = this; }
Profiler::~Profiler() { active_profiler = previous_; }
Profiler* Profiler::active() { return active_profiler; }

int64_t Profiler::calls(const std::string& kernel) const {
  auto it = entries_.find(kernel);
  return it == entries_.end() ? 0 : it->second.calls;
}

void Profiler::add(const char* kernel, double flops, double seconds) {
  Entry& e = entries_[kernel];
  e.calls += 1;
  e.flops += flops;
  e.seconds += seconds;
}

}  // namespace engine
