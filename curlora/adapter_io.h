// Adapter files. A CURLoRA adapter is one small safetensors file: per layer U
// and the int32 column and row indices, plus metadata (the config and a
// fingerprint of the base model); C and R are rebuilt from the base on load.
// A LoRA adapter is a PEFT folder (adapter_config.json + adapter_model.safetensors).
#pragma once

#include "curlora/inject.h"
#include "engine/nn/module.h"
#include "models/gpt2.h"

#include <map>
#include <string>

namespace curlora {

// ---- CURLoRA: our format ----

// Requires: CURLoRA adapters injected into `model`, none merged (the
// fingerprint hashes the base weights as they were when C and R were taken).
void save_curlora(const std::string& path, const models::GPT2LMHeadModel& model, const AdapterConfig& config);

// Injects the file's adapters into `model` (which must have none yet) and
// returns their config. The base must be the one the file was made on: its
// architecture, the adapted layers' shapes and a hash of their weights are
// compared, and a mismatch is an error naming the fingerprints and the first
// difference.
AdapterConfig load_curlora(models::GPT2LMHeadModel& model, const std::string& path);

// The fingerprint as hex digits: a hash of the architecture fields of the
// config, and of each named layer's name, weight shape and weight values (as
// f32). `layers` may name plain Linears or unmerged adapters.
std::string base_fingerprint(const models::GPT2LMHeadModel& model, const std::vector<std::string>& layers);

// ---- LoRA: PEFT's format ----

// Writes <dir>/adapter_config.json and <dir>/adapter_model.safetensors with
// keys base_model.model.<module>.lora_A.weight [r, in] (= Aᵀ) and
// .lora_B.weight [out, r] (= Bᵀ), and lora_alpha = alpha * r so that PEFT's
// scaling lora_alpha / r equals our alpha. The folder is created if needed.
void save_lora_peft(const std::string& dir, const models::GPT2LMHeadModel& model, const AdapterConfig& config,
                    const std::string& base_model_name_or_path);

// Reads a PEFT LoRA folder, injects LoRA adapters into `model` and fills A
// and B. Settings we do not implement (DoRA, bias training, rank or alpha
// patterns, modules_to_save, regex targets) are errors; lora_dropout only
// matters in training and is accepted.
AdapterConfig load_lora_peft(models::GPT2LMHeadModel& model, const std::string& dir);

// ---- named tensors (task heads) ----

// Any named tensors to one safetensors file, and back (stored dtype, CPU, sorted by name).
void save_named_tensors(const std::string& path, const engine::nn::NamedTensors& tensors,
                        const std::map<std::string, std::string>& metadata = {});
engine::nn::NamedTensors load_named_tensors(const std::string& path);

// A module's parameters and buffers by dotted name; loading requires the same
// names and shapes, and converts to each tensor's dtype and device in place.
void save_module_tensors(const std::string& path, const engine::nn::Module& module);
void load_module_tensors(engine::nn::Module& module, const std::string& path);

}  // namespace curlora
