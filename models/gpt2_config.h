// GPT2Config: the hyper-parameters of a GPT-2 model, read from a Hugging Face
// config.json or taken from the four published sizes by name. Settings the
// engine does not implement are rejected with a clear error, never ignored.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace models {

struct GPT2Config {
  int64_t n_layer = 12;
  int64_t n_head = 12;
  int64_t n_embd = 768;
  int64_t n_inner = 0;  // MLP width; 0 means 4 * n_embd (HF's null)
  int64_t n_positions = 1024;
  int64_t vocab_size = 50257;
  int64_t eos_token_id = 50256;
  double layer_norm_epsilon = 1e-5;
  double initializer_range = 0.02;
  double attn_pdrop = 0.1;
  double embd_pdrop = 0.1;
  double resid_pdrop = 0.1;
  bool tie_word_embeddings = true;
  bool scale_attn_weights = true;
  bool scale_attn_by_inverse_layer_idx = false;
  bool reorder_and_upcast_attn = false;  // upcasts fp16 scores to fp32: we always score in fp32
  std::string name = "gpt2";             // where it came from: a size name or a folder

  int64_t head_dim() const { return n_embd / n_head; }
  int64_t inner_dim() const { return n_inner > 0 ? n_inner : 4 * n_embd; }
  // Parameter elements of GPT2LMHeadModel, a tied lm_head counted once (as
  // transformers' num_parameters()); computed without building the model.
  int64_t num_parameters() const;

  // Parses HF's config.json layout; `source` names the file in errors.
  static GPT2Config from_json(const nlohmann::json& json, const std::string& source);
  static GPT2Config from_file(const std::string& path);
  // "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl".
  static GPT2Config builtin(const std::string& size);
  static bool is_builtin(const std::string& size);
  static std::vector<std::string> builtin_names();

  nlohmann::json to_json() const;  // HF field names
};

}  // namespace models
