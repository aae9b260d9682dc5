// The basic layers: Linear (both weight layouts), Embedding, LayerNorm and
// Dropout. Each owns its parameters as public Tensor members (registered with
// Module, so they are also reachable by name) and initialises them as torch does.
#pragma once

#include "engine/nn/module.h"
#include "engine/ops.h"
#include "engine/precision.h"
#include "engine/rng.h"

namespace engine::nn {

// y = x W^T + b with W [out, in] (torch.nn.Linear), or y = x W + b with
// W [in, out] (Hugging Face Conv1D, GPT-2's layout). Fresh weights follow
// torch's reset_parameters: kaiming_uniform(a=sqrt(5)), which is
// U(-1/sqrt(in), 1/sqrt(in)), and the bias U(-1/sqrt(in), 1/sqrt(in)); the
// weight is drawn first, then the bias.
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, Generator& gen, bool bias = true,
         WeightLayout layout = WeightLayout::OutIn, DType dtype = DType::F32, Device device = Device::cpu());
  // Wraps existing tensors (loaded weights); `bias` may be undefined.
  Linear(Tensor weight, Tensor bias, WeightLayout layout);

  std::string type_name() const override { return "Linear"; }
  Tensor forward(const Tensor& x) override { return linear(x, weight, bias, layout); }

  Tensor weight;
  Tensor bias;  // undefined without a bias
  WeightLayout layout;
  int64_t in_features, out_features;
};

// A lookup table [num_embeddings, dim]: ids of any shape (i32/i64) give
// [..., dim]. Fresh weights are normal(0, std): torch uses std 1, GPT-2 0.02.
class Embedding : public Module {
 public:
  Embedding(int64_t num_embeddings, int64_t dim, Generator& gen, double std = 1.0, DType dtype = DType::F32,
            Device device = Device::cpu());
  explicit Embedding(Tensor weight);

  std::string type_name() const override { return "Embedding"; }
  Tensor forward(const Tensor& ids) override { return embedding(weight, ids); }

  Tensor weight;
};

// Normalises over the last dim, then scales and shifts (weight ones, bias zeros).
class LayerNorm : public Module {
 public:
  explicit LayerNorm(int64_t dim, double eps = 1e-5, DType dtype = DType::F32, Device device = Device::cpu());
  LayerNorm(Tensor weight, Tensor bias, double eps = 1e-5);

  std::string type_name() const override { return "LayerNorm"; }
  Tensor forward(const Tensor& x) override { return layer_norm(x, weight, bias, eps); }
  // For a caller that feeds the output only to linear layers: under autocast
  // it comes in the autocast dtype, rounded in the kernel (a cast pass saved).
  // f64, which autocast leaves alone, stays f64. `room`: what the layer asks
  // for after each row (Module::input_room).
  Tensor forward_into_linear(const Tensor& x, int64_t room = 0) {
    return layer_norm(x, weight, bias, eps, autocast_dtype_for(x.dtype()), room);
  }

  Tensor weight, bias;
  double eps;
};

// Inverted dropout with probability p in [0, 1), active only in training mode.
// It draws its masks from a generator held by reference (the model's, so one
// seed fixes every mask): the generator must outlive the layer.
class Dropout : public Module {
 public:
  explicit Dropout(double p, Generator& gen = default_generator());

  std::string type_name() const override { return "Dropout"; }
  Tensor forward(const Tensor& x) override { return dropout(x, p, is_training(), *gen_); }
  // residual + forward(x), in one pass (engine::dropout_add): a residual connection.
  Tensor forward_added_to(const Tensor& residual, const Tensor& x) {
    return dropout_add(residual, x, p, is_training(), *gen_);
  }
  Generator& generator() const { return *gen_; }

  double p;

 private:
  Generator* gen_;
};

// The memory half of mixed precision (engine/precision.h): converts, in place,
// the weight and bias of every Linear under `root` that are frozen
// (requires_grad off) to `dtype`, halving their memory and the bandwidth of
// every GEMM that reads them. A bias is rounded as autocast rounds it when it
// is added (as torch's does), once instead of at every call. A weight that an
// Embedding shares stays (GPT-2's tied wte, whose lookups feed the f32
// residual stream). Returns how many tensors it converted.
int64_t store_frozen_linear_weights(Module& root, DType dtype);

}  // namespace engine::nn
