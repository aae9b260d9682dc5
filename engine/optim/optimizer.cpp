// Optimisers: the shared bookkeeping (parameters, per-parameter state, export
// and restore), AdamW through the backend's fused kernel, SGD through ops, and
// gradient-norm clipping.
#include "engine/optim/optimizer.h"

#include "engine/autograd.h"
#include "engine/backend.h"
#include "engine/ops.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <unordered_set>

namespace engine::optim {

namespace {

NamedTensors name_by_index(const std::vector<Tensor>& params) {
  NamedTensors named;
  for (size_t i = 0; i < params.size(); ++i) named.emplace_back(std::to_string(i), params[i]);
  return named;
}

double require_scalar(const std::map<std::string, double>& scalars, const std::string& key) {
  auto it = scalars.find(key);
  check(it != scalars.end(), "load_state_dict: missing scalar '{}'", key);
  return it->second;
}

// A whole number that a double holds exactly and int64 can take.
bool is_count(double x) { return x >= 0 && x <= 9007199254740992.0 && x == std::floor(x); }

}  // namespace

// ---- Optimizer ----

Optimizer::Optimizer(NamedTensors params, double lr) : params_(std::move(params)), state_(params_.size()) {
  set_lr(lr);
  std::set<std::string> names;
  std::unordered_set<const TensorImpl*> seen;
  for (const auto& [name, p] : params_) {
    check(p.defined(), "optimizer: parameter '{}' is undefined", name);
    check(p.is_leaf() && is_floating(p.dtype()), "optimizer: parameter '{}' must be a floating leaf tensor ({}, {})",
          name, dtype_name(p.dtype()), p.is_leaf() ? "leaf" : "made by " + p.impl().grad_fn->op);
    check(names.insert(name).second, "optimizer: parameter name '{}' appears twice", name);
    // A tensor listed twice would be updated twice per step.
    check(seen.insert(&p.impl()).second, "optimizer: parameter '{}' is the same tensor as an earlier one", name);
  }
}

Optimizer::Optimizer(const std::vector<Tensor>& params, double lr) : Optimizer(name_by_index(params), lr) {}

void Optimizer::set_lr(double lr) {
  check(std::isfinite(lr) && lr >= 0, "optimizer: learning rate must be finite and >= 0, got {}", lr);
  lr_ = lr;
}

void Optimizer::zero_grad() {
  for (const auto& [name, p] : params_) p.zero_grad();
}

Tensor Optimizer::gradient_of(size_t index, const char* op) const {
  const auto& [name, p] = params_[index];
  Tensor g = p.grad();
  if (!g.defined()) return g;
  check(g.shape() == p.shape(), "{}: gradient of '{}' has shape {}, parameter {}", op, name, shape_str(g.shape()),
        shape_str(p.shape()));
  if (g.device() != p.device())
    fail("{}: gradient of '{}' is on {}, parameter on {}", op, name, g.device().str(), p.device().str());
  check(g.dtype() == p.dtype(), "{}: gradient of '{}' is {}, parameter {}", op, name, dtype_name(g.dtype()),
        dtype_name(p.dtype()));
  return g.contiguous();  // gradients may be broadcast or transposed views
}

OptimizerState Optimizer::state_dict() const {
  OptimizerState out;
  out.scalars = hyperparameters();
  out.scalars["lr"] = lr_;
  out.scalars["step"] = double(step_count_);
  for (size_t i = 0; i < params_.size(); ++i) {
    if (state_[i].step == 0) continue;
    const std::string& name = params_[i].first;
    out.scalars[name + ".step"] = double(state_[i].step);
    for (const auto& [slot, t] : state_[i].slots) out.tensors[name + "." + slot] = t;
  }
  return out;
}

void Optimizer::load_state_dict(const OptimizerState& state) {
  // Validate everything before changing anything, so a bad file leaves the
  // optimiser as it was.
  std::map<std::string, double> hyper = hyperparameters();
  for (auto& [key, value] : hyper) value = require_scalar(state.scalars, key);
  const double lr = require_scalar(state.scalars, "lr");
  const double steps = require_scalar(state.scalars, "step");
  check(is_count(steps), "load_state_dict: 'step' must be a count, got {}", steps);
  check(std::isfinite(lr) && lr >= 0, "load_state_dict: 'lr' must be finite and >= 0, got {}", lr);
  const std::vector<std::string> slots = slot_names(hyper);

  std::set<std::string> used_scalars = {"lr", "step"};
  for (const auto& [key, value] : hyper) used_scalars.insert(key);
  std::set<std::string> used_tensors;
  std::vector<ParamState> restored(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& [name, p] = params_[i];
    auto step_it = state.scalars.find(name + ".step");
    if (step_it == state.scalars.end()) continue;  // never updated
    used_scalars.insert(step_it->first);
    const double count = step_it->second;
    check(is_count(count) && count >= 1, "load_state_dict: '{}' must be a positive count, got {}",
          step_it->first, count);
    restored[i].step = int64_t(count);
    for (const std::string& slot : slots) {
      const std::string key = name + "." + slot;
      auto it = state.tensors.find(key);
      check(it != state.tensors.end(), "load_state_dict: missing tensor '{}'", key);
      check(it->second.defined() && it->second.shape() == p.shape(), "load_state_dict: '{}' has shape {}, expected {}",
            key, it->second.defined() ? std::string(shape_str(it->second.shape())) : "undefined", shape_str(p.shape()));
      NoGradGuard no_grad;
      restored[i].slots[slot] = it->second.detach().to(p.device()).to(p.dtype()).clone();
      used_tensors.insert(key);
    }
  }
  for (const auto& [key, value] : state.scalars)
    check(used_scalars.count(key) != 0, "load_state_dict: unknown scalar '{}'", key);
  for (const auto& [key, value] : state.tensors)
    check(used_tensors.count(key) != 0, "load_state_dict: unknown tensor '{}'", key);

  set_hyperparameters(hyper);  // checks the values before it assigns them
  lr_ = lr;
  step_count_ = int64_t(steps);
  state_ = std::move(restored);
}

// ---- AdamW ----

AdamW::AdamW(NamedTensors params, const AdamWOptions& options)
    : Optimizer(std::move(params), options.lr), options_(options) {
  check_options(options_);
}

AdamW::AdamW(const std::vector<Tensor>& params, const AdamWOptions& options)
    : Optimizer(params, options.lr), options_(options) {
  check_options(options_);
}

void AdamW::check_options(const AdamWOptions& o) {
  check(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1, "AdamW: betas must be in [0, 1), got ({}, {})",
        o.beta1, o.beta2);
  check(o.eps >= 0 && o.weight_decay >= 0, "AdamW: eps and weight_decay must be >= 0, got {} and {}", o.eps,
        o.weight_decay);
}

void AdamW::step() {
  // Parameters that share a device, a dtype and a step count are updated by
  // one backend call (one kernel launch on CUDA for dozens of them).
  struct Group {
    Device device;
    DType dtype;
    int64_t step;
    std::vector<AdamWTensors> tensors;
    std::vector<Tensor> gradients;  // keeps contiguous copies alive until the update
  };
  std::vector<Group> groups;
  for (size_t i = 0; i < params_.size(); ++i) {
    Tensor g = gradient_of(i, "AdamW");
    if (!g.defined()) continue;
    const Tensor& p = params_[i].second;
    check(p.is_contiguous(), "AdamW: parameter '{}' is not contiguous", params_[i].first);
    ParamState& s = state_[i];
    if (s.step == 0) {
      s.slots["exp_avg"] = Tensor::zeros(p.shape(), p.dtype(), p.device());
      s.slots["exp_avg_sq"] = Tensor::zeros(p.shape(), p.dtype(), p.device());
    }
    ++s.step;
    if (p.numel() == 0) continue;
    auto group = std::find_if(groups.begin(), groups.end(), [&](const Group& candidate) {
      return candidate.device == p.device() && candidate.dtype == p.dtype() && candidate.step == s.step;
    });
    if (group == groups.end()) group = groups.insert(groups.end(), Group{p.device(), p.dtype(), s.step, {}, {}});
    group->tensors.push_back({view_of(p), view_of(g), view_of(s.slots["exp_avg"]), view_of(s.slots["exp_avg_sq"])});
    group->gradients.push_back(g);
  }
  for (const Group& group : groups) {
    AdamWArgs args;
    args.lr = lr_;
    args.beta1 = options_.beta1;
    args.beta2 = options_.beta2;
    args.eps = options_.eps;
    args.weight_decay = options_.weight_decay;
    args.step = group.step;
    backend_for(group.device).adamw_step(group.tensors, args);
  }
  ++step_count_;
}

std::map<std::string, double> AdamW::hyperparameters() const {
  return {{"beta1", options_.beta1}, {"beta2", options_.beta2}, {"eps", options_.eps},
          {"weight_decay", options_.weight_decay}};
}

void AdamW::set_hyperparameters(const std::map<std::string, double>& values) {
  AdamWOptions o = options_;
  o.beta1 = values.at("beta1");
  o.beta2 = values.at("beta2");
  o.eps = values.at("eps");
  o.weight_decay = values.at("weight_decay");
  check_options(o);  // before assigning: a rejected state changes nothing
  options_ = o;
}

// ---- SGD ----

SGD::SGD(NamedTensors params, const SGDOptions& options) : Optimizer(std::move(params), options.lr), options_(options) {
  check_options(options_);
}

SGD::SGD(const std::vector<Tensor>& params, const SGDOptions& options) : Optimizer(params, options.lr), options_(options) {
  check_options(options_);
}

void SGD::check_options(const SGDOptions& o) {
  check(o.momentum >= 0 && o.dampening >= 0 && o.weight_decay >= 0,
        "SGD: momentum, dampening and weight_decay must be >= 0, got {}, {}, {}", o.momentum, o.dampening,
        o.weight_decay);
  check(!o.nesterov || (o.momentum > 0 && o.dampening == 0), "SGD: nesterov needs momentum > 0 and dampening 0");
}

std::vector<std::string> SGD::slot_names(const std::map<std::string, double>& hyper) const {
  if (hyper.at("momentum") == 0) return {};
  return {"momentum_buffer"};
}

void SGD::step() {
  // Not a hot path: plain ops on whole tensors, each result a fresh tensor.
  NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    Tensor g = gradient_of(i, "SGD");
    if (!g.defined()) continue;
    Tensor p = params_[i].second;
    ParamState& s = state_[i];
    if (options_.weight_decay != 0) g = add(g, mul(p, options_.weight_decay));
    if (options_.momentum != 0) {
      Tensor& buffer = s.slots["momentum_buffer"];
      buffer = !buffer.defined() ? g.clone() : add(mul(buffer, options_.momentum), mul(g, 1 - options_.dampening));
      g = options_.nesterov ? add(g, mul(buffer, options_.momentum)) : buffer;
    }
    ++s.step;
    p.copy_(add(p, mul(g, -lr_)));
  }
  ++step_count_;
}

std::map<std::string, double> SGD::hyperparameters() const {
  return {{"momentum", options_.momentum}, {"dampening", options_.dampening},
          {"weight_decay", options_.weight_decay}, {"nesterov", options_.nesterov ? 1.0 : 0.0}};
}

void SGD::set_hyperparameters(const std::map<std::string, double>& values) {
  SGDOptions o = options_;
  o.momentum = values.at("momentum");
  o.dampening = values.at("dampening");
  o.weight_decay = values.at("weight_decay");
  o.nesterov = values.at("nesterov") != 0;
  check_options(o);
  options_ = o;
}

// ---- clipping ----

double clip_grad_norm(const std::vector<Tensor>& params, double max_norm) {
  check(max_norm >= 0, "clip_grad_norm: max_norm must be >= 0, got {}", max_norm);
  NoGradGuard no_grad;
  // Squared norms accumulate in double across parameters (the per-tensor sum
  // accumulates in double too, in the backend's reduction).
  double sum_squares = 0;
  for (const Tensor& p : params) {
    Tensor g = p.grad();
    if (g.defined()) sum_squares += sum(square(g)).item();
  }
  const double total = std::sqrt(sum_squares);
  double scale = max_norm / (total + 1e-6);
  if (scale > 1.0) scale = 1.0;  // like torch.clamp(max=1): a NaN stays NaN
  if (scale != 1.0) {
    for (const Tensor& p : params) {
      Tensor g = p.grad();
      if (g.defined()) p.set_grad(mul(g, scale));
    }
  }
  return total;
}

double clip_grad_norm(const NamedTensors& params, double max_norm) {
  std::vector<Tensor> tensors;
  for (const auto& [name, p] : params) tensors.push_back(p);
  return clip_grad_norm(tensors, max_norm);
}

}  // namespace engine::optim
