// Perplexity: the sliding window against a per-target loop written from the
// transformers docs' recipe, and gpt2-mini-wiki on the first 4096 WikiText-2
// tokens against transformers' figure (the whole file: test_perplexity_gpu.cpp).
#include "engine/nn/layers.h"
#include "engine/ops.h"
#include "engine/precision.h"
#include "models/perplexity.h"
#include "tests/perplexity_data.h"

#include <cmath>
#include <vector>

using engine::DType;
using engine::Tensor;
using models::GPT2Config;
using models::GPT2LMHeadModel;

namespace {

std::shared_ptr<GPT2LMHeadModel> tiny_model() {
  GPT2Config config = GPT2Config::builtin("gpt2");
  config.n_layer = 2, config.n_embd = 16, config.n_head = 2, config.vocab_size = 50, config.n_positions = 64;
  engine::Generator gen(5);
  auto model = std::make_shared<GPT2LMHeadModel>(
      config, engine::nn::VarBuilder(std::make_shared<engine::nn::RandomSource>(gen, DType::F64, engine::Device::cpu())));
  model->eval();
  return model;
}

// -log softmax(logits[t])[target] in double, from the logits of one window.
double token_nll(const std::vector<double>& logits, int64_t V, int64_t t, int32_t target) {
  double top = -INFINITY, total = 0;
  for (int64_t v = 0; v < V; ++v) top = std::max(top, logits[size_t(t * V + v)]);
  for (int64_t v = 0; v < V; ++v) total += std::exp(logits[size_t(t * V + v)] - top);
  return std::log(total) + top - logits[size_t(t * V + target)];
}

// The docs' loop: windows [begin, begin + max_length) every `stride` tokens;
// each window scores only the targets the previous windows did not reach.
std::pair<double, int64_t> recipe_nll(GPT2LMHeadModel& model, const std::vector<int32_t>& ids, int64_t max_length,
                                      int64_t stride) {
  const int64_t n = int64_t(ids.size()), V = model.config().vocab_size;
  double nll = 0;
  int64_t scored = 0, prev_end = 0;
  for (int64_t begin = 0; begin < n; begin += stride) {
    const int64_t end = std::min(begin + max_length, n);
    std::vector<int32_t> window(ids.begin() + begin, ids.begin() + end);
    const std::vector<double> logits =
        model.forward(Tensor::from_vector(window, {1, end - begin})).to_vector<double>();
    for (int64_t target = std::max<int64_t>(prev_end, begin + 1); target < end; ++target, ++scored)
      nll += token_nll(logits, V, target - begin - 1, ids[size_t(target)]);
    prev_end = end;
    if (end == n) break;
  }
  return {nll, scored};
}

}  // namespace

TEST_CASE("the sliding window scores every target once, as the transformers recipe", "[perplexity]") {
  auto model = tiny_model();
  engine::NoGradGuard no_grad;
  std::vector<int32_t> ids;
  for (int i = 0; i < 53; ++i) ids.push_back(int32_t((i * 37 + 11) % 50));
  // Overlapping windows, windows end to end, a stride that leaves a short
  // last window, and one window longer than the text.
  for (auto [max_length, stride] : std::vector<std::pair<int64_t, int64_t>>{{16, 8}, {16, 16}, {16, 5}, {64, 32}}) {
    INFO("max_length " << max_length << " stride " << stride);
    const models::PerplexityResult r = models::sliding_window_perplexity(*model, ids, max_length, stride);
    const auto [nll, scored] = recipe_nll(*model, ids, max_length, stride);
    CHECK(r.tokens == 53);
    // Overlapping windows score all 52 targets; windows end to end cannot score
    // their first tokens (16, 32, 48), which have no context inside the window.
    CHECK(r.scored == (stride < max_length ? 52 : 49));
    CHECK(r.scored == scored);
    CHECK(r.nll_sum == Approx(nll).epsilon(1e-6));  // ours takes the loss of f32 logits
  }
  // The paper's variant: one window over the first max_length tokens.
  const models::PerplexityResult single = models::single_window_perplexity(*model, ids, 20);
  const auto [nll, scored] = recipe_nll(*model, std::vector<int32_t>(ids.begin(), ids.begin() + 20), 20, 20);
  CHECK(single.scored == 19);
  CHECK(single.nll_sum == Approx(nll).epsilon(1e-6));
  CHECK_THROWS_AS(models::sliding_window_perplexity(*model, ids, 65, 8), engine::Error);  // past n_positions
  CHECK_THROWS_AS(models::sliding_window_perplexity(*model, ids, 16, 17), engine::Error);  // stride > window
}

TEST_CASE("gpt2-mini-wiki perplexity on the first 4096 WikiText-2 tokens matches transformers", "[perplexity][golden]") {
  const nlohmann::json golden = perplexity_golden()["prefix"];
  auto model = GPT2LMHeadModel::load(test_data_dir() + "/gpt2-mini-wiki");
  const std::vector<int32_t> ids = wikitext_ids(golden["tokens"].get<int64_t>());
  const models::PerplexityResult r = models::sliding_window_perplexity(*model, ids, 1024, 512);
  CHECK(r.scored == golden["scored"].get<int64_t>());
  CHECK(r.ppl() == Approx(golden["ppl"].get<double>()).epsilon(1e-4));
}

// Mixed precision on a real model: the 4096-token prefix with every Linear
// weight stored in bf16 and the matmuls and attention run under autocast (as
// `curlora perplexity --dtype bf16` runs them). Each bf16 operand is off by
// at most 2^-9 of itself; such errors move each log-probability by a few
// 1e-3 and mostly cancel over the 4096 targets, so the perplexity stays
// within 0.5% of transformers' f32 figure, yet visibly differs from ours in f32.
TEST_CASE("gpt2-mini-wiki perplexity under the bf16 policy stays within 0.5% of transformers' f32",
          "[perplexity][golden][precision]") {
  const nlohmann::json golden = perplexity_golden()["prefix"];
  auto model = GPT2LMHeadModel::load(test_data_dir() + "/gpt2-mini-wiki");
  model->freeze("*");
  // The weight and bias of four Conv1D per block.
  REQUIRE(engine::nn::store_frozen_linear_weights(*model, DType::BF16) == 8 * model->config().n_layer);
  const std::vector<int32_t> ids = wikitext_ids(golden["tokens"].get<int64_t>());
  const engine::AutocastGuard autocast(DType::BF16);
  const models::PerplexityResult r = models::sliding_window_perplexity(*model, ids, 1024, 512);
  const double want = golden["ppl"].get<double>();
  INFO("bf16 policy " << r.ppl() << ", transformers f32 " << want);
  CHECK(r.ppl() == Approx(want).epsilon(5e-3));
  CHECK(std::abs(r.ppl() / want - 1) > 1e-5);  // the rounding is real
}
