// Module: registration, the recursive walks that produce dotted names, and
// the in-place conversions. Walks are depth first in registration order and
// remember what they have seen, so shared children and tied weights appear once.
#include "engine/nn/module.h"

#include "engine/autograd.h"

#include <unordered_set>

namespace engine::nn {

bool glob_match(const std::string& pattern, const std::string& name) {
  // Greedy matching with one backtrack point: on a mismatch, let the last '*'
  // swallow one more character. Linear in practice, no recursion.
  size_t p = 0, n = 0, star = std::string::npos, star_n = 0;
  while (n < name.size()) {
    if (p < pattern.size() && (pattern[p] == '?' || pattern[p] == name[n])) {
      ++p, ++n;
    } else if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      star_n = n;
    } else if (star != std::string::npos) {
      p = star + 1;
      n = ++star_n;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

Tensor Module::forward(const Tensor&) { fail("{}: this module has no single-input forward()", type_name()); }

// ---- registration ----

void Module::check_new_name(const std::string& name) const {
  check(!name.empty() && name.find('.') == std::string::npos,
        "{}: member name '{}' must be non-empty and contain no '.'", type_name(), name);
  auto taken = [&](const auto& list) {
    for (const auto& entry : list)
      if (entry.first == name) return true;
    return false;
  };
  check(!taken(parameters_) && !taken(buffers_) && !taken(children_), "{}: name '{}' is registered twice", type_name(),
        name);
}

Tensor Module::register_parameter(const std::string& name, Tensor tensor, bool requires_grad) {
  check_new_name(name);
  check(tensor.defined(), "{}: parameter '{}' is undefined", type_name(), name);
  check(tensor.is_leaf(), "{}: parameter '{}' was made by '{}'; register a leaf (detach() it)", type_name(), name,
        tensor.is_leaf() ? "" : tensor.impl().grad_fn->op);
  tensor.set_requires_grad(requires_grad);
  parameters_.emplace_back(name, tensor);
  return tensor;
}

Tensor Module::register_buffer(const std::string& name, Tensor tensor) {
  check_new_name(name);
  check(tensor.defined(), "{}: buffer '{}' is undefined", type_name(), name);
  buffers_.emplace_back(name, tensor);
  return tensor;
}

void Module::add_child(const std::string& name, std::shared_ptr<Module> module) {
  check_new_name(name);
  check(module != nullptr, "{}: child module '{}' is null", type_name(), name);
  children_.emplace_back(name, std::move(module));
}

// ---- walks ----

void Module::visit_tensors(bool buffers, const std::function<void(const std::string&, const Tensor&)>& fn) const {
  std::unordered_set<const Module*> seen_modules;
  std::unordered_set<const TensorImpl*> seen_tensors;
  std::function<void(const Module&, const std::string&)> walk = [&](const Module& m, const std::string& prefix) {
    if (!seen_modules.insert(&m).second) return;
    for (const auto& [name, t] : buffers ? m.buffers_ : m.parameters_)
      if (seen_tensors.insert(&t.impl()).second) fn(prefix + name, t);
    for (const auto& [name, c] : m.children_) walk(*c, prefix + name + ".");
  };
  walk(*this, "");
}

NamedTensors Module::named_parameters() const {
  NamedTensors out;
  visit_tensors(false, [&](const std::string& name, const Tensor& t) { out.emplace_back(name, t); });
  return out;
}

NamedTensors Module::named_trainable_parameters() const {
  NamedTensors out;
  visit_tensors(false, [&](const std::string& name, const Tensor& t) {
    if (t.requires_grad()) out.emplace_back(name, t);
  });
  return out;
}

NamedTensors Module::named_buffers() const {
  NamedTensors out;
  visit_tensors(true, [&](const std::string& name, const Tensor& t) { out.emplace_back(name, t); });
  return out;
}

std::vector<Tensor> Module::parameters() const {
  std::vector<Tensor> out;
  visit_tensors(false, [&](const std::string&, const Tensor& t) { out.push_back(t); });
  return out;
}

NamedModules Module::named_modules() const {
  NamedModules out;
  std::unordered_set<const Module*> seen{this};
  std::function<void(const Module&, const std::string&)> walk = [&](const Module& m, const std::string& prefix) {
    for (const auto& [name, c] : m.children_) {
      if (!seen.insert(c.get()).second) continue;
      out.emplace_back(prefix + name, c);
      walk(*c, prefix + name + ".");
    }
  };
  walk(*this, "");
  return out;
}

std::vector<const Module*> Module::self_and_descendants() const {
  std::vector<const Module*> all{this};
  for (const auto& [name, module] : named_modules()) all.push_back(module.get());
  return all;
}

// ---- lookups by dotted name ----

namespace {

// "a.b.c" -> {"a.b", "c"}; "c" -> {"", "c"}.
std::pair<std::string, std::string> split_last(const std::string& name) {
  size_t dot = name.rfind('.');
  if (dot == std::string::npos) return {"", name};
  return {name.substr(0, dot), name.substr(dot + 1)};
}

template <typename List>
auto find_entry(List& list, const std::string& name) {
  for (auto it = list.begin(); it != list.end(); ++it)
    if (it->first == name) return it;
  return list.end();
}

}  // namespace

Module& Module::child(const std::string& name) const {
  auto it = find_entry(children_, name);
  check(it != children_.end(), "{}: no child module '{}'", type_name(), name);
  return *it->second;
}

std::shared_ptr<Module> Module::get_submodule(const std::string& name) const {
  check(!name.empty(), "get_submodule: empty name");
  const Module* current = this;
  std::shared_ptr<Module> found;
  size_t begin = 0;
  while (begin <= name.size()) {
    size_t end = std::min(name.find('.', begin), name.size());
    const std::string part = name.substr(begin, end - begin);
    auto it = find_entry(current->children_, part);
    check(it != current->children_.end(), "get_submodule: no module '{}' (no child '{}' in '{}')", name, part,
          name.substr(0, begin == 0 ? 0 : begin - 1));
    found = it->second;
    current = found.get();
    begin = end + 1;
  }
  return found;
}

Tensor Module::get_parameter(const std::string& name) const {
  auto [path, leaf] = split_last(name);
  const Module& owner = path.empty() ? *this : *get_submodule(path);
  auto it = find_entry(owner.parameters_, leaf);
  check(it != owner.parameters_.end(), "get_parameter: no parameter '{}'", name);
  return it->second;
}

Tensor Module::get_buffer(const std::string& name) const {
  auto [path, leaf] = split_last(name);
  const Module& owner = path.empty() ? *this : *get_submodule(path);
  auto it = find_entry(owner.buffers_, leaf);
  check(it != owner.buffers_.end(), "get_buffer: no buffer '{}'", name);
  return it->second;
}

std::shared_ptr<Module> Module::replace_module(const std::string& name, std::shared_ptr<Module> replacement) {
  check(replacement != nullptr, "replace_module: null replacement for '{}'", name);
  auto [path, leaf] = split_last(name);
  Module& parent = path.empty() ? *this : *get_submodule(path);
  auto it = find_entry(parent.children_, leaf);
  check(it != parent.children_.end(), "replace_module: no module '{}'", name);
  return std::exchange(it->second, std::move(replacement));
}

// ---- modes and trainability ----

Module& Module::train(bool training) {
  training_ = training;
  for (auto& [name, c] : children_) c->train(training);
  return *this;
}

int64_t Module::set_requires_grad_matching(const std::string& pattern, bool enabled) {
  int64_t matched = 0;
  for (auto& [name, t] : named_parameters()) {
    if (!glob_match(pattern, name)) continue;
    Tensor(t).set_requires_grad(enabled);
    ++matched;
  }
  return matched;
}

int64_t Module::freeze(const std::string& pattern) { return set_requires_grad_matching(pattern, false); }
int64_t Module::unfreeze(const std::string& pattern) { return set_requires_grad_matching(pattern, true); }

void Module::set_trainable(const std::function<bool(const std::string&, const Tensor&)>& keep) {
  for (auto& [name, t] : named_parameters()) Tensor(t).set_requires_grad(keep(name, t));
}

void Module::zero_grad() {
  for (const Tensor& t : parameters()) t.zero_grad();
}

int64_t Module::num_parameters() const {
  int64_t total = 0;
  for (const Tensor& t : parameters()) total += t.numel();
  return total;
}

int64_t Module::num_trainable_parameters() const {
  int64_t total = 0;
  for (const Tensor& t : parameters())
    if (t.requires_grad()) total += t.numel();
  return total;
}

// ---- placement ----

void Module::convert_tensors(const std::function<Tensor(const std::string&, const Tensor&)>& convert) {
  NoGradGuard no_grad;  // conversions of parameters must not record a graph
  auto swap_data = [&](const std::string& name, const Tensor& t) {
    Tensor converted = convert(name, t);
    if (converted.same(t)) return;
    t.set_data(converted);  // every alias follows; requires_grad stays
    TensorImpl& impl = t.impl();
    if (impl.grad) impl.grad = convert(name, Tensor(impl.grad)).impl_ptr();
  };
  visit_tensors(false, swap_data);
  visit_tensors(true, swap_data);
}

Module& Module::to(Device device) {
  convert_tensors([device](const std::string&, const Tensor& t) { return t.to(device); });
  return *this;
}

Module& Module::to(DType dtype) {
  return to(dtype, [](const std::string&, const Tensor&) { return true; });
}

Module& Module::to(DType dtype, const std::function<bool(const std::string&, const Tensor&)>& select) {
  check(is_floating(dtype), "Module::to: target dtype must be floating, got {}", dtype_name(dtype));
  convert_tensors([&](const std::string& name, const Tensor& t) {
    return is_floating(t.dtype()) && select(name, t) ? t.to(dtype) : t;
  });
  return *this;
}

// ---- ModuleList ----

Module& ModuleList::operator[](size_t index) const {
  check(index < size_, "ModuleList: index {} out of range for {} modules", index, size_);
  return child(std::to_string(index));
}

}  // namespace engine::nn
