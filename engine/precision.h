// Mixed precision as one switch, in the manner of torch.autocast. Inside an
// AutocastGuard(DType::BF16), matmul (so every Linear and adapter) and
// attention round their f32 inputs to bf16 and multiply on tensor cores with
// f32 accumulation. Their outputs and gradients stay f32, as does everything
// else: layer_norm, softmax, the loss, and the trainable parameters and AdamW
// state (the f32 master copies). One exception: linear_gelu returns bf16,
// since an MLP's GELU output only feeds the next GEMM. store_frozen_weights
// (engine/nn/module.h) adds the other half: frozen Linear weights kept in
// bf16, half the memory.
#pragma once

#include "engine/dtype.h"

#include <optional>

namespace engine {

// The dtype matmul and attention compute in on this thread, if autocast is on.
std::optional<DType> autocast_dtype();

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
