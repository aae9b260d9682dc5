#include "models/generate.h"

#include "engine/error.h"
#include "engine/ops.h"
#include "engine/rng.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace models {

using engine::check;
using engine::Tensor;

int32_t sample_token(const std::vector<float>& logits, const SamplingOptions& options, double uniform) {
  check(!logits.empty(), "sample_token: empty logits");
  if (options.greedy) return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  // Candidates sorted by logit, best first; top-k keeps the first k.
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  size_t keep = options.top_k > 0 ? std::min(size_t(options.top_k), order.size()) : order.size();
  std::partial_sort(order.begin(), order.begin() + long(keep), order.end(),
                    [&](int32_t a, int32_t b) { return logits[size_t(a)] > logits[size_t(b)]; });
  order.resize(keep);
  // Softmax of logits / temperature over the candidates.
  std::vector<double> probs(keep);
  const double best = logits[size_t(order[0])];
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += probs[i] = std::exp((logits[size_t(order[i])] - best) / options.temperature);
  for (double& p : probs) p /= total;
  // Nucleus: the smallest prefix whose mass reaches top_p (at least one token).
  if (options.top_p < 1.0) {
    double mass = 0;
    size_t n = 0;
    while (n < keep && (n == 0 || mass < options.top_p)) mass += probs[n++];
    order.resize(n);
    probs.resize(n);
    for (double& p : probs) p /= mass;
  }
  double cumulative = 0;
  for (size_t i = 0; i < probs.size(); ++i) {
    cumulative += probs[i];
    if (uniform < cumulative) return order[i];
  }
  return order.back();  // uniform within rounding of 1
}

std::vector<int32_t> generate(GPT2LMHeadModel& model, const std::vector<int32_t>& prompt,
                              const SamplingOptions& options, const std::function<void(int32_t)>& on_token) {
  check(!prompt.empty(), "generate: the prompt is empty");
  check(options.greedy || options.temperature > 0, "generate: temperature must be > 0 (or use greedy)");
  check(options.top_p > 0 && options.top_p <= 1, "generate: top_p must lie in (0, 1]");
  check(options.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0");
  const int64_t context = model.config().n_positions;
  check(int64_t(prompt.size()) + options.max_new_tokens <= context,
        "generate: {} prompt + {} new tokens exceed the context of {}", prompt.size(), options.max_new_tokens, context);

  engine::NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  engine::Generator gen(options.seed);
  KVCache cache;
  std::vector<int32_t> out;
  // Token ids stay on the host: the embedding checks them there and copies them to the model's device.
  Tensor input = Tensor::from_vector<int32_t>(prompt, {1, int64_t(prompt.size())});
  for (int64_t step = 0; step < options.max_new_tokens; ++step) {
    Tensor logits = model.forward(input, Tensor(), &cache);  // [1, T, V]
    std::vector<float> last = logits.select(1, -1).reshape({-1}).to(engine::DType::F32).to_vector<float>();
    double uniform = engine::philox_uniform(gen.seed(), gen.reserve(1), 0);
    int32_t token = sample_token(last, options, uniform);
    out.push_back(token);
    if (on_token) on_token(token);
    if (token == options.stop_token) break;
    input = Tensor::from_vector<int32_t>({token}, {1, 1});
  }
  model.train(was_training);
  return out;
}

}  // namespace models
