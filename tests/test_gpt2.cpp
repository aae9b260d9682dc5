// GPT-2 against Hugging Face: logits, loss and greedy continuations from
// random-initialised transformers models saved in fp32 and fp16
// (tests/goldens/gpt2, made by tools/goldens/make_gpt2_goldens.py), plus
// config validation and checkpoint errors.
#include "engine/backend.h"
#include "engine/io/safetensors.h"
#include "engine/ops.h"
#include "models/generate.h"
#include "models/gpt2.h"
#include "tests/gradcheck.h"
#include "tests/test_data.h"

#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>

namespace fs = std::filesystem;
using engine::DType;
using engine::Tensor;
using models::GPT2Config;
using models::GPT2LMHeadModel;

namespace {

std::vector<std::string> golden_models() {
  std::vector<std::string> dirs;
  fs::path root = fs::path(golden_dir()) / "gpt2";
  if (!fs::exists(root)) return dirs;
  for (const auto& entry : fs::directory_iterator(root))
    if (fs::exists(entry.path() / "golden.safetensors")) dirs.push_back(entry.path().string());
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

// HF's LM loss: logits[:, t] predicts ids[:, t+1]; padded labels are -100.
double lm_loss(const Tensor& logits, const Tensor& ids, const Tensor& mask) {
  const int64_t B = ids.size(0), T = ids.size(1);
  std::vector<int32_t> id = ids.to_vector<int32_t>(), m = mask.to_vector<int32_t>();
  std::vector<int32_t> targets;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t + 1 < T; ++t) {
      size_t next = size_t(b * T + t + 1);
      targets.push_back(m[next] ? id[next] : -100);
    }
  Tensor shifted = logits.slice(1, 0, T - 1).reshape({B * (T - 1), -1});
  return engine::cross_entropy(shifted, Tensor::from_vector<int32_t>(targets, {B * (T - 1)})).item();
}

}  // namespace

TEST_CASE("logits, loss and greedy ids match transformers", "[gpt2][golden]") {
  // The goldens are committed (tools/goldens/make_gpt2_goldens.py writes them).
  std::vector<std::string> dirs = golden_models();
  REQUIRE(dirs.size() >= 6);
  // On the CPU always, and on the GPU too where there is one (f32, TF32 off).
  std::vector<engine::Device> devices{engine::Device::cpu()};
  if (engine::cuda_available()) devices.push_back(engine::Device::cuda(0));
  for (const engine::Device device : devices) {
    for (const std::string& dir : dirs) {
      INFO("golden model " << dir << " on " << device.str());
      auto model = GPT2LMHeadModel::load(dir, DType::F32, device);
      model->eval();
      auto golden = engine::io::SafetensorsFile::open(dir + "/golden.safetensors");
      Tensor ids = golden.load("input_ids", DType::I32), mask = golden.load("attention_mask", DType::I32);
      Tensor expected = golden.load("logits", DType::F32);
      engine::NoGradGuard no_grad;
      Tensor logits = model->forward(ids.to(device), mask.to(device)).to(engine::Device::cpu());
      REQUIRE(logits.shape() == expected.shape());
      // Compare every position that is not padding (padded rows are undefined in HF too).
      std::vector<int32_t> m = mask.to_vector<int32_t>();
      std::vector<float> got = logits.to_vector<float>(), want = expected.to_vector<float>();
      const size_t V = size_t(logits.size(2));
      double worst = 0;
      for (size_t pos = 0; pos < m.size(); ++pos)
        if (m[pos])
          for (size_t v = 0; v < V; ++v) worst = std::max(worst, double(std::abs(got[pos * V + v] - want[pos * V + v])));
      CHECK(worst < 1e-4);
      CHECK(lm_loss(logits, ids, mask) == Approx(golden.load("loss", DType::F64).item()).margin(1e-5));

      Tensor prompt = golden.load("prompt_ids", DType::I32), greedy = golden.load("greedy_ids", DType::I32);
      std::vector<int32_t> prompt_ids = prompt.to_vector<int32_t>(), all = greedy.to_vector<int32_t>();
      models::SamplingOptions options;
      options.greedy = true;
      options.max_new_tokens = int64_t(all.size() - prompt_ids.size());
      std::vector<int32_t> continuation = models::generate(*model, prompt_ids, options);
      CHECK(continuation == std::vector<int32_t>(all.begin() + long(prompt_ids.size()), all.end()));
    }
  }
}

TEST_CASE("the KV cache gives the same logits as a full forward", "[gpt2]") {
  GPT2Config config = GPT2Config::builtin("gpt2");
  config.n_layer = 2, config.n_embd = 40, config.n_head = 5, config.vocab_size = 97, config.n_positions = 32;
  engine::Generator gen(3);
  GPT2LMHeadModel model(config, engine::nn::VarBuilder(std::make_shared<engine::nn::RandomSource>(gen, DType::F64,
                                                                                                   engine::Device::cpu())));
  model.eval();
  engine::NoGradGuard no_grad;
  Tensor ids = Tensor::from_vector<int32_t>({5, 17, 3, 88, 42, 0, 9}, {1, 7});
  Tensor full = model.forward(ids);
  models::KVCache cache;
  Tensor first = model.forward(ids.slice(1, 0, 4), Tensor(), &cache);
  Tensor second = model.forward(ids.slice(1, 4, 7), Tensor(), &cache);
  CHECK(cache.length() == 7);
  testing::require_close(engine::cat({first, second}, 1), full.to_vector<double>(), 1e-10);
}

TEST_CASE("training mode drops attention probabilities with attn_pdrop, reproducibly", "[gpt2][dropout]") {
  // Only attn_pdrop is set, so every random draw of the forward is attention dropout.
  GPT2Config config = GPT2Config::builtin("gpt2");
  config.n_layer = 2, config.n_embd = 40, config.n_head = 5, config.vocab_size = 97, config.n_positions = 32;
  config.embd_pdrop = config.resid_pdrop = 0;
  auto make = [&](double attn_pdrop) {
    config.attn_pdrop = attn_pdrop;
    engine::Generator init(3);
    return std::make_shared<GPT2LMHeadModel>(
        config, engine::nn::VarBuilder(std::make_shared<engine::nn::RandomSource>(init, DType::F64,
                                                                                  engine::Device::cpu())),
        /*dropout_seed=*/11);
  };
  engine::NoGradGuard no_grad;
  const Tensor ids = Tensor::from_vector<int32_t>({5, 17, 3, 88, 42, 0, 9, 1, 2, 3, 4, 5, 6, 7}, {2, 7});
  auto model = make(0.5);
  model->eval();
  const std::vector<double> eval_logits = model->forward(ids).to_vector<double>();

  model->train();
  const std::vector<double> train_logits = model->forward(ids).to_vector<double>();
  // One 16-bit uniform per probability: 2 layers x [B 2, H 5, T 7, T 7], eight per Philox block.
  CHECK(model->dropout_generator().offset() == uint64_t(2 * ((2 * 5 * 7 * 7 + 7) / 8)));
  double largest_change = 0;
  for (size_t i = 0; i < eval_logits.size(); ++i)
    largest_change = std::max(largest_change, std::abs(train_logits[i] - eval_logits[i]));
  CHECK(largest_change > 1e-3);

  auto twin = make(0.5);  // the same dropout seed draws the same masks
  twin->train();
  testing::require_close(twin->forward(ids), train_logits, 0.0);

  auto no_dropout = make(0.0);  // p = 0 in training is the eval forward
  no_dropout->train();
  testing::require_close(no_dropout->forward(ids), eval_logits, 0.0);
}

TEST_CASE("parameter counts of the published sizes", "[gpt2]") {
  // transformers' GPT2LMHeadModel.num_parameters() for each size.
  CHECK(GPT2Config::builtin("gpt2").num_parameters() == 124439808);
  CHECK(GPT2Config::builtin("gpt2-medium").num_parameters() == 354823168);
  CHECK(GPT2Config::builtin("gpt2-large").num_parameters() == 774030080);
  CHECK(GPT2Config::builtin("gpt2-xl").num_parameters() == 1557611200);
  GPT2Config small = GPT2Config::builtin("gpt2");
  small.n_layer = 3, small.n_embd = 48, small.n_head = 4, small.vocab_size = 101, small.n_positions = 16;
  engine::Generator gen(0);
  GPT2LMHeadModel model(small, engine::nn::VarBuilder(std::make_shared<engine::nn::RandomSource>(gen, DType::F32,
                                                                                                  engine::Device::cpu())));
  CHECK(model.num_parameters() == small.num_parameters());
  CHECK(model.named_parameters().front().first == "transformer.wte.weight");
}

TEST_CASE("unsupported configs and broken checkpoints are clear errors", "[gpt2][errors]") {
  auto parse = [](const std::string& text) { return GPT2Config::from_json(nlohmann::json::parse(text), "config.json"); };
  CHECK_THROWS_WITH(parse(R"({"activation_function": "relu"})"), Catch::Contains("'relu' is not supported"));
  CHECK_THROWS_WITH(parse(R"({"n_embd": 100, "n_head": 3})"), Catch::Contains("not divisible"));
  CHECK_THROWS_WITH(parse(R"({"n_layer": "12"})"), Catch::Contains("'n_layer' has the wrong type"));
  CHECK_THROWS_WITH(parse(R"({"model_type": "llama"})"), Catch::Contains("is not gpt2"));
  CHECK_THROWS_WITH(parse(R"({"add_cross_attention": true})"), Catch::Contains("add_cross_attention"));
  CHECK_THROWS_WITH(GPT2Config::builtin("gpt3"), Catch::Contains("unknown model 'gpt3'"));

  // A checkpoint with a misshaped tensor names the key and both shapes.
  fs::path dir = fs::temp_directory_path() / "curlora_test_gpt2_bad";
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << R"({"n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 10, "n_positions": 4})";
  engine::io::save_safetensors((dir / "model.safetensors").string(), {{"wte.weight", Tensor::zeros({10, 9})}});
  CHECK_THROWS_WITH(GPT2LMHeadModel::load(dir.string()),
                    Catch::Contains("'wte.weight' has shape [10, 9], the model expects [10, 8]"));
  engine::io::save_safetensors((dir / "model.safetensors").string(), {{"wte.weight", Tensor::zeros({10, 8})}});
  CHECK_THROWS_WITH(GPT2LMHeadModel::load(dir.string()), Catch::Contains("tensor 'transformer.wpe.weight' of shape [4, 8] is missing"));
  fs::remove_all(dir);
  CHECK_THROWS_WITH(GPT2LMHeadModel::load("/nonexistent/model"), Catch::Contains("not a folder"));
}
