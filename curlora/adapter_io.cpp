// Adapter files: the CURLoRA safetensors format with its base fingerprint,
// PEFT's LoRA folder layout, and named-tensor files for task heads.
#include "curlora/adapter_io.h"

#include "engine/error.h"
#include "engine/io/safetensors.h"
#include "engine/ops.h"

#include <nlohmann/json.hpp>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

namespace curlora {

namespace fs = std::filesystem;
using engine::check;
using engine::DType;
using engine::fail;
using engine::nn::NamedTensors;
using nlohmann::json;

namespace {

constexpr const char* kFormat = "curlora-adapter";
constexpr const char* kFormatVersion = "1";

// ---- hashing (fingerprints) ----

// A 64-bit mix of a stream of 64-bit words (MurmurHash3's x64 steps). Values
// are hashed as integers, not bytes, so the result does not depend on the host.
struct Hasher {
  uint64_t h = 0x9e3779b97f4a7c15ull;
  uint64_t length = 0;
  void add(uint64_t k) {
    k *= 0x87c37b91114253d5ull;
    k = std::rotl(k, 31) * 0x4cf5ad432745937full;
    h = std::rotl(h ^ k, 27) * 5 + 0x52dce729;
    ++length;
  }
  void add(const std::string& text) {
    for (unsigned char c : text) add(uint64_t(c));
  }
  uint64_t digest() const {
    uint64_t x = h ^ length;  // splitmix64's finaliser
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
  }
};

std::string hex(uint64_t value) { return fmt::format("{:016x}", value); }

// The weight's values as f32 bit patterns, two per word.
std::string weight_hash(const engine::Tensor& weight) {
  const engine::Tensor w = weight.detach().to(engine::Device::cpu()).to(DType::F32).contiguous();
  const float* data = w.data<float>();
  Hasher hasher;
  for (int64_t i = 0; i < w.numel(); i += 2) {
    const uint64_t lo = std::bit_cast<uint32_t>(data[i]);
    const uint64_t hi = i + 1 < w.numel() ? std::bit_cast<uint32_t>(data[i + 1]) : 0;
    hasher.add(lo | (hi << 32));
  }
  return hex(hasher.digest());
}

// The fields that decide the base's architecture (not dropout, not its name).
json architecture(const models::GPT2Config& c) {
  return {{"n_layer", c.n_layer},
          {"n_head", c.n_head},
          {"n_embd", c.n_embd},
          {"n_inner", c.inner_dim()},
          {"n_positions", c.n_positions},
          {"vocab_size", c.vocab_size},
          {"layer_norm_epsilon", c.layer_norm_epsilon},
          {"scale_attn_weights", c.scale_attn_weights},
          {"scale_attn_by_inverse_layer_idx", c.scale_attn_by_inverse_layer_idx},
          {"tie_word_embeddings", c.tie_word_embeddings}};
}

// The unmerged base weight of a plain Linear or of an adapter's base_layer.
const engine::Tensor& base_weight(const models::GPT2LMHeadModel& model, const std::string& name) {
  auto module = model.get_submodule(name);
  if (auto adapter = std::dynamic_pointer_cast<AdapterLinear>(module)) {
    check(!adapter->merged(), "'{}': the adapter is merged; unmerge it before saving or fingerprinting", name);
    return adapter->base_layer().weight;
  }
  auto linear = std::dynamic_pointer_cast<Linear>(module);
  check(linear != nullptr, "'{}' is a {}, not a Linear", name, module->type_name());
  return linear->weight;
}

struct Fingerprint {
  json architecture;
  json layers;  // name -> {"shape": [...], "hash": "..."}
  std::string digest;
};

Fingerprint fingerprint_of(const models::GPT2LMHeadModel& model, const std::vector<std::string>& names) {
  Fingerprint f;
  f.architecture = architecture(model.config());
  f.layers = json::object();
  Hasher hasher;
  hasher.add(f.architecture.dump());
  for (const std::string& name : names) {
    const engine::Tensor& w = base_weight(model, name);
    const std::string hash = weight_hash(w);
    f.layers[name] = {{"shape", w.shape()}, {"hash", hash}};
    hasher.add(name + std::string(engine::shape_str(w.shape())) + hash);
  }
  f.digest = hex(hasher.digest());
  return f;
}

// ---- metadata fields ----

const std::string& field(const engine::io::SafetensorsFile& file, const std::string& key) {
  auto it = file.metadata().find(key);
  check(it != file.metadata().end(), "{}: adapter metadata lacks '{}'", file.path(), key);
  return it->second;
}

template <typename T>
T parse_number(const engine::io::SafetensorsFile& file, const std::string& key) {
  const std::string& text = field(file, key);
  try {
    size_t used = 0;
    T value;
    if constexpr (std::is_floating_point_v<T>)
      value = T(std::stod(text, &used));
    else if constexpr (std::is_unsigned_v<T>)
      value = T(std::stoull(text, &used));
    else
      value = T(std::stoll(text, &used));
    if (used == text.size()) return value;
  } catch (const std::exception&) {
  }
  fail("{}: adapter metadata '{}' = '{}' is not a number", file.path(), key, text);
}

json parse_json(const std::string& text, const std::string& where) {
  json value = json::parse(text, nullptr, /*allow_exceptions=*/false);
  check(!value.is_discarded(), "{}: not valid JSON", where);
  return value;
}

std::vector<std::string> string_list(const json& value, const std::string& where) {
  check(value.is_array(), "{}: expected a list of strings", where);
  std::vector<std::string> out;
  for (const json& v : value) {
    check(v.is_string(), "{}: expected a list of strings", where);
    out.push_back(v.get<std::string>());
  }
  return out;
}

// Names whose modules hold adapters of one kind, checking none is missing or foreign.
template <typename A>
std::vector<std::pair<std::string, std::shared_ptr<A>>> adapters_of(const models::GPT2LMHeadModel& model,
                                                                    const char* what) {
  std::vector<std::pair<std::string, std::shared_ptr<A>>> out;
  for (const auto& [name, adapter] : find_adapters(model)) {
    auto typed = std::dynamic_pointer_cast<A>(adapter);
    check(typed != nullptr, "'{}' holds a {}, not a {} adapter", name, adapter->type_name(), what);
    out.emplace_back(name, typed);
  }
  check(!out.empty(), "the model has no {} adapters to save", what);
  return out;
}

}  // namespace

std::string base_fingerprint(const models::GPT2LMHeadModel& model, const std::vector<std::string>& layers) {
  return fingerprint_of(model, layers).digest;
}

// ---- CURLoRA ----

void save_curlora(const std::string& path, const models::GPT2LMHeadModel& model, const AdapterConfig& config) {
  const auto adapters = adapters_of<CurLoRALinear>(model, "CURLoRA");
  NamedTensors tensors;
  std::vector<std::string> names;
  for (const auto& [name, a] : adapters) {
    names.push_back(name);
    const CurSelection& s = a->selection();
    const int64_t r = a->rank();
    tensors.emplace_back(name + ".U", a->U.detach().to(DType::F32));
    tensors.emplace_back(name + ".cols", engine::Tensor::from_vector<int32_t>(s.cols, {r}));
    tensors.emplace_back(name + ".rows", engine::Tensor::from_vector<int32_t>(s.rows, {r}));
    check(r == config.rank && a->alpha() == config.alpha,
          "save_curlora: '{}' has rank {} and alpha {}, the config {} and {}", name, r, a->alpha(), config.rank,
          config.alpha);
  }
  const Fingerprint f = fingerprint_of(model, names);
  const std::map<std::string, std::string> metadata = {
      {"format", kFormat},
      {"format_version", kFormatVersion},
      {"method", "curlora"},
      {"rank", std::to_string(config.rank)},
      {"alpha", fmt::format("{}", config.alpha)},  // shortest text that reads back exactly
      {"epsilon", fmt::format("{}", config.epsilon)},
      {"with_replacement", config.with_replacement ? "true" : "false"},
      {"seed", std::to_string(config.seed)},
      {"targets", json(config.targets).dump()},
      {"layers", json(names).dump()},
      {"base_model", model.config().name},
      {"base_architecture", f.architecture.dump()},
      {"base_layers", f.layers.dump()},
      {"base_fingerprint", f.digest}};
  engine::io::save_safetensors(path, tensors, metadata);
}

AdapterConfig load_curlora(models::GPT2LMHeadModel& model, const std::string& path) {
  const auto file = engine::io::SafetensorsFile::open(path);
  check(file.metadata().count("format") && field(file, "format") == kFormat,
        "{}: not a CURLoRA adapter file (metadata 'format' is not '{}')", path, kFormat);
  check(field(file, "format_version") == kFormatVersion, "{}: adapter format version {} (this build reads {})", path,
        field(file, "format_version"), kFormatVersion);

  AdapterConfig config;
  config.method = parse_method(field(file, "method"));
  check(config.method == Method::CurLoRA, "{}: method '{}' in a CURLoRA file", path, field(file, "method"));
  config.rank = parse_number<int64_t>(file, "rank");
  config.alpha = parse_number<double>(file, "alpha");
  config.epsilon = parse_number<double>(file, "epsilon");
  config.seed = parse_number<uint64_t>(file, "seed");
  // A copy: GCC 13 takes a reference here for one into the temporary key.
  const std::string replacement = field(file, "with_replacement");
  check(replacement == "true" || replacement == "false", "{}: with_replacement is '{}'", path, replacement);
  config.with_replacement = replacement == "true";
  config.targets = string_list(parse_json(field(file, "targets"), path + " targets"), path + " targets");
  const std::vector<std::string> names =
      string_list(parse_json(field(file, "layers"), path + " layers"), path + " layers");
  config.validate();

  // The base must be the one the indices were drawn on: architecture first
  // (so a smaller model fails here, not on a missing module), then each weight.
  const std::string expected = field(file, "base_fingerprint");
  auto mismatch = [&](const std::string& why) {
    fail("{}: base-model fingerprint mismatch: the adapter was made on base {}, and this model differs: {}", path,
         expected, why);
  };
  const json file_architecture = parse_json(field(file, "base_architecture"), path + " base_architecture");
  const json our_architecture = architecture(model.config());
  if (file_architecture != our_architecture) {
    std::string why = "architecture differs";
    for (const auto& [key, value] : our_architecture.items())
      if (!file_architecture.contains(key) || file_architecture[key] != value) {
        why = fmt::format("{} is {} in the adapter's base, {} here", key,
                          file_architecture.contains(key) ? file_architecture[key].dump() : "absent", value.dump());
        break;
      }
    mismatch(why);
  }
  const Fingerprint ours = fingerprint_of(model, names);
  if (ours.digest != expected) {
    const json file_layers = parse_json(field(file, "base_layers"), path + " base_layers");
    std::string why = "the fingerprints differ";
    for (const std::string& name : names)
      if (!file_layers.contains(name) || file_layers[name] != ours.layers[name]) {
        why = fmt::format("the weights of '{}' differ", name);
        break;
      }
    mismatch(fmt::format("its fingerprint is {}, {}", ours.digest, why));
  }

  std::vector<std::pair<std::string, CurSelection>> selections;
  for (const std::string& name : names) {
    auto indices = [&](const std::string& key) {
      check(file.contains(key) && file.entry(key).dtype == DType::I32, "{}: int32 tensor '{}' is missing", path, key);
      const engine::Tensor t = file.load(key, DType::I32);
      check(t.shape() == engine::Shape{config.rank}, "{}: '{}' has shape {}, expected [{}]", path, key,
            engine::shape_str(t.shape()), config.rank);
      return t.to_vector<int32_t>();
    };
    selections.emplace_back(name, CurSelection{indices(name + ".cols"), indices(name + ".rows")});
  }
  const Adapters adapters = inject_curlora(model, config, selections);

  engine::NoGradGuard no_grad;
  for (const auto& [name, adapter] : adapters) {
    const std::string key = name + ".U";
    check(file.contains(key), "{}: tensor '{}' is missing", path, key);
    const engine::Tensor u = file.load(key, DType::F32);
    auto& cur = static_cast<CurLoRALinear&>(*adapter);
    check(u.shape() == cur.U.shape(), "{}: '{}' has shape {}, expected {}", path, key, engine::shape_str(u.shape()),
          engine::shape_str(cur.U.shape()));
    cur.U.copy_(u.to(cur.U.dtype()).to(cur.U.device()));
  }
  return config;
}

// ---- LoRA in PEFT's format ----

namespace {

const std::string kPeftPrefix = "base_model.model.";

}  // namespace

void save_lora_peft(const std::string& dir, const models::GPT2LMHeadModel& model, const AdapterConfig& config,
                    const std::string& base_model_name_or_path) {
  const auto adapters = adapters_of<LoRALinear>(model, "LoRA");
  NamedTensors tensors;
  for (const auto& [name, a] : adapters) {
    check(a->rank() == config.rank && a->alpha() == config.alpha,
          "save_lora_peft: '{}' has rank {} and alpha {}, the config {} and {}", name, a->rank(), a->alpha(),
          config.rank, config.alpha);
    // PEFT's lora_A and lora_B are torch Linears: weights [out, in] of x -> x A and x -> x B.
    tensors.emplace_back(kPeftPrefix + name + ".lora_A.weight", a->A.detach().transpose(0, 1).to(DType::F32));
    tensors.emplace_back(kPeftPrefix + name + ".lora_B.weight", a->B.detach().transpose(0, 1).to(DType::F32));
  }
  const double lora_alpha = config.alpha * double(config.rank);
  // An integer when it is one, as PEFT's own configs have it.
  const bool integral = lora_alpha == std::floor(lora_alpha) && std::abs(lora_alpha) < 1e15;
  const json lora_alpha_json = integral ? json(int64_t(lora_alpha)) : json(lora_alpha);
  const json cfg = {{"peft_type", "LORA"},
                    {"task_type", "CAUSAL_LM"},
                    {"base_model_name_or_path", base_model_name_or_path},
                    {"r", config.rank},
                    {"lora_alpha", lora_alpha_json},
                    {"target_modules", config.targets},
                    {"fan_in_fan_out", true},  // GPT-2's Conv1D stores [in, out]
                    {"bias", "none"},
                    {"lora_dropout", 0.0},
                    {"use_rslora", false},
                    {"use_dora", false},
                    {"init_lora_weights", true},
                    {"inference_mode", true},
                    {"modules_to_save", nullptr},
                    {"layers_to_transform", nullptr},
                    {"layers_pattern", nullptr},
                    {"rank_pattern", json::object()},
                    {"alpha_pattern", json::object()},
                    {"revision", nullptr}};
  fs::create_directories(dir);
  engine::io::save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), tensors,
                               {{"format", "pt"}});  // what PEFT itself writes
  const fs::path config_path = fs::path(dir) / "adapter_config.json";
  std::ofstream out(config_path);
  out << cfg.dump(2) << "\n";
  check(out.good(), "{}: cannot write", config_path.string());
}

AdapterConfig load_lora_peft(models::GPT2LMHeadModel& model, const std::string& dir) {
  const fs::path config_path = fs::path(dir) / "adapter_config.json";
  const fs::path weights_path = fs::path(dir) / "adapter_model.safetensors";
  std::ifstream in(config_path);
  check(in.good(), "{}: cannot open the PEFT adapter config", config_path.string());
  const std::string where = config_path.string();
  json cfg = json::parse(in, nullptr, /*allow_exceptions=*/false);
  check(cfg.is_object(), "{}: expected a JSON object", where);
  check(fs::exists(weights_path), "{}: missing (only safetensors adapters are read)", weights_path.string());

  auto is_set = [&](const char* key) {  // present and not null, false, empty
    if (!cfg.contains(key) || cfg[key].is_null()) return false;
    const json& v = cfg[key];
    if (v.is_boolean()) return v.get<bool>();
    if (v.is_object() || v.is_array() || v.is_string()) return !v.empty() && v != "none";
    return true;
  };
  check(cfg.value("peft_type", "") == "LORA", "{}: peft_type is not LORA", where);
  for (const char* unsupported :
       {"use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "exclude_modules",
        "lora_bias", "target_parameters", "layer_replication", "trainable_token_indices", "alora_invocation_tokens"})
    check(!is_set(unsupported), "{}: '{}' is set, which this engine does not implement", where, unsupported);
  check(!is_set("bias"), "{}: bias '{}' is not supported (only \"none\")", where, cfg["bias"].dump());
  check(cfg.contains("r") && cfg["r"].is_number_integer() && cfg["r"].get<int64_t>() > 0,
        "{}: 'r' must be a positive integer", where);
  check(cfg.contains("lora_alpha") && cfg["lora_alpha"].is_number(), "{}: 'lora_alpha' must be a number", where);
  check(cfg.contains("target_modules") && cfg["target_modules"].is_array(),
        "{}: target_modules must be a list of names (a regex string is not supported)", where);

  AdapterConfig config;
  config.method = Method::LoRA;
  config.rank = cfg["r"].get<int64_t>();
  const double scale_divisor = is_set("use_rslora") ? std::sqrt(double(config.rank)) : double(config.rank);
  config.alpha = cfg["lora_alpha"].get<double>() / scale_divisor;  // PEFT's scaling
  config.targets = string_list(cfg["target_modules"], where + " target_modules");
  const Adapters adapters = inject_adapters(model, config);

  const auto file = engine::io::SafetensorsFile::open(weights_path.string());
  const std::vector<std::string> keys = file.keys();
  std::set<std::string> unused(keys.begin(), keys.end());
  auto take = [&](const std::string& key, const engine::Shape& shape) {
    check(file.contains(key), "{}: tensor '{}' is missing", file.path(), key);
    check(file.entry(key).shape == shape, "{}: '{}' has shape {}, expected {}", file.path(), key,
          engine::shape_str(file.entry(key).shape), engine::shape_str(shape));
    unused.erase(key);
    return file.load(key, DType::F32).transpose(0, 1);
  };
  engine::NoGradGuard no_grad;
  for (const auto& [name, adapter] : adapters) {
    auto& lora = static_cast<LoRALinear&>(*adapter);
    const int64_t r = config.rank, in = lora.A.size(0), out = lora.B.size(1);
    lora.A.copy_(take(kPeftPrefix + name + ".lora_A.weight", {r, in}).to(lora.A.dtype()).to(lora.A.device()));
    lora.B.copy_(take(kPeftPrefix + name + ".lora_B.weight", {out, r}).to(lora.B.dtype()).to(lora.B.device()));
  }
  check(unused.empty(), "{}: tensor '{}' belongs to no adapted module", file.path(),
        unused.empty() ? "" : *unused.begin());
  return config;
}

// ---- named tensors ----

void save_named_tensors(const std::string& path, const NamedTensors& tensors,
                        const std::map<std::string, std::string>& metadata) {
  engine::io::save_safetensors(path, tensors, metadata);
}

NamedTensors load_named_tensors(const std::string& path) {
  const auto file = engine::io::SafetensorsFile::open(path);
  NamedTensors out;
  for (const std::string& key : file.keys()) {
    const auto& entry = file.entry(key);
    check(entry.dtype.has_value(), "{}: tensor '{}' has dtype {}, which the engine cannot hold", path, key,
          entry.dtype_name);
    out.emplace_back(key, file.load(key, *entry.dtype));
  }
  return out;
}

void save_module_tensors(const std::string& path, const engine::nn::Module& module) {
  NamedTensors all = module.named_parameters();
  for (auto& entry : module.named_buffers()) all.push_back(entry);
  save_named_tensors(path, all);
}

void load_module_tensors(engine::nn::Module& module, const std::string& path) {
  NamedTensors ours = module.named_parameters();
  for (auto& entry : module.named_buffers()) ours.push_back(entry);
  const auto file = engine::io::SafetensorsFile::open(path);
  check(file.keys().size() == ours.size(), "{}: {} tensors, the module has {}", path, file.keys().size(), ours.size());
  engine::NoGradGuard no_grad;
  for (auto& [name, t] : ours) {
    check(file.contains(name), "{}: tensor '{}' is missing", path, name);
    check(file.entry(name).shape == t.shape(), "{}: '{}' has shape {}, the module's is {}", path, name,
          engine::shape_str(file.entry(name).shape), engine::shape_str(t.shape()));
    Tensor(t).copy_(file.load(name, t.dtype()).to(t.device()));
  }
}

}  // namespace curlora
