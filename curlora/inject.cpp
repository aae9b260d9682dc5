// Injection by module name, analytic parameter counts, bulk merge, diagnostics.
#include "curlora/inject.h"

#include "engine/error.h"
#include "engine/ops.h"

#include <cmath>
#include <map>
#include <set>

namespace curlora {

using engine::check;
using engine::fail;
using engine::nn::Module;

std::string method_name(Method method) { return method == Method::CurLoRA ? "curlora" : "lora"; }

Method parse_method(const std::string& name) {
  if (name == "curlora") return Method::CurLoRA;
  if (name == "lora") return Method::LoRA;
  fail("unknown adapter method '{}': expected curlora or lora", name);
}

void AdapterConfig::validate() const {
  check(rank > 0, "adapter config: rank must be positive, got {}", rank);
  check(std::isfinite(alpha), "adapter config: alpha must be finite, got {}", alpha);
  check(epsilon >= 0 && std::isfinite(epsilon), "adapter config: epsilon must be finite and >= 0, got {}", epsilon);
  check(!targets.empty(), "adapter config: no target modules");
  for (const std::string& t : targets) check(!t.empty(), "adapter config: an empty target module name");
}

bool matches_target(const std::string& module_name, const std::vector<std::string>& targets) {
  for (const std::string& t : targets)
    if (module_name == t || (module_name.size() > t.size() && module_name.ends_with("." + t))) return true;
  return false;
}

namespace {

// Each target must match at least one of `names`: a target matching nothing is a typo.
void check_every_target_matches(const std::vector<std::string>& targets, const std::vector<std::string>& names) {
  for (const std::string& t : targets) {
    bool found = false;
    for (const std::string& n : names) found = found || matches_target(n, {t});
    check(found, "adapter target '{}' matches no Linear module (e.g. {})", t,
          names.empty() ? std::string("none") : names.front());
  }
}

using MakeAdapter = std::function<std::shared_ptr<AdapterLinear>(const std::string&, std::shared_ptr<Linear>)>;

Adapters inject(Module& model, const AdapterConfig& config, const MakeAdapter& make) {
  config.validate();
  std::set<std::string> parameter_names;  // a tied weight is listed once, under its first owner
  for (const auto& [name, t] : model.named_parameters()) parameter_names.insert(name);

  std::vector<std::pair<std::string, std::shared_ptr<Linear>>> chosen;
  std::vector<std::string> linear_names;
  for (const auto& [name, module] : model.named_modules()) {
    auto linear = std::dynamic_pointer_cast<Linear>(module);
    const bool inside_adapter = name.ends_with(".base_layer");
    if (linear && !inside_adapter) linear_names.push_back(name);
    if (!matches_target(name, config.targets)) continue;
    check(!std::dynamic_pointer_cast<AdapterLinear>(module) && !inside_adapter, "'{}' already has an adapter", name);
    check(linear != nullptr, "adapter target '{}' is a {}, not a Linear", name, module->type_name());
    check(parameter_names.count(name + ".weight"),
          "'{}': its weight is tied to another parameter, which adapters do not support (a merge would change both)",
          name);
    chosen.emplace_back(name, linear);
  }
  check_every_target_matches(config.targets, linear_names);

  // Build every adapter before touching the tree, so that a failure (say, a
  // zero column with epsilon 0) leaves the model as it was. Constructors
  // freeze their base layer, so remember what trained.
  std::vector<std::pair<Tensor, bool>> trained;
  for (const Tensor& t : model.parameters()) trained.emplace_back(t, t.requires_grad());
  Adapters adapters;
  try {
    for (const auto& [name, linear] : chosen) adapters.emplace_back(name, make(name, linear));
  } catch (...) {
    for (auto& [t, flag] : trained) Tensor(t).set_requires_grad(flag);
    throw;
  }
  model.set_trainable([](const std::string&, const Tensor&) { return false; });
  for (const auto& [name, adapter] : adapters) model.replace_module(name, adapter);
  return adapters;
}

}  // namespace

Adapters inject_adapters(Module& model, const AdapterConfig& config) {
  return inject(model, config,
                [&](const std::string& name, std::shared_ptr<Linear> linear) -> std::shared_ptr<AdapterLinear> {
                  if (config.method == Method::LoRA) {
                    engine::Generator gen(layer_seed(config.seed, name));
                    return std::make_shared<LoRALinear>(linear, config.rank, config.alpha, gen);
                  }
                  const SelectionOptions options{config.epsilon, config.with_replacement, config.seed};
                  CurSelection selection = select_columns_and_rows(linear->weight, config.rank, options, name);
                  return std::make_shared<CurLoRALinear>(linear, std::move(selection), config.alpha);
                });
}

Adapters inject_curlora(Module& model, const AdapterConfig& config,
                        const std::vector<std::pair<std::string, CurSelection>>& selections) {
  check(config.method == Method::CurLoRA, "inject_curlora: the config's method is {}", method_name(config.method));
  std::map<std::string, const CurSelection*> by_name;
  for (const auto& [name, s] : selections) {
    check(int64_t(s.cols.size()) == config.rank && int64_t(s.rows.size()) == config.rank,
          "'{}': {} columns and {} rows for rank {}", name, s.cols.size(), s.rows.size(), config.rank);
    check(matches_target(name, config.targets), "CUR indices for '{}', which no target names", name);
    by_name[name] = &s;
  }
  // Every matched module needs indices (checked before the tree changes); with
  // names unique and all matching a target, no selection is left over.
  check(by_name.size() == selections.size(), "CUR indices are given twice for one module");
  return inject(model, config,
                [&](const std::string& name, std::shared_ptr<Linear> linear) -> std::shared_ptr<AdapterLinear> {
                  auto it = by_name.find(name);
                  check(it != by_name.end(), "'{}' matches the targets but has no CUR indices", name);
                  return std::make_shared<CurLoRALinear>(linear, *it->second, config.alpha);
                });
}

// ---- counts ----

std::vector<LinearShape> gpt2_linear_shapes(const models::GPT2Config& config) {
  const int64_t C = config.n_embd, F = config.inner_dim();
  std::vector<LinearShape> shapes;
  for (int64_t i = 0; i < config.n_layer; ++i) {
    const std::string block = "transformer.h." + std::to_string(i) + ".";
    shapes.push_back({block + "attn.c_attn", C, 3 * C});
    shapes.push_back({block + "attn.c_proj", C, C});
    shapes.push_back({block + "mlp.c_fc", C, F});
    shapes.push_back({block + "mlp.c_proj", F, C});
  }
  if (!config.tie_word_embeddings) shapes.push_back({"lm_head", C, config.vocab_size});
  return shapes;
}

ParameterCounts count_parameters(const models::GPT2Config& config, const AdapterConfig& adapter) {
  adapter.validate();
  const std::vector<LinearShape> shapes = gpt2_linear_shapes(config);
  std::vector<std::string> names;
  for (const LinearShape& s : shapes) names.push_back(s.name);
  check_every_target_matches(adapter.targets, names);

  ParameterCounts counts;
  counts.base = config.num_parameters();
  const int64_t r = adapter.rank;
  for (const LinearShape& s : shapes) {
    if (!matches_target(s.name, adapter.targets)) continue;
    counts.adapted.push_back(s.name);
    counts.trainable += adapter.method == Method::CurLoRA ? r * r : r * (s.in + s.out);
  }
  return counts;
}

// ---- bulk operations ----

Adapters find_adapters(const Module& model) {
  Adapters adapters;
  for (const auto& [name, module] : model.named_modules())
    if (auto adapter = std::dynamic_pointer_cast<AdapterLinear>(module)) adapters.emplace_back(name, adapter);
  return adapters;
}

void merge_adapters(const Module& model) {
  for (const auto& [name, adapter] : find_adapters(model))
    if (!adapter->merged()) adapter->merge();
}

void unmerge_adapters(const Module& model) {
  for (const auto& [name, adapter] : find_adapters(model))
    if (adapter->merged()) adapter->unmerge();
}

// ---- diagnostics ----

namespace {

Tensor host_f64(const Tensor& t) { return t.detach().to(engine::Device::cpu()).to(engine::DType::F64); }

double frobenius(const Tensor& t) {
  engine::NoGradGuard no_grad;
  const Tensor d = host_f64(t);
  return std::sqrt(engine::sum(d * d).item());
}

// Turns input capture on for the scope, and off again even if the batch throws.
struct CaptureScope {
  const Adapters& adapters;
  explicit CaptureScope(const Adapters& a) : adapters(a) {
    for (const auto& [name, adapter] : adapters) adapter->capture_inputs(true);
  }
  ~CaptureScope() {
    for (const auto& [name, adapter] : adapters) adapter->capture_inputs(false);
  }
};

}  // namespace

std::vector<LayerDiagnostics> diagnose_adapters(const Module& model, const std::function<void()>& run_batch) {
  const Adapters adapters = find_adapters(model);
  std::vector<LayerDiagnostics> report;
  for (const auto& [name, adapter] : adapters) {
    LayerDiagnostics d;
    d.name = name;
    for (const auto& [tensor_name, t] : adapter->trainable_tensors())
      d.trainable_norms.emplace_back(tensor_name, frobenius(t));
    d.delta_norm = adapter->delta_norm();
    const Tensor& w = adapter->base_layer().weight;
    d.weight_norm = adapter->merged() ? frobenius(host_f64(w) - host_f64(adapter->delta_weight())) : frobenius(w);
    d.relative_delta = d.weight_norm > 0 ? d.delta_norm / d.weight_norm : 0.0;
    report.push_back(std::move(d));
  }
  if (run_batch) {
    CaptureScope capture(adapters);
    {
      engine::NoGradGuard no_grad;
      run_batch();
    }
    for (size_t i = 0; i < adapters.size(); ++i) {
      const Tensor& x = adapters[i].second->captured_input();
      check(x.defined(), "diagnostics: adapter '{}' saw no input in the batch", adapters[i].first);
      engine::NoGradGuard no_grad;
      report[i].output_shift = frobenius(adapters[i].second->update(x));
    }
  }
  return report;
}

}  // namespace curlora
