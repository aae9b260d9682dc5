// Putting adapters into a model: the adapter config, injection by module
// name, trainable-parameter counts computed from a GPT-2 config alone, merging
// every adapter at once, and per-layer diagnostics (paper §4.3–4.4).
#pragma once

#include "curlora/adapters.h"
#include "engine/nn/module.h"
#include "models/gpt2_config.h"

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace curlora {

enum class Method { CurLoRA, LoRA };
std::string method_name(Method method);        // "curlora", "lora"
Method parse_method(const std::string& name);  // the inverse; an error for anything else

// Defaults are the paper's GPT-2 run and the reference code's sampling.
struct AdapterConfig {
  Method method = Method::CurLoRA;
  int64_t rank = 8;
  double alpha = 1.0;
  // Module-name targets, matched as PEFT matches target_modules: a module
  // named N is adapted when N == target or N ends with "." + target.
  std::vector<std::string> targets = {"attn.c_attn"};
  double epsilon = 1e-3;         // CURLoRA: p~ = 1/(p + epsilon); 0 is the paper's 1/p
  bool with_replacement = true;  // CURLoRA: sample columns and rows with replacement
  uint64_t seed = 0;             // CURLoRA selection; LoRA's A initialisation

  void validate() const;  // rank > 0, finite alpha, epsilon >= 0, non-empty targets
};

bool matches_target(const std::string& module_name, const std::vector<std::string>& targets);

// ---- counts without building the model ----

// One Linear of GPT2LMHeadModel: its name and weight dims as (in, out).
struct LinearShape {
  std::string name;
  int64_t in, out;
};
// Every Linear an adapter may target, in module order: per block attn.c_attn,
// attn.c_proj, mlp.c_fc, mlp.c_proj (plus lm_head when it is not tied).
std::vector<LinearShape> gpt2_linear_shapes(const models::GPT2Config& config);

struct ParameterCounts {
  std::vector<std::string> adapted;  // module names
  int64_t trainable = 0;             // adapter elements: r^2 per CURLoRA layer, r (in + out) per LoRA layer
  int64_t base = 0;                  // the base model's elements (frozen)
};
// What inject_adapters would produce on a GPT2LMHeadModel with this config.
// A target that matches no Linear is an error, as in injection.
ParameterCounts count_parameters(const models::GPT2Config& config, const AdapterConfig& adapter);

// ---- injection ----

// Wraps every Linear whose dotted name matches a target in a CurLoRALinear
// (columns and rows drawn as select_columns_and_rows says) or a LoRALinear (A
// drawn from Generator(layer_seed(seed, name))), then freezes every parameter
// except the adapters' U or A, B. Each layer's draw depends on the seed and
// its own name only, not on which other layers are adapted.
// Errors: a target that matches nothing, a matched module that is not a
// Linear (or is already adapted), a weight tied to another parameter.
// Returns the adapters by module name, in module order.
using Adapters = std::vector<std::pair<std::string, std::shared_ptr<AdapterLinear>>>;
Adapters inject_adapters(engine::nn::Module& model, const AdapterConfig& config);

// The same with CUR indices given per layer (e.g. read from a file): no sampling.
Adapters inject_curlora(engine::nn::Module& model, const AdapterConfig& config,
                        const std::vector<std::pair<std::string, CurSelection>>& selections);

// Every adapter in the model, by module name, in module order.
Adapters find_adapters(const engine::nn::Module& model);

void merge_adapters(const engine::nn::Module& model);    // each not yet merged
void unmerge_adapters(const engine::nn::Module& model);  // each merged

// ---- diagnostics ----

struct LayerDiagnostics {
  std::string name;
  std::vector<std::pair<std::string, double>> trainable_norms;  // ||U||_F, or ||A||_F and ||B||_F
  double delta_norm = 0;                                        // ||ΔW||_F
  double weight_norm = 0;                                       // ||W||_F of the base (unmerged)
  double relative_delta = 0;                                    // ||ΔW||_F / ||W||_F
  std::optional<double> output_shift;  // ||x ΔW||_F over the batch that `run_batch` fed this layer
};
// Per adapter, in module order. When `run_batch` is given it is run (without
// recording a graph) while the adapters capture their inputs, and each layer's
// output shift is measured on the input it saw last.
std::vector<LayerDiagnostics> diagnose_adapters(const engine::nn::Module& model,
                                                const std::function<void()>& run_batch = {});

}  // namespace curlora
