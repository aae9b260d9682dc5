// Adapter files and the PyTorch goldens: the CURLoRA file (round trip, size,
// fingerprint errors), PEFT's LoRA layout (JSON, keys, shapes, round trip,
// unsupported settings), named-tensor files, and the loss and adapter
// gradients against transformers (tests/goldens/adapters, made by
// tools/goldens/make_adapter_goldens.py).
#include "curlora/adapter_io.h"
#include "engine/io/safetensors.h"
#include "tests/curlora_test_util.h"
#include "tests/gradcheck.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <unistd.h>
#include <filesystem>
#include <fstream>

namespace fs = std::filesystem;
using namespace adapter_testing;
using curlora::AdapterConfig;
using curlora::CurLoRALinear;
using curlora::LoRALinear;
using curlora::Method;
using nlohmann::json;

namespace {

// A fresh folder under the system temp dir, removed when the test ends.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name)
      : path(fs::temp_directory_path() / ("curlora_test_" + std::to_string(getpid()) + "_" + name)) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string operator/(const std::string& file) const { return (path / file).string(); }
};

AdapterConfig curlora_config() {
  AdapterConfig config;
  config.rank = 4;
  config.alpha = 1.25;
  config.targets = {"attn.c_attn", "mlp.c_proj"};
  config.epsilon = 0.0;
  config.with_replacement = false;
  config.seed = 42;
  return config;
}

AdapterConfig lora_config() {
  AdapterConfig config;
  config.method = Method::LoRA;
  config.rank = 4;
  config.alpha = 2.5;
  config.targets = {"attn.c_attn", "mlp.c_proj"};
  return config;
}

// Sets every U (or B) to non-zero values so that files carry real content.
void train_a_little(const curlora::Adapters& adapters) {
  uint64_t seed = 500;
  for (const auto& [name, adapter] : adapters)
    for (const auto& [tname, t] : adapter->trainable_tensors())
      if (tname != "A") fill_normal(t, seed++, tname == "U" ? 30.0 : 0.05);
}

Tensor logits_of(models::GPT2LMHeadModel& model) {
  auto [ids, mask] = tiny_batch(model.config().vocab_size);
  engine::NoGradGuard no_grad;
  return model.forward(ids, mask);
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

void write_json(const std::string& path, const json& value) { std::ofstream(path) << value.dump(2); }

}  // namespace

// ---- CURLoRA files ----

TEST_CASE("a CURLoRA adapter file is small and round-trips", "[curlora][io]") {
  TempDir dir("cur_roundtrip");
  auto model = tiny_model();
  const AdapterConfig config = curlora_config();
  const curlora::Adapters adapters = curlora::inject_adapters(*model, config);
  train_a_little(adapters);
  const Tensor expected = logits_of(*model);
  curlora::save_curlora(dir / "adapter.safetensors", *model, config);

  // U (4 x 16 floats) and 2 x 4 indices per layer, plus the metadata: a few KB.
  CHECK(fs::file_size(dir / "adapter.safetensors") < 4096);
  const auto file = engine::io::SafetensorsFile::open(dir / "adapter.safetensors");
  CHECK(file.keys().size() == 3 * adapters.size());
  CHECK(file.entry("transformer.h.1.mlp.c_proj.cols").dtype == DType::I32);
  CHECK(file.entry("transformer.h.1.mlp.c_proj.U").shape == engine::Shape{4, 4});
  CHECK(file.metadata().at("rank") == "4");
  CHECK(file.metadata().at("epsilon") == "0");
  CHECK(file.metadata().at("with_replacement") == "false");
  CHECK(file.metadata().at("seed") == "42");
  CHECK(json::parse(file.metadata().at("targets")) == json(config.targets));
  CHECK(file.metadata().at("base_fingerprint").size() == 16);

  auto fresh = tiny_model();
  const AdapterConfig loaded = curlora::load_curlora(*fresh, dir / "adapter.safetensors");
  CHECK(loaded.rank == config.rank);
  CHECK(loaded.alpha == config.alpha);
  CHECK(loaded.epsilon == config.epsilon);
  CHECK(loaded.with_replacement == config.with_replacement);
  CHECK(loaded.seed == config.seed);
  CHECK(loaded.targets == config.targets);
  const curlora::Adapters again = curlora::find_adapters(*fresh);
  REQUIRE(again.size() == adapters.size());
  for (size_t i = 0; i < again.size(); ++i) {
    auto& a = static_cast<CurLoRALinear&>(*adapters[i].second);
    auto& b = static_cast<CurLoRALinear&>(*again[i].second);
    CHECK(again[i].first == adapters[i].first);
    CHECK(a.selection().cols == b.selection().cols);
    CHECK(a.selection().rows == b.selection().rows);
    CHECK(max_abs_difference(a.U, b.U) == 0);
    CHECK(max_abs_difference(a.C, b.C) == 0);  // rebuilt from the base
    CHECK(b.U.requires_grad());                // trainable again after loading
  }
  CHECK(max_abs_difference(logits_of(*fresh), expected) == 0);
  // The fingerprint is the same whether the layers are plain or adapted.
  std::vector<std::string> names;
  for (const auto& [name, a] : adapters) names.push_back(name);
  CHECK(curlora::base_fingerprint(*tiny_model(), names) == file.metadata().at("base_fingerprint"));
}

TEST_CASE("loading a CURLoRA adapter onto another base is a clear error", "[curlora][io][errors]") {
  TempDir dir("cur_errors");
  auto model = tiny_model();
  const AdapterConfig config = curlora_config();
  train_a_little(curlora::inject_adapters(*model, config));
  const std::string path = dir / "adapter.safetensors";
  curlora::save_curlora(path, *model, config);

  SECTION("same architecture, one adapted weight changed") {
    auto other = tiny_model();
    {
      engine::NoGradGuard no_grad;
      Tensor w = other->get_parameter("transformer.h.1.mlp.c_proj.weight");
      w.copy_(w + 1e-3);
    }
    CHECK_THROWS_WITH(curlora::load_curlora(*other, path),
                      Catch::Contains("fingerprint mismatch") && Catch::Contains("transformer.h.1.mlp.c_proj"));
    CHECK(curlora::find_adapters(*other).empty());
  }
  SECTION("a different architecture") {
    models::GPT2Config c = tiny_model()->config();
    c.n_layer = 3;
    engine::Generator gen(1);
    models::GPT2LMHeadModel other(
        c, engine::nn::VarBuilder(std::make_shared<engine::nn::RandomSource>(gen, DType::F32, engine::Device::cpu())));
    CHECK_THROWS_WITH(curlora::load_curlora(other, path),
                      Catch::Contains("fingerprint mismatch") && Catch::Contains("n_layer"));
  }
  SECTION("a model that already has adapters") {
    CHECK_THROWS_WITH(curlora::load_curlora(*model, path), Catch::Contains("already has an adapter"));
  }
  SECTION("merged adapters cannot be saved") {
    curlora::merge_adapters(*model);
    CHECK_THROWS_WITH(curlora::save_curlora(dir / "merged.safetensors", *model, config), Catch::Contains("unmerge"));
  }
  SECTION("not an adapter file") {
    CHECK_THROWS_WITH(curlora::load_curlora(*tiny_model(), tiny_model_dir() + "/model.safetensors"),
                      Catch::Contains("not a CURLoRA adapter file"));
  }
  SECTION("indices out of range") {
    const auto file = engine::io::SafetensorsFile::open(path);
    engine::nn::NamedTensors tensors = curlora::load_named_tensors(path);
    for (auto& [name, t] : tensors)
      if (name == "transformer.h.0.attn.c_attn.cols") t = Tensor::from_vector<int32_t>({0, 1, 2, 120}, {4});
    curlora::save_named_tensors(dir / "bad.safetensors", tensors, file.metadata());
    CHECK_THROWS_WITH(curlora::load_curlora(*tiny_model(), dir / "bad.safetensors"), Catch::Contains("out of range"));
  }
  SECTION("the wrong method saved") {
    auto lora_model = tiny_model();
    curlora::inject_adapters(*lora_model, lora_config());
    CHECK_THROWS_WITH(curlora::save_curlora(dir / "x.safetensors", *lora_model, config),
                      Catch::Contains("not a CURLoRA adapter"));
  }
}

// ---- LoRA in PEFT's format ----

TEST_CASE("a LoRA adapter is written in PEFT's layout and read back", "[curlora][io][peft]") {
  TempDir dir("peft");
  auto model = tiny_model();
  const AdapterConfig config = lora_config();
  const curlora::Adapters adapters = curlora::inject_adapters(*model, config);
  train_a_little(adapters);
  const Tensor expected = logits_of(*model);
  curlora::save_lora_peft(dir / "adapter", *model, config, "tests/goldens/gpt2/tiny-h5-fp32");

  const json cfg = read_json(dir / "adapter/adapter_config.json");
  CHECK(cfg["peft_type"] == "LORA");
  CHECK(cfg["task_type"] == "CAUSAL_LM");
  CHECK(cfg["r"] == 4);
  CHECK(cfg["lora_alpha"].is_number_integer());
  CHECK(cfg["lora_alpha"] == 10);  // alpha * r, so that PEFT's lora_alpha / r is our alpha
  CHECK(cfg["target_modules"] == json(config.targets));
  CHECK(cfg["fan_in_fan_out"] == true);
  CHECK(cfg["bias"] == "none");
  CHECK(cfg["lora_dropout"] == 0.0);
  CHECK(cfg["base_model_name_or_path"] == "tests/goldens/gpt2/tiny-h5-fp32");

  const auto file = engine::io::SafetensorsFile::open(dir / "adapter/adapter_model.safetensors");
  CHECK(file.keys().size() == 2 * adapters.size());
  for (const auto& [name, adapter] : adapters) {
    const auto& lora = static_cast<const LoRALinear&>(*adapter);
    const std::string key = "base_model.model." + name;
    INFO(key);
    REQUIRE(file.contains(key + ".lora_A.weight"));
    REQUIRE(file.contains(key + ".lora_B.weight"));
    const Tensor a = file.load(key + ".lora_A.weight", DType::F32), b = file.load(key + ".lora_B.weight", DType::F32);
    CHECK(a.shape() == engine::Shape{4, lora.A.size(0)});  // [r, in]
    CHECK(b.shape() == engine::Shape{lora.B.size(1), 4});  // [out, r]
    CHECK(max_abs_difference(a, lora.A.transpose(0, 1)) == 0);
    CHECK(max_abs_difference(b, lora.B.transpose(0, 1)) == 0);
  }
  CHECK(file.contains("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"));

  auto fresh = tiny_model();
  const AdapterConfig loaded = curlora::load_lora_peft(*fresh, dir / "adapter");
  CHECK(loaded.method == Method::LoRA);
  CHECK(loaded.rank == 4);
  CHECK(loaded.alpha == 2.5);
  CHECK(loaded.targets == config.targets);
  CHECK(max_abs_difference(logits_of(*fresh), expected) == 0);
  CHECK(fresh->num_trainable_parameters() == model->num_trainable_parameters());
}

TEST_CASE("PEFT configs: alpha scaling variants and unsupported settings", "[curlora][io][peft][errors]") {
  TempDir dir("peft_errors");
  auto model = tiny_model();
  AdapterConfig config = lora_config();
  config.rank = 3;
  config.alpha = 0.3;  // lora_alpha 0.9 is not an integer: written as a float
  train_a_little(curlora::inject_adapters(*model, config));
  curlora::save_lora_peft(dir / "a", *model, config, "tiny");
  const json original = read_json(dir / "a/adapter_config.json");
  CHECK(original["lora_alpha"].get<double>() == Approx(0.9));
  CHECK(curlora::load_lora_peft(*tiny_model(), dir / "a").alpha == Approx(0.3).epsilon(1e-15));

  auto with = [&](const std::string& key, const json& value) {
    json changed = original;
    changed[key] = value;
    write_json(dir / "a/adapter_config.json", changed);
  };
  with("use_rslora", true);  // PEFT then scales by lora_alpha / sqrt(r)
  CHECK(curlora::load_lora_peft(*tiny_model(), dir / "a").alpha == Approx(0.9 / std::sqrt(3.0)));
  with("use_dora", true);
  CHECK_THROWS_WITH(curlora::load_lora_peft(*tiny_model(), dir / "a"), Catch::Contains("use_dora"));
  with("target_modules", ".*c_attn");
  CHECK_THROWS_WITH(curlora::load_lora_peft(*tiny_model(), dir / "a"), Catch::Contains("regex"));
  with("bias", "all");
  CHECK_THROWS_WITH(curlora::load_lora_peft(*tiny_model(), dir / "a"), Catch::Contains("bias"));
  with("peft_type", "IA3");
  CHECK_THROWS_WITH(curlora::load_lora_peft(*tiny_model(), dir / "a"), Catch::Contains("LORA"));
  with("modules_to_save", json::array({"score"}));
  CHECK_THROWS_WITH(curlora::load_lora_peft(*tiny_model(), dir / "a"), Catch::Contains("modules_to_save"));
  with("r", 5);
  CHECK_THROWS_WITH(curlora::load_lora_peft(*tiny_model(), dir / "a"), Catch::Contains("shape"));
  write_json(dir / "a/adapter_config.json", original);

  // A stray tensor, and a missing one.
  engine::nn::NamedTensors tensors = curlora::load_named_tensors(dir / "a/adapter_model.safetensors");
  tensors.emplace_back("base_model.model.transformer.h.0.attn.c_proj.lora_A.weight", Tensor::zeros({3, 40}));
  curlora::save_named_tensors(dir / "a/adapter_model.safetensors", tensors);
  CHECK_THROWS_WITH(curlora::load_lora_peft(*tiny_model(), dir / "a"), Catch::Contains("no adapted module"));
  tensors.pop_back();
  tensors.pop_back();
  curlora::save_named_tensors(dir / "a/adapter_model.safetensors", tensors);
  CHECK_THROWS_WITH(curlora::load_lora_peft(*tiny_model(), dir / "a"), Catch::Contains("missing"));
  CHECK_THROWS_WITH(curlora::load_lora_peft(*tiny_model(), dir / "nowhere"), Catch::Contains("cannot open"));
}

// ---- named tensors (task heads) ----

TEST_CASE("named tensors and module tensors round-trip", "[curlora][io]") {
  TempDir dir("heads");
  engine::Generator gen(1);
  engine::nn::Linear head(40, 3, gen), other(40, 3, gen), wrong(40, 2, gen);
  curlora::save_module_tensors(dir / "head.safetensors", head);
  CHECK(max_abs_difference(head.weight, other.weight) > 0);
  curlora::load_module_tensors(other, dir / "head.safetensors");
  CHECK(max_abs_difference(head.weight, other.weight) == 0);
  CHECK(max_abs_difference(head.bias, other.bias) == 0);
  CHECK(other.weight.requires_grad());
  CHECK_THROWS_WITH(curlora::load_module_tensors(wrong, dir / "head.safetensors"), Catch::Contains("shape"));

  curlora::save_named_tensors(dir / "named.safetensors",
                              {{"mrpc.weight", head.weight}, {"ids", Tensor::from_vector<int32_t>({1, 2}, {2})}},
                              {{"task", "mrpc"}});
  const engine::nn::NamedTensors back = curlora::load_named_tensors(dir / "named.safetensors");
  REQUIRE(back.size() == 2);
  CHECK(back[0].first == "ids");  // sorted by name
  CHECK(back[0].second.dtype() == DType::I32);
  CHECK(max_abs_difference(back[1].second, head.weight) == 0);
}

// ---- against PyTorch ----

TEST_CASE("CURLoRA and LoRA loss and adapter gradients match PyTorch", "[curlora][golden]") {
  const std::string cur_path = golden_dir() + "/adapters/curlora.safetensors";
  const std::string lora_path = golden_dir() + "/adapters/lora.safetensors";
  if (!fs::exists(cur_path) || !fs::exists(lora_path)) {
    WARN("no adapter goldens in tests/goldens/adapters: run tools/goldens/make_adapter_goldens.py");
    return;
  }
  for (const std::string& path : {cur_path, lora_path}) {
    const auto golden = engine::io::SafetensorsFile::open(path);
    const bool cur = path == cur_path;
    REQUIRE(golden.metadata().at("model").ends_with("tiny-h5-fp32"));
    AdapterConfig config;
    config.method = cur ? Method::CurLoRA : Method::LoRA;
    config.rank = std::stoll(golden.metadata().at("rank"));
    config.alpha = std::stod(golden.metadata().at("alpha"));
    config.targets = json::parse(golden.metadata().at("targets")).get<std::vector<std::string>>();
    const Tensor ids = golden.load("input_ids", DType::I32), mask = golden.load("attention_mask", DType::I32);

    // f64 checks the formula tightly; f32 is what training runs.
    for (DType dtype : {DType::F64, DType::F32}) {
      const bool f64 = dtype == DType::F64;
      INFO(path << (f64 ? " in f64" : " in f32"));
      auto model = tiny_model(dtype);
      std::vector<std::pair<std::string, curlora::CurSelection>> selections;
      for (const auto& s : curlora::count_parameters(model->config(), config).adapted)
        if (cur)
          selections.emplace_back(s, curlora::CurSelection{golden.load(s + ".cols", DType::I32).to_vector<int32_t>(),
                                                           golden.load(s + ".rows", DType::I32).to_vector<int32_t>()});
      const curlora::Adapters adapters =
          cur ? curlora::inject_curlora(*model, config, selections) : curlora::inject_adapters(*model, config);
      for (const auto& [name, adapter] : adapters)
        for (const auto& [tname, t] : adapter->trainable_tensors()) {
          engine::NoGradGuard no_grad;
          Tensor(t).copy_(golden.load(name + "." + tname, dtype));
        }

      const Tensor logits = model->forward(ids, mask);
      const Tensor loss = lm_loss(logits, ids, mask);
      const double golden_loss = golden.load("loss", DType::F64).item();
      CHECK(loss.item() == Approx(golden_loss).epsilon(f64 ? 1e-12 : 1e-6));
      // Logits at real tokens (padded positions are not part of the contract, as in test_gpt2).
      const Tensor golden_logits = golden.load("logits", DType::F64);
      const std::vector<int32_t> real = mask.to_vector<int32_t>();
      for (int64_t b = 0; b < ids.size(0); ++b)
        for (int64_t t = 0; t < ids.size(1); ++t)
          if (real[size_t(b * ids.size(1) + t)])
            CHECK(max_abs_difference(logits.select(0, b).select(0, t), golden_logits.select(0, b).select(0, t)) <
                  (f64 ? 1e-6 : 1e-4));
      loss.backward();
      for (const auto& [name, adapter] : adapters)
        for (const auto& [tname, t] : adapter->trainable_tensors()) {
          INFO(name << ".grad_" << tname);
          const Tensor expected = golden.load(name + ".grad_" + tname, DType::F64);
          REQUIRE(t.grad().defined());
          REQUIRE(t.grad().shape() == expected.shape());
          REQUIRE(max_abs(expected) > 0);
          const double relative_error = max_abs_difference(t.grad(), expected) / max_abs(expected);
          // f32: rounding (seen: 6e-7). f64: bounded by the attention kernel,
          // which keeps its log-sum-exp in f32 for every dtype (seen: 5e-8).
          CHECK(relative_error < (f64 ? 1e-6 : 5e-5));
        }
    }
    if (cur) {
      // The reference code's selection probabilities, on the first adapted weight.
      const std::string first = "transformer.h.0.attn.c_attn";
      auto model = tiny_model(DType::F64);
      const auto p = curlora::selection_probabilities(model->get_parameter(first + ".weight"));
      testing::require_close(
          Tensor::from_vector<double>(curlora::inverted_probabilities(p.cols, 1e-3), {int64_t(p.cols.size())}),
          golden.load(first + ".col_probs", DType::F64).to_vector<double>(), 1e-10);
      testing::require_close(
          Tensor::from_vector<double>(curlora::inverted_probabilities(p.rows, 1e-3), {int64_t(p.rows.size())}),
          golden.load(first + ".row_probs", DType::F64).to_vector<double>(), 1e-10);
    }
  }
}
