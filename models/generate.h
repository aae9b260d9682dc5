// Text generation with a KV cache: the prompt is run once, then each new
// token attends to the cached keys and values. Greedy, or sampling with
// temperature, top-k and top-p from a seeded Philox stream.
#pragma once

#include "models/gpt2.h"

#include <cstdint>
#include <functional>
#include <vector>

namespace models {

struct SamplingOptions {
  int64_t max_new_tokens = 50;
  bool greedy = false;       // argmax at every step (temperature etc. ignored)
  double temperature = 1.0;  // > 0
  int64_t top_k = 0;         // 0 = no top-k filter
  double top_p = 1.0;        // in (0, 1]; 1 = no nucleus filter
  uint64_t seed = 0;
  int64_t stop_token = -1;   // e.g. <|endoftext|>; -1 = never stop early
};

// Returns the new tokens only (the stop token included when it was drawn).
// `on_token` sees each token as it is chosen (for streaming output).
std::vector<int32_t> generate(GPT2LMHeadModel& model, const std::vector<int32_t>& prompt,
                              const SamplingOptions& options,
                              const std::function<void(int32_t)>& on_token = nullptr);

// One sampling decision over a row of logits (exposed for tests).
int32_t sample_token(const std::vector<float>& logits, const SamplingOptions& options, double uniform);

}  // namespace models
