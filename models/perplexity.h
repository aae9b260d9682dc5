// Perplexity of a causal LM over a token stream. The sliding window follows
// the transformers docs (window max_length, step stride, earlier tokens as
// context only) and scores each target at most once, as they do: every one
// when windows overlap (stride < max_length); the single window is
// the paper's reference code (one forward over the start of the text).
#pragma once

#include "models/gpt2.h"

#include <cstdint>
#include <functional>
#include <vector>

namespace models {

struct PerplexityResult {
  int64_t tokens = 0;  // in the stream
  int64_t scored = 0;  // targets whose loss was summed
  double nll_sum = 0;
  double ppl() const;
};

// `progress(done, total)` reports tokens covered so far (for a progress bar).
PerplexityResult sliding_window_perplexity(GPT2LMHeadModel& model, const std::vector<int32_t>& ids,
                                           int64_t max_length, int64_t stride,
                                           const std::function<void(int64_t, int64_t)>& progress = nullptr);

PerplexityResult single_window_perplexity(GPT2LMHeadModel& model, const std::vector<int32_t>& ids,
                                          int64_t max_length);

}  // namespace models
