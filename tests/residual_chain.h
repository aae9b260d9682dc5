// GPT-2's residual pattern, for the dropout_add_layer_norm tests on both
// devices: r = res + dropout(x), y = layer_norm(r) into bf16, and the stream
// going on into the next residual add, which hands the layer norm its
// gradient so far. Made by the fused op or by the two ops it replaces.
#pragma once

#include "engine/ops.h"
#include "engine/rng.h"

#include <tuple>
#include <vector>

namespace testing {

// The gradients of res (f32) and x (bf16) after a backward through the chain.
inline std::vector<engine::Tensor> residual_chain(bool fused, engine::Device device, int64_t rows, int64_t cols,
                                                  bool frozen_norm) {
  using engine::DType;
  using engine::Tensor;
  engine::Generator init(40), gen(41);
  auto uniform = [&](engine::Shape shape) { return Tensor::rand(shape, init, -1, 1).to(device); };
  Tensor res = uniform({rows, cols}), x = uniform({rows, cols}).to(DType::BF16);
  Tensor w = uniform({cols}), b = uniform({cols});
  const Tensor next = uniform({rows, cols});
  res.set_requires_grad(true), x.set_requires_grad(true), w.set_requires_grad(!frozen_norm);
  Tensor r, y;
  if (fused) {
    std::tie(r, y) = engine::dropout_add_layer_norm(res, x, 0.2, true, gen, w, b, 1e-5, DType::BF16);
  } else {
    r = engine::dropout_add(res, x, 0.2, true, gen);
    y = engine::layer_norm(r, w, b, 1e-5, DType::BF16);
  }
  const Tensor stream = engine::dropout_add(r, engine::mul(y, next.to(DType::BF16)), 0.2, true, gen);
  engine::sum(engine::mul(stream, next)).backward();
  return {res.grad(), x.grad()};
}

}  // namespace testing
