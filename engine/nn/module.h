// Module: a node in a tree of layers that owns named parameters (trainable
// tensors), buffers (state that is not trained) and child modules, in
// registration order. It is torch.nn.Module without hooks.
#pragma once

#include "engine/tensor.h"

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace engine::nn {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;
class Module;
using NamedModules = std::vector<std::pair<std::string, std::shared_ptr<Module>>>;

// True when `name` matches `pattern` as a whole. '*' matches any run of
// characters, dots included (so "*.bias" matches "h.3.attn.c_attn.bias"), and
// '?' matches one character: the rules of Python's fnmatch, minus brackets.
bool glob_match(const std::string& pattern, const std::string& name);

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  // Modules live behind shared_ptr and are shared, never copied: a copy would
  // silently alias or duplicate parameters.
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // The class name for messages, e.g. "Linear".
  virtual std::string type_name() const { return "Module"; }

  // The single-input forward that layers provide. Parents should call their
  // children through child("name") so that replace_module takes effect.
  virtual Tensor forward(const Tensor& input);
  Tensor operator()(const Tensor& input) { return forward(input); }
  // Columns of room after each row of its input that let forward() skip a
  // copy (engine::layer_norm's room, engine::concat_linear); 0 for most.
  virtual int64_t input_room() const { return 0; }

  // ---- the tree, by dotted name ("h.3.attn.c_attn.weight") ----
  // Parameters and buffers of this module and its descendants, in registration
  // order, depth first. A tensor reachable twice (tied weights) is listed once,
  // under its first name, as torch does.
  NamedTensors named_parameters() const;
  NamedTensors named_trainable_parameters() const;  // those with requires_grad
  NamedTensors named_buffers() const;
  std::vector<Tensor> parameters() const;
  // Every descendant (not this module itself), depth first.
  NamedModules named_modules() const;
  // This module, then named_modules()'s.
  std::vector<const Module*> self_and_descendants() const;

  // Lookups by dotted name; an unknown name is an engine::Error naming it.
  Tensor get_parameter(const std::string& name) const;
  Tensor get_buffer(const std::string& name) const;
  std::shared_ptr<Module> get_submodule(const std::string& name) const;
  Module& child(const std::string& name) const;  // a direct child, for forward()

  // Swaps the module at a dotted path for `replacement` and returns the old one
  // (to inject an adapter that wraps it). The path must already exist.
  std::shared_ptr<Module> replace_module(const std::string& name, std::shared_ptr<Module> replacement);

  // ---- modes ----
  Module& train(bool training = true);  // this module and every descendant
  Module& eval() { return train(false); }
  bool is_training() const { return training_; }

  // ---- which parameters train ----
  // freeze/unfreeze set requires_grad on the parameters whose dotted names
  // match a glob_match pattern, and return how many matched (0 is usually a typo).
  int64_t freeze(const std::string& pattern);
  int64_t unfreeze(const std::string& pattern);
  // requires_grad = keep(name, tensor) for every parameter.
  void set_trainable(const std::function<bool(const std::string&, const Tensor&)>& keep);
  void zero_grad();  // drops every parameter's gradient
  int64_t num_parameters() const;            // elements, tied weights counted once
  int64_t num_trainable_parameters() const;  // elements that require grad

  // ---- placement ----
  // Converts parameters and buffers in place: every Tensor handle to them (a
  // layer's member, a tied weight, an optimiser's list) sees the new data,
  // as with torch's `param.data = ...`. requires_grad is kept, a gradient is
  // converted along. to(DType) touches floating tensors only.
  Module& to(Device device);
  Module& to(DType dtype);
  // Only the tensors for which select(dotted name, tensor) is true.
  Module& to(DType dtype, const std::function<bool(const std::string&, const Tensor&)>& select);

 protected:
  // Called from constructors. Names are single segments (no dots), unique
  // within this module. register_parameter marks the tensor as requiring grad
  // (unless told otherwise) and returns it, for `weight = register_parameter(...)`.
  Tensor register_parameter(const std::string& name, Tensor tensor, bool requires_grad = true);
  Tensor register_buffer(const std::string& name, Tensor tensor);
  template <typename M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> module) {
    add_child(name, module);
    return module;
  }

 private:
  void check_new_name(const std::string& name) const;
  void add_child(const std::string& name, std::shared_ptr<Module> module);
  // Visits (dotted name, tensor) over the tree; each tensor once.
  void visit_tensors(bool buffers, const std::function<void(const std::string&, const Tensor&)>& fn) const;
  int64_t set_requires_grad_matching(const std::string& pattern, bool enabled);
  void convert_tensors(const std::function<Tensor(const std::string&, const Tensor&)>& convert);

  NamedTensors parameters_;
  NamedTensors buffers_;
  NamedModules children_;
  bool training_ = true;
};

// A list of children named "0", "1", ... (GPT-2's `h.3`). operator[] looks
// the child up by name, so a replaced entry is what callers get.
class ModuleList : public Module {
 public:
  std::string type_name() const override { return "ModuleList"; }
  void push_back(std::shared_ptr<Module> module) { register_module(std::to_string(size_++), std::move(module)); }
  Module& operator[](size_t index) const;
  size_t size() const { return size_; }

 private:
  size_t size_ = 0;
};

}  // namespace engine::nn
