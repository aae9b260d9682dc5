// Helpers shared by the adapter tests: the small committed GPT-2
// (tests/goldens/gpt2/tiny-h5-fp32), a fixed padded batch, the LM loss as
// transformers computes it, and in-place fills outside autograd.
#pragma once

#include "engine/ops.h"
#include "models/gpt2.h"
#include "tests/test_data.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

namespace adapter_testing {

using engine::DType;
using engine::Tensor;

inline std::string tiny_model_dir() { return golden_dir() + "/gpt2/tiny-h5-fp32"; }

// Eval mode, so that dropout is off and forwards are deterministic.
inline std::shared_ptr<models::GPT2LMHeadModel> tiny_model(DType dtype = DType::F32) {
  auto model = models::GPT2LMHeadModel::load(tiny_model_dir(), dtype);
  model->eval();
  return model;
}

// Two rows of 6 tokens, the second right-padded after 4 (pad = the last id).
inline std::pair<Tensor, Tensor> tiny_batch(int64_t vocab) {
  std::vector<int32_t> ids, mask;
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 0; t < 6; ++t) {
      const bool real = b == 0 || t < 4;
      ids.push_back(real ? int32_t((53 * (b * 6 + t) + 7) % vocab) : int32_t(vocab - 1));
      mask.push_back(real);
    }
  return {Tensor::from_vector<int32_t>(ids, {2, 6}), Tensor::from_vector<int32_t>(mask, {2, 6})};
}

// transformers' LM loss: logits[:, t] predicts ids[:, t + 1]; padded targets are ignored.
inline Tensor lm_loss(const Tensor& logits, const Tensor& ids, const Tensor& mask) {
  const int64_t B = ids.size(0), T = ids.size(1);
  const std::vector<int32_t> id = ids.to_vector<int32_t>(), m = mask.to_vector<int32_t>();
  std::vector<int32_t> targets;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t + 1 < T; ++t) {
      const size_t next = size_t(b * T + t + 1);
      targets.push_back(m[next] ? id[next] : -100);
    }
  const Tensor shifted = logits.slice(1, 0, T - 1).reshape({B * (T - 1), -1});
  return engine::cross_entropy(shifted, Tensor::from_vector<int32_t>(targets, {B * (T - 1)}));
}

// Overwrites a parameter (e.g. U, which starts at zero) with normal(0, std) values.
inline void fill_normal(const Tensor& t, uint64_t seed, double std) {
  engine::NoGradGuard no_grad;
  engine::Generator gen(seed);
  Tensor(t).copy_(Tensor::randn(t.shape(), gen, 0.0, std, t.dtype(), t.device()));
}

inline double max_abs(const Tensor& t) {
  double worst = 0;
  for (double v : t.to_vector<double>()) worst = std::max(worst, std::abs(v));
  return worst;
}

inline double max_abs_difference(const Tensor& a, const Tensor& b) {
  const std::vector<double> x = a.to_vector<double>(), y = b.to_vector<double>();
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) worst = std::max(worst, std::abs(x[i] - y[i]));
  return worst;
}

}  // namespace adapter_testing
