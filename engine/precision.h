// Mixed precision as one switch, with torch.autocast(bfloat16)'s policy.
// Inside an AutocastGuard(DType::BF16), matmul (so every Linear and adapter),
// linear_gelu and attention round their f32 inputs to bf16, multiply on
// tensor cores with f32 accumulation, and return bf16; each input's gradient
// comes back in its own dtype. Layer norm, softmax and the loss widen bf16
// to f32 and return f32, and an elementwise op on bf16 and f32 operands
// returns f32, so the residual stream, the loss and the trainable parameters
// and AdamW state (the f32 master copies) stay f32.
// store_frozen_linear_weights (engine/nn/layers.h) adds the other half:
// frozen Linear weights kept in bf16, half the memory.
#pragma once

#include "engine/dtype.h"

#include <optional>

namespace engine {

// The dtype matmul and attention compute in on this thread, if autocast is on.
std::optional<DType> autocast_dtype();

// What autocast rounds a tensor of `dtype` to: the autocast dtype for f32 and
// bf16 while it is on; nothing when it is off, or for f64 (left alone).
inline std::optional<DType> autocast_dtype_for(DType dtype) {
  if (dtype != DType::F32 && dtype != DType::BF16) return std::nullopt;
  return autocast_dtype();
}

// Turns autocast on (bf16; f32 turns it off) for its scope on this thread.
// The backward of an op recorded inside runs at the precision its forward
// used, wherever backward() is called.
class AutocastGuard {
 public:
  explicit AutocastGuard(DType compute);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  std::optional<DType> previous_;
};

}  // namespace engine
