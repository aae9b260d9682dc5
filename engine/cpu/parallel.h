// Helpers the CPU kernels share: a parallel-for over independent rows that
// stays serial for small work (thread start-up costs more than it saves), and
// dtype dispatch from a runtime DType to a C++ type.
#pragma once

#include "engine/dtype.h"
#include "engine/error.h"

#include <cstdint>

namespace engine::cpu {

// Work below this many elements runs on one thread.
inline constexpr int64_t kParallelGrain = 1 << 15;

// Calls body(i) for i in [0, count); in parallel when count * cost_per_item is large.
template <typename Body>
void parallel_for(int64_t count, int64_t cost_per_item, Body&& body) {
#pragma omp parallel for schedule(static) if (count > 1 && count * cost_per_item >= kParallelGrain)
  for (int64_t i = 0; i < count; ++i) body(i);
}

// Calls fn(T{}) with T = float or double matching dtype; other dtypes are an error naming `op`.
template <typename Fn>
void dispatch_floating(DType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case DType::F32: fn(float{}); return;
    case DType::F64: fn(double{}); return;
    default: fail("{}: the CPU computes in f32 or f64, got {}", op, dtype_name(dtype));
  }
}

// Reads an index tensor's i-th element (i32 or i64, contiguous) as int64.
inline int64_t read_index(const void* data, DType dtype, int64_t i) {
  return dtype == DType::I32 ? int64_t(static_cast<const int32_t*>(data)[i]) : static_cast<const int64_t*>(data)[i];
}

}  // namespace engine::cpu
