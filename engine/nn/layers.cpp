// Layer constructors: argument checks and torch's initialisation. The
// forwards are one op each and live in the header.
#include "engine/nn/layers.h"

#include <cmath>
#include <unordered_set>

namespace engine::nn {

// ---- Linear ----

Linear::Linear(int64_t in, int64_t out, Generator& gen, bool with_bias, WeightLayout layout_, DType dtype,
               Device device)
    : layout(layout_), in_features(in), out_features(out) {
  check(in >= 0 && out >= 0, "Linear: negative size (in {}, out {})", in, out);
  // kaiming_uniform(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
  const double bound = in > 0 ? 1.0 / std::sqrt(double(in)) : 0.0;
  Shape shape = layout == WeightLayout::OutIn ? Shape{out, in} : Shape{in, out};
  weight = register_parameter("weight", Tensor::rand(shape, gen, -bound, bound, dtype, device));
  if (with_bias) bias = register_parameter("bias", Tensor::rand({out}, gen, -bound, bound, dtype, device));
}

Linear::Linear(Tensor weight_, Tensor bias_, WeightLayout layout_) : layout(layout_) {
  check(weight_.defined() && weight_.dim() == 2, "Linear: weight must be 2-D, got shape {}",
        weight_.defined() ? std::string(shape_str(weight_.shape())) : "undefined");
  in_features = weight_.size(layout == WeightLayout::OutIn ? 1 : 0);
  out_features = weight_.size(layout == WeightLayout::OutIn ? 0 : 1);
  weight = register_parameter("weight", weight_);
  if (bias_.defined()) {
    check(bias_.dim() == 1 && bias_.size(0) == out_features, "Linear: bias shape {} for {} outputs (weight {})",
          shape_str(bias_.shape()), out_features, shape_str(weight_.shape()));
    check(bias_.dtype() == weight_.dtype() && bias_.device() == weight_.device(),
          "Linear: bias is {} on {}, weight is {} on {}", dtype_name(bias_.dtype()), bias_.device().str(),
          dtype_name(weight_.dtype()), weight_.device().str());
    bias = register_parameter("bias", bias_);
  }
}

// ---- Embedding ----

Embedding::Embedding(int64_t num_embeddings, int64_t dim, Generator& gen, double std, DType dtype, Device device) {
  check(num_embeddings >= 0 && dim >= 0, "Embedding: negative size ({} x {})", num_embeddings, dim);
  weight = register_parameter("weight", Tensor::randn({num_embeddings, dim}, gen, 0.0, std, dtype, device));
}

Embedding::Embedding(Tensor weight_) {
  check(weight_.defined() && weight_.dim() == 2, "Embedding: weight must be 2-D [num, dim], got shape {}",
        weight_.defined() ? std::string(shape_str(weight_.shape())) : "undefined");
  weight = register_parameter("weight", weight_);
}

// ---- LayerNorm ----

LayerNorm::LayerNorm(int64_t dim, double eps_, DType dtype, Device device) : eps(eps_) {
  check(dim > 0, "LayerNorm: dim must be positive, got {}", dim);
  weight = register_parameter("weight", Tensor::ones({dim}, dtype, device));
  bias = register_parameter("bias", Tensor::zeros({dim}, dtype, device));
}

LayerNorm::LayerNorm(Tensor weight_, Tensor bias_, double eps_) : eps(eps_) {
  check(weight_.defined() && bias_.defined() && weight_.dim() == 1 && bias_.shape() == weight_.shape(),
        "LayerNorm: weight and bias must be 1-D of one size, got {} and {}",
        weight_.defined() ? std::string(shape_str(weight_.shape())) : "undefined",
        bias_.defined() ? std::string(shape_str(bias_.shape())) : "undefined");
  weight = register_parameter("weight", weight_);
  bias = register_parameter("bias", bias_);
}

// ---- Dropout ----

Dropout::Dropout(double p_, Generator& gen) : p(p_), gen_(&gen) {
  check(p >= 0.0 && p < 1.0, "Dropout: p must be in [0, 1), got {}", p);
}

// ---- mixed precision ----

int64_t store_frozen_linear_weights(Module& root, DType dtype) {
  std::unordered_set<const TensorImpl*> frozen, embedded;
  for (const Module* module : root.self_and_descendants()) {
    if (auto* linear = dynamic_cast<const Linear*>(module))
      for (const Tensor* t : {&linear->weight, &linear->bias})
        if (t->defined() && !t->requires_grad()) frozen.insert(&t->impl());
    if (auto* table = dynamic_cast<const Embedding*>(module)) embedded.insert(&table->weight.impl());
  }
  int64_t converted = 0;
  root.to(dtype, [&](const std::string&, const Tensor& t) {
    const bool chosen = frozen.contains(&t.impl()) && !embedded.contains(&t.impl()) && t.dtype() != dtype;
    converted += chosen;
    return chosen;
  });
  return converted;
}

}  // namespace engine::nn
