#include "engine/precision.h"

#include "engine/error.h"

namespace engine {

namespace {
thread_local std::optional<DType> autocast;
}

std::optional<DType> autocast_dtype() { return autocast; }

AutocastGuard::AutocastGuard(DType compute) : previous_(autocast) {
  check(compute == DType::BF16 || compute == DType::F32, "autocast: computes in bf16 (or f32 for off), not {}",
        dtype_name(compute));
  autocast = compute == DType::F32 ? std::nullopt : std::optional<DType>(compute);
}

AutocastGuard::~AutocastGuard() { autocast = previous_; }

}  // namespace engine
