// curlora info | generate | perplexity: the GPT-2 model commands.
#include "curlora/inject.h"
#include "data/gpt2_tokenizer.h"
#include "data/wikitext.h"
#include "engine/error.h"
#include "engine/nn/layers.h"
#include "engine/precision.h"
#include "models/generate.h"
#include "models/gpt2.h"
#include "models/perplexity.h"
#include "tools/cli/commands.h"
#include "tools/cli/progress.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>

namespace cli {

namespace fs = std::filesystem;
using engine::DType;
using engine::Device;

namespace {

// 774030080 -> "774,030,080"
std::string with_commas(int64_t n) {
  std::string digits = std::to_string(n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0 && digits[i - 1] != '-') out += ',';
    out += digits[i];
  }
  return out;
}

// The dtype matmuls and attention compute in: f32, or bf16 (mixed precision).
DType parse_compute_dtype(const std::string& name) {
  if (name == "fp32" || name == "f32") return DType::F32;
  if (name == "bf16") return DType::BF16;
  engine::fail("unknown dtype '{}': expected fp32, or bf16 for mixed precision", name);
}

models::GPT2Config config_of(const std::string& model) {
  if (models::GPT2Config::is_builtin(model) && !fs::exists(model)) return models::GPT2Config::builtin(model);
  engine::check(fs::is_directory(model), "model '{}': not a folder, and not one of gpt2, gpt2-medium, gpt2-large, gpt2-xl",
                model);
  return models::GPT2Config::from_file((fs::path(model) / "config.json").string());
}

// The model's own tokenizer files, else --tokenizer, else the shared GPT-2 tokenizer.
data::GPT2Tokenizer tokenizer_for(const std::string& model, const std::string& explicit_dir) {
  if (!explicit_dir.empty()) return data::GPT2Tokenizer::from_dir(explicit_dir);
  if (fs::exists(fs::path(model) / "vocab.json") || fs::exists(fs::path(model) / "encoder.json"))
    return data::GPT2Tokenizer::from_dir(model);
  const char* data_dir = std::getenv("CURLORA_DATA_DIR");
  engine::check(data_dir != nullptr, "model '{}' has no tokenizer files: pass --tokenizer DIR or set CURLORA_DATA_DIR",
                model);
  return data::GPT2Tokenizer::from_dir((fs::path(data_dir) / "gpt2-tokenizer").string());
}

// Options every model command shares.
struct ModelOptions {
  std::string model, device = "cpu", dtype = "fp32", tokenizer;
  uint64_t init_seed = 0;

  void add(CLI::App& app, bool with_tokenizer) {
    app.add_option("model", model, "Hugging Face GPT-2 folder, or gpt2|gpt2-medium|gpt2-large|gpt2-xl (random weights)")
        ->required();
    app.add_option("--device", device, "cpu, cuda or cuda:N")->capture_default_str();
    app.add_option("--dtype", dtype,
                   "fp32, or bf16: mixed precision as torch.autocast (bf16 matmuls and attention, bf16 Linear "
                   "weights; layer norm, softmax and the loss in f32)")
        ->capture_default_str();
    app.add_option("--init-seed", init_seed, "seed of the random weights of a built-in size")->capture_default_str();
    if (with_tokenizer) app.add_option("--tokenizer", tokenizer, "folder with vocab.json + merges.txt");
  }
  DType compute() const { return parse_compute_dtype(dtype); }
  // In f32; under bf16 (engine/precision.h) every weight is frozen, as these
  // commands only infer, and the Linear ones are stored in bf16. The caller
  // holds an AutocastGuard(compute()) while it runs the model.
  std::shared_ptr<models::GPT2LMHeadModel> load() const {
    const DType precision = compute();
    auto gpt2 = models::GPT2LMHeadModel::load(model, DType::F32, Device::parse(device), init_seed);
    if (precision == DType::BF16) {
      gpt2->freeze("*");
      engine::nn::store_frozen_linear_weights(*gpt2, DType::BF16);
    }
    return gpt2;
  }
};

}  // namespace

Command add_info(CLI::App& app) {
  auto model = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  auto adapter = std::make_shared<std::string>();
  auto adapter_config = std::make_shared<curlora::AdapterConfig>();
  app.add_option("model", *model, "Hugging Face GPT-2 folder, or gpt2|gpt2-medium|gpt2-large|gpt2-xl")->required();
  app.add_flag("--json", *json, "print JSON");
  app.add_option("--adapter", *adapter, "count with an adapter injected: curlora or lora");
  app.add_option("--rank", adapter_config->rank, "adapter rank")->capture_default_str();
  app.add_option("--alpha", adapter_config->alpha, "adapter scale")->capture_default_str();
  app.add_option("--targets", adapter_config->targets, "module names to adapt (default attn.c_attn)");
  return [=] {
    models::GPT2Config config = config_of(*model);
    int64_t total = config.num_parameters(), trainable = total;
    nlohmann::json out = {{"model", *model}, {"config", config.to_json()}};
    if (!adapter->empty()) {  // counted from the config alone: no weights are built
      curlora::AdapterConfig ac = *adapter_config;
      ac.method = curlora::parse_method(*adapter);
      curlora::ParameterCounts counts = curlora::count_parameters(config, ac);
      total = counts.base + counts.trainable;
      trainable = counts.trainable;
      out["adapter"] = {{"method", *adapter}, {"rank", ac.rank}, {"alpha", ac.alpha}, {"targets", ac.targets},
                        {"adapted_modules", counts.adapted.size()}};
    }
    out["parameters"] = {{"total", total}, {"trainable", trainable}};
    if (*json) {
      std::puts(out.dump(1).c_str());
      return;
    }
    fmt::print("model        {}\n", *model);
    fmt::print("layers       {}\nheads        {} (head dim {})\nwidth        {}\nmlp width    {}\n", config.n_layer,
               config.n_head, config.head_dim(), config.n_embd, config.inner_dim());
    fmt::print("context      {}\nvocabulary   {}\ntied head    {}\n", config.n_positions, config.vocab_size,
               config.tie_word_embeddings ? "yes" : "no");
    fmt::print("dropout      embd {} attn {} resid {}\n", config.embd_pdrop, config.attn_pdrop, config.resid_pdrop);
    if (out.contains("adapter"))
      fmt::print("adapter      {} rank {} alpha {} on {} modules\n", *adapter, adapter_config->rank,
                 adapter_config->alpha, out["adapter"]["adapted_modules"].get<size_t>());
    fmt::print("parameters   {} total, {} trainable\n", with_commas(total), with_commas(trainable));
  };
}

Command add_generate(CLI::App& app) {
  auto opts = std::make_shared<ModelOptions>();
  auto sampling = std::make_shared<models::SamplingOptions>();
  auto prompt = std::make_shared<std::string>();
  auto no_stop = std::make_shared<bool>(false);
  opts->add(app, true);
  app.add_option("--prompt", *prompt, "text to continue")->required();
  app.add_option("--max-new-tokens", sampling->max_new_tokens)->capture_default_str();
  app.add_option("--temperature", sampling->temperature)->capture_default_str();
  app.add_option("--top-k", sampling->top_k, "keep the k most likely tokens (0: all)")->capture_default_str();
  app.add_option("--top-p", sampling->top_p, "nucleus sampling mass")->capture_default_str();
  app.add_option("--seed", sampling->seed)->capture_default_str();
  app.add_flag("--greedy", sampling->greedy, "always take the most likely token");
  app.add_flag("--no-stop", *no_stop, "keep going past <|endoftext|>");
  return [=] {
    data::GPT2Tokenizer tokenizer = tokenizer_for(opts->model, opts->tokenizer);
    auto model = opts->load();
    const engine::AutocastGuard autocast(opts->compute());
    models::SamplingOptions options = *sampling;
    options.stop_token = *no_stop ? -1 : tokenizer.eot_id();
    std::vector<int32_t> ids = tokenizer.encode(*prompt);
    std::fputs(prompt->c_str(), stdout);
    // Decode a growing suffix so that characters split across tokens print whole.
    std::vector<int32_t> pending;
    models::generate(*model, ids, options, [&](int32_t token) {
      if (token == options.stop_token) return;
      pending.push_back(token);
      std::string text = tokenizer.decode(pending);
      if (!text.empty() && (static_cast<unsigned char>(text.back()) < 0x80)) {
        std::fputs(text.c_str(), stdout);
        std::fflush(stdout);
        pending.clear();
      }
    });
    std::fputs(tokenizer.decode(pending).c_str(), stdout);
    std::fputc('\n', stdout);
  };
}

Command add_perplexity(CLI::App& app) {
  auto opts = std::make_shared<ModelOptions>();
  auto file = std::make_shared<std::string>();
  auto format = std::make_shared<std::string>("raw");
  auto max_length = std::make_shared<int64_t>(1024);
  auto stride = std::make_shared<int64_t>(512);
  auto max_tokens = std::make_shared<int64_t>(0);
  auto single = std::make_shared<bool>(false);
  auto json = std::make_shared<bool>(false);
  opts->add(app, true);
  app.add_option("--file", *file, "text file to score")->required();
  app.add_option("--format", *format,
                 "raw: the file as is; wikitext: rows joined by blank lines (transformers docs); "
                 "wikitext-paper: non-blank lines joined with nothing (the paper's code)")
      ->capture_default_str();
  app.add_option("--max-length", *max_length, "window length")->capture_default_str();
  app.add_option("--stride", *stride, "window step")->capture_default_str();
  app.add_option("--max-tokens", *max_tokens, "score only the first N tokens (0: all)")->capture_default_str();
  app.add_flag("--single-window", *single, "one forward pass over the first max-length tokens (the paper's code)");
  app.add_flag("--json", *json, R"(print {"tokens":..,"scored":..,"ppl":..})");
  return [=] {
    data::WikiTextJoin join = *format == "raw"              ? data::WikiTextJoin::Raw
                              : *format == "wikitext"       ? data::WikiTextJoin::HfDocs
                              : *format == "wikitext-paper" ? data::WikiTextJoin::PaperCode
                                                            : (engine::fail("unknown --format '{}'", *format), data::WikiTextJoin::Raw);
    data::GPT2Tokenizer tokenizer = tokenizer_for(opts->model, opts->tokenizer);
    std::vector<int32_t> ids = tokenizer.encode(data::join_wikitext(data::read_text_file(*file), join));
    if (*max_tokens > 0 && int64_t(ids.size()) > *max_tokens) ids.resize(size_t(*max_tokens));
    auto model = opts->load();
    const engine::AutocastGuard autocast(opts->compute());
    Progress progress("perplexity", "tok");
    models::PerplexityResult r =
        *single ? models::single_window_perplexity(*model, ids, *max_length)
                : models::sliding_window_perplexity(*model, ids, *max_length, *stride,
                                                    [&](int64_t done, int64_t total) { progress.update(done, total); });
    progress.finish();
    if (*json) {
      std::puts(nlohmann::json({{"tokens", r.tokens}, {"scored", r.scored}, {"nll_sum", r.nll_sum}, {"ppl", r.ppl()}})
                    .dump()
                    .c_str());
    } else {
      fmt::print("{} tokens, {} scored, perplexity {:.4f}\n", r.tokens, r.scored, r.ppl());
    }
  };
}

}  // namespace cli
