// Optimisers over a fixed list of named parameters: AdamW (torch.optim.AdamW,
// one fused kernel per parameter) and SGD with momentum, plus gradient-norm
// clipping. State can be exported and restored for checkpoints.
#pragma once

#include "engine/tensor.h"

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace engine::optim {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// Everything an optimiser needs to resume: tensors named "<param>.<slot>"
// (e.g. "h.0.attn.c_attn.weight.exp_avg") and scalars: the hyper-parameters
// ("lr", ...), "step" (calls to step()) and "<param>.step" (updates applied
// to that parameter). Tensors alias the live state: save them before stepping.
struct OptimizerState {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, double> scalars;
};

class Optimizer {
 public:
  // Parameters must be distinct floating leaf tensors; names key the state.
  // Parameters without a gradient at step() are skipped, as torch does.
  Optimizer(NamedTensors params, double lr);
  // Unnamed parameters are named "0", "1", ... in order, as in torch's state_dict.
  Optimizer(const std::vector<Tensor>& params, double lr);
  virtual ~Optimizer() = default;

  virtual void step() = 0;
  void zero_grad();  // drops every parameter's gradient

  double lr() const { return lr_; }
  void set_lr(double lr);
  int64_t step_count() const { return step_count_; }
  const NamedTensors& params() const { return params_; }

  OptimizerState state_dict() const;
  // Restores hyper-parameters, counts and per-parameter state. Tensors are
  // copied to each parameter's device and dtype. Unknown or missing keys and
  // wrong shapes are engine::Errors naming the key.
  void load_state_dict(const OptimizerState& state);

 protected:
  // Per-parameter state, created on a parameter's first update.
  struct ParamState {
    int64_t step = 0;  // updates applied to this parameter
    std::map<std::string, Tensor> slots;
  };

  // Hyper-parameters other than lr, by name, for state_dict.
  virtual std::map<std::string, double> hyperparameters() const = 0;
  virtual void set_hyperparameters(const std::map<std::string, double>& values) = 0;
  // The tensors every parameter with state has under these hyper-parameters
  // (AdamW: exp_avg, exp_avg_sq; SGD: momentum_buffer, with momentum only).
  virtual std::vector<std::string> slot_names(const std::map<std::string, double>& hyper) const = 0;

  // The parameter's gradient, ready for a kernel: same dtype and device as the
  // parameter, contiguous; undefined when it has none.
  Tensor gradient_of(size_t index, const char* op) const;

  NamedTensors params_;
  std::vector<ParamState> state_;
  double lr_;
  int64_t step_count_ = 0;
};

// torch.optim.AdamW (amsgrad off): for each parameter with a gradient g,
//   t += 1;  p -= lr * weight_decay * p;
//   m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2;
//   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps).
struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
};

class AdamW : public Optimizer {
 public:
  explicit AdamW(NamedTensors params, const AdamWOptions& options = {});
  explicit AdamW(const std::vector<Tensor>& params, const AdamWOptions& options = {});
  void step() override;
  const AdamWOptions& options() const { return options_; }  // options().lr is the initial lr

 protected:
  std::map<std::string, double> hyperparameters() const override;
  void set_hyperparameters(const std::map<std::string, double>& values) override;
  std::vector<std::string> slot_names(const std::map<std::string, double>&) const override {
    return {"exp_avg", "exp_avg_sq"};
  }

 private:
  static void check_options(const AdamWOptions& options);
  AdamWOptions options_;
};

// torch.optim.SGD: g += weight_decay p; with momentum, b = g on the first
// update and b = momentum b + (1 - dampening) g after, then g = b (or
// g + momentum b with nesterov); p -= lr g.
struct SGDOptions {
  double lr = 1e-3;
  double momentum = 0, dampening = 0, weight_decay = 0;
  bool nesterov = false;
};

class SGD : public Optimizer {
 public:
  explicit SGD(NamedTensors params, const SGDOptions& options = {});
  explicit SGD(const std::vector<Tensor>& params, const SGDOptions& options = {});
  void step() override;

 protected:
  std::map<std::string, double> hyperparameters() const override;
  void set_hyperparameters(const std::map<std::string, double>& values) override;
  std::vector<std::string> slot_names(const std::map<std::string, double>& hyper) const override;

 private:
  static void check_options(const SGDOptions& options);
  SGDOptions options_;
};

// torch.nn.utils.clip_grad_norm_ (L2): total = ||all gradients||, and when
// max_norm / (total + 1e-6) < 1 every gradient is replaced by a scaled copy
// (never scaled in place: a gradient may alias another tensor). Returns the
// total norm. A non-finite total is returned as is, and the gradients are
// scaled by the resulting NaN or 0 as torch does; callers should check it and
// skip the step.
double clip_grad_norm(const std::vector<Tensor>& params, double max_norm);
double clip_grad_norm(const NamedTensors& params, double max_norm);

}  // namespace engine::optim
