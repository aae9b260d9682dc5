#include "models/perplexity.h"

#include "engine/error.h"
#include "engine/ops.h"

#include <algorithm>
#include <cmath>

namespace models {

using engine::check;
using engine::Tensor;

double PerplexityResult::ppl() const { return scored > 0 ? std::exp(nll_sum / double(scored)) : NAN; }

namespace {

// Sum of -log p(ids[p] | ids[begin..p)) for targets p in [first_target, end), first_target > begin.
// Only the positions that predict a target go through lm_head: with stride
// max_length / 2 that is half the window, and lm_head is most of a small model.
double window_nll(GPT2LMHeadModel& model, const std::vector<int32_t>& ids, int64_t begin, int64_t end,
                  int64_t first_target) {
  // ids and targets stay on the host: ops check them there and copy them to the model's device.
  std::vector<int32_t> window(ids.begin() + begin, ids.begin() + end);
  std::vector<int32_t> targets(ids.begin() + first_target, ids.begin() + end);
  const int64_t T = end - begin, n = end - first_target;
  Tensor hidden = model.hidden_states(Tensor::from_vector<int32_t>(window, {1, T}));
  // Position t predicts token t + 1, so targets [first_target, end) come from positions [first_target - 1, end - 1).
  Tensor logits = model.child("lm_head")(hidden.slice(1, first_target - begin - 1, T - 1));
  Tensor nll = engine::cross_entropy(logits.reshape({n, -1}).to(engine::DType::F32),
                                     Tensor::from_vector<int32_t>(targets, {n}), -100,
                                     engine::Reduction::Sum);
  return nll.item();
}

}  // namespace

PerplexityResult sliding_window_perplexity(GPT2LMHeadModel& model, const std::vector<int32_t>& ids,
                                           int64_t max_length, int64_t stride,
                                           const std::function<void(int64_t, int64_t)>& progress) {
  check(max_length > 0 && max_length <= model.config().n_positions,
        "perplexity: max_length {} must lie in [1, {}]", max_length, model.config().n_positions);
  check(stride > 0 && stride <= max_length, "perplexity: stride {} must lie in [1, max_length]", stride);
  engine::NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  PerplexityResult result;
  result.tokens = int64_t(ids.size());
  int64_t scored_until = 0;  // targets before this position are done
  for (int64_t begin = 0; begin < result.tokens; begin += stride) {
    const int64_t end = std::min(begin + max_length, result.tokens);
    // A window's first token has no context inside it, so it is never a target
    // (with stride == max_length transformers skips it too).
    const int64_t first_target = std::max(scored_until, begin + 1);
    if (end > first_target) {
      result.nll_sum += window_nll(model, ids, begin, end, first_target);
      result.scored += end - first_target;
    }
    scored_until = end;
    if (progress) progress(end, result.tokens);
    if (end == result.tokens) break;
  }
  model.train(was_training);
  return result;
}

PerplexityResult single_window_perplexity(GPT2LMHeadModel& model, const std::vector<int32_t>& ids,
                                          int64_t max_length) {
  check(max_length > 1 && max_length <= model.config().n_positions, "perplexity: max_length {} must lie in [2, {}]",
        max_length, model.config().n_positions);
  engine::NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  PerplexityResult result;
  result.tokens = int64_t(ids.size());
  const int64_t end = std::min<int64_t>(max_length, result.tokens);
  if (end > 1) {
    result.nll_sum = window_nll(model, ids, 0, end, 1);
    result.scored = end - 1;
  }
  model.train(was_training);
  return result;
}

}  // namespace models
