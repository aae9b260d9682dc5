// Mixed precision as one switch, in the manner of torch.autocast. Inside an
// AutocastGuard(DType::BF16), matmul (so every Linear and adapter) and
// attention round their f32 inputs to bf16 and multiply on tensor cores with
// f32 accumulation. matmul's outputs and the gradients of f32 inputs stay
// f32, as does everything else: layer_norm, softmax, the loss, and the
// trainable parameters and AdamW state (the f32 master copies). linear_gelu
// and attention return bf16, as torch's do: in a transformer their outputs
// only feed the next GEMM, which would round them anyway, so the cast moves
// into the op that writes them. store_frozen_weights (engine/nn/module.h)
// adds the other half: frozen Linear weights kept in bf16, half the memory.
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
