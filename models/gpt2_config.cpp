#include "models/gpt2_config.h"

#include "engine/error.h"

#include <fstream>

namespace models {

using engine::check;
using engine::fail;

namespace {

struct Size {
  const char* name;
  int64_t layers, heads, width;
};
constexpr Size kSizes[] = {
    {"gpt2", 12, 12, 768}, {"gpt2-medium", 24, 16, 1024}, {"gpt2-large", 36, 20, 1280}, {"gpt2-xl", 48, 25, 1600}};

// Reads an optional field, checking its JSON type; absent or null keeps the default.
template <typename T>
void read(const nlohmann::json& json, const char* key, T& out, const std::string& source) {
  if (!json.contains(key) || json[key].is_null()) return;
  const nlohmann::json& value = json[key];
  bool ok = false;
  if constexpr (std::is_same_v<T, bool>) ok = value.is_boolean();
  else if constexpr (std::is_integral_v<T>) ok = value.is_number_integer();
  else if constexpr (std::is_floating_point_v<T>) ok = value.is_number();
  else ok = value.is_string();
  check(ok, "{}: field '{}' has the wrong type ({})", source, key, value.type_name());
  out = value.get<T>();
}

}  // namespace

GPT2Config GPT2Config::from_json(const nlohmann::json& json, const std::string& source) {
  check(json.is_object(), "{}: expected a JSON object", source);
  GPT2Config c;
  c.name = source;
  if (json.contains("model_type") && json["model_type"].is_string())
    check(json["model_type"] == "gpt2", "{}: model_type '{}' is not gpt2", source, json["model_type"].get<std::string>());
  read(json, "n_layer", c.n_layer, source);
  read(json, "n_head", c.n_head, source);
  read(json, "n_embd", c.n_embd, source);
  read(json, "n_inner", c.n_inner, source);
  read(json, "n_positions", c.n_positions, source);
  read(json, "vocab_size", c.vocab_size, source);
  read(json, "eos_token_id", c.eos_token_id, source);
  read(json, "layer_norm_epsilon", c.layer_norm_epsilon, source);
  read(json, "initializer_range", c.initializer_range, source);
  read(json, "attn_pdrop", c.attn_pdrop, source);
  read(json, "embd_pdrop", c.embd_pdrop, source);
  read(json, "resid_pdrop", c.resid_pdrop, source);
  read(json, "tie_word_embeddings", c.tie_word_embeddings, source);
  read(json, "scale_attn_weights", c.scale_attn_weights, source);
  read(json, "scale_attn_by_inverse_layer_idx", c.scale_attn_by_inverse_layer_idx, source);
  read(json, "reorder_and_upcast_attn", c.reorder_and_upcast_attn, source);

  std::string activation = "gelu_new";
  read(json, "activation_function", activation, source);
  // gelu_pytorch_tanh is the same tanh formula under another name.
  check(activation == "gelu_new" || activation == "gelu_pytorch_tanh",
        "{}: activation_function '{}' is not supported (only gelu_new)", source, activation);
  bool cross_attention = false;
  read(json, "add_cross_attention", cross_attention, source);
  check(!cross_attention, "{}: add_cross_attention is not supported", source);

  check(c.n_layer > 0 && c.n_head > 0 && c.n_embd > 0 && c.n_positions > 0 && c.vocab_size > 0,
        "{}: n_layer, n_head, n_embd, n_positions and vocab_size must be positive", source);
  check(c.n_embd % c.n_head == 0, "{}: n_embd {} is not divisible by n_head {}", source, c.n_embd, c.n_head);
  check(c.n_inner >= 0, "{}: n_inner {} is negative", source, c.n_inner);
  for (double p : {c.attn_pdrop, c.embd_pdrop, c.resid_pdrop})
    check(p >= 0 && p < 1, "{}: dropout probabilities must lie in [0, 1)", source);
  check(c.layer_norm_epsilon > 0, "{}: layer_norm_epsilon must be positive", source);
  return c;
}

GPT2Config GPT2Config::from_file(const std::string& path) {
  std::ifstream in(path);
  check(in.good(), "{}: cannot open the model config", path);
  nlohmann::json json = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  check(!json.is_discarded(), "{}: not valid JSON", path);
  return from_json(json, path);
}

GPT2Config GPT2Config::builtin(const std::string& size) {
  for (const Size& s : kSizes)
    if (size == s.name) {
      GPT2Config c;
      c.name = s.name;
      c.n_layer = s.layers;
      c.n_head = s.heads;
      c.n_embd = s.width;
      return c;
    }
  fail("unknown model '{}': expected a folder with config.json or one of gpt2, gpt2-medium, gpt2-large, gpt2-xl",
       size);
}

bool GPT2Config::is_builtin(const std::string& size) {
  for (const Size& s : kSizes)
    if (size == s.name) return true;
  return false;
}

std::vector<std::string> GPT2Config::builtin_names() {
  std::vector<std::string> names;
  for (const Size& s : kSizes) names.push_back(s.name);
  return names;
}

int64_t GPT2Config::num_parameters() const {
  const int64_t C = n_embd, F = inner_dim();
  const int64_t per_block = 2 * 2 * C             // ln_1, ln_2
                            + C * 3 * C + 3 * C   // attn.c_attn
                            + C * C + C           // attn.c_proj
                            + C * F + F           // mlp.c_fc
                            + F * C + C;          // mlp.c_proj
  const int64_t head = tie_word_embeddings ? 0 : vocab_size * C;
  return vocab_size * C + n_positions * C + n_layer * per_block + 2 * C + head;
}

nlohmann::json GPT2Config::to_json() const {
  return {{"model_type", "gpt2"},
          {"n_layer", n_layer},
          {"n_head", n_head},
          {"n_embd", n_embd},
          {"n_inner", n_inner > 0 ? nlohmann::json(n_inner) : nlohmann::json(nullptr)},
          {"n_positions", n_positions},
          {"vocab_size", vocab_size},
          {"eos_token_id", eos_token_id},
          {"layer_norm_epsilon", layer_norm_epsilon},
          {"initializer_range", initializer_range},
          {"attn_pdrop", attn_pdrop},
          {"embd_pdrop", embd_pdrop},
          {"resid_pdrop", resid_pdrop},
          {"activation_function", "gelu_new"},
          {"tie_word_embeddings", tie_word_embeddings},
          {"scale_attn_weights", scale_attn_weights},
          {"scale_attn_by_inverse_layer_idx", scale_attn_by_inverse_layer_idx},
          {"reorder_and_upcast_attn", reorder_and_upcast_attn}};
}

}  // namespace models
