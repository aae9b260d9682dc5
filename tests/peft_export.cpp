// peft_export: our half of the PEFT interop check (tools/peft_interop.py is
// the other half; both run on the machine where peft is installed).
//
//   peft_export export DIR [MODEL]  writes DIR/adapter (a LoRA adapter in PEFT's
//       format, with non-zero B) and DIR/ours.safetensors (input_ids,
//       attention_mask and our logits with that adapter) for MODEL.
//   peft_export verify DIR [MODEL]  loads DIR/peft_adapter (written by PEFT)
//       and checks our logits against DIR/peft_logits.safetensors.
//
// MODEL defaults to tests/goldens/gpt2/tiny-h5-fp32. Exit status 0 on success.
#include "curlora/adapter_io.h"
#include "engine/io/safetensors.h"
#include "engine/ops.h"

#include <cstdio>
#include <filesystem>
#include <string>

namespace fs = std::filesystem;
using engine::DType;
using engine::Tensor;

namespace {

// Two rows, the second right-padded: the same batch shape the script uses.
std::pair<Tensor, Tensor> fixed_batch(int64_t vocab) {
  const int64_t B = 2, T = 7, pad_from = 4;
  std::vector<int32_t> ids, mask;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const bool real = b == 0 || t < pad_from;
      ids.push_back(real ? int32_t((37 * (b * T + t) + 11) % vocab) : int32_t(vocab - 1));
      mask.push_back(real ? 1 : 0);
    }
  return {Tensor::from_vector<int32_t>(ids, {B, T}), Tensor::from_vector<int32_t>(mask, {B, T})};
}

// The largest |a - b| over positions the mask keeps.
double max_difference(const Tensor& a, const Tensor& b, const Tensor& mask) {
  engine::check(a.shape() == b.shape(), "logits shapes {} and {} differ", engine::shape_str(a.shape()),
                engine::shape_str(b.shape()));
  const std::vector<float> x = a.to_vector<float>(), y = b.to_vector<float>();
  const std::vector<int32_t> m = mask.to_vector<int32_t>();
  const size_t V = size_t(a.size(-1));
  double worst = 0;
  for (size_t pos = 0; pos < m.size(); ++pos)
    if (m[pos])
      for (size_t v = 0; v < V; ++v) worst = std::max(worst, double(std::abs(x[pos * V + v] - y[pos * V + v])));
  return worst;
}

int export_adapter(const fs::path& dir, const std::string& model_dir) {
  auto model = models::GPT2LMHeadModel::load(model_dir);
  model->eval();
  curlora::AdapterConfig config;
  config.method = curlora::Method::LoRA;
  config.rank = 4;
  config.alpha = 2.0;
  config.targets = {"attn.c_attn", "mlp.c_proj"};
  config.seed = 11;
  const curlora::Adapters adapters = curlora::inject_adapters(*model, config);
  {
    // B starts at zero; a non-zero B makes the check mean something.
    engine::NoGradGuard no_grad;
    engine::Generator gen(12);
    for (const auto& [name, adapter] : adapters) {
      auto& lora = static_cast<curlora::LoRALinear&>(*adapter);
      lora.B.copy_(Tensor::randn(lora.B.shape(), gen, 0.0, 0.05));
    }
  }
  curlora::save_lora_peft((dir / "adapter").string(), *model, config, model_dir);
  auto [ids, mask] = fixed_batch(model->config().vocab_size);
  engine::NoGradGuard no_grad;
  const Tensor logits = model->forward(ids, mask);
  engine::io::save_safetensors((dir / "ours.safetensors").string(),
                               {{"input_ids", ids}, {"attention_mask", mask}, {"logits", logits}});
  std::printf("peft_export: wrote %s/adapter and ours.safetensors (%zu adapted layers)\n", dir.c_str(),
              adapters.size());
  return 0;
}

int verify_adapter(const fs::path& dir, const std::string& model_dir) {
  auto model = models::GPT2LMHeadModel::load(model_dir);
  model->eval();
  const curlora::AdapterConfig config = curlora::load_lora_peft(*model, (dir / "peft_adapter").string());
  const auto golden = engine::io::SafetensorsFile::open((dir / "peft_logits.safetensors").string());
  const Tensor ids = golden.load("input_ids", DType::I32), mask = golden.load("attention_mask", DType::I32);
  engine::NoGradGuard no_grad;
  const double worst = max_difference(model->forward(ids, mask), golden.load("logits", DType::F32), mask);
  std::printf("peft_export verify: PEFT-written adapter (r %lld, alpha %g, %zu targets): max |logit difference| %.3g\n",
              static_cast<long long>(config.rank), config.alpha, config.targets.size(), worst);
  return worst <= 1e-4 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || (std::string(argv[1]) != "export" && std::string(argv[1]) != "verify")) {
    std::fprintf(stderr, "usage: peft_export export|verify DIR [MODEL_DIR]\n");
    return 2;
  }
  const std::string model_dir = argc > 3 ? argv[3] : CURLORA_SOURCE_ROOT "/tests/goldens/gpt2/tiny-h5-fp32";
  try {
    fs::create_directories(argv[2]);
    return std::string(argv[1]) == "export" ? export_adapter(argv[2], model_dir) : verify_adapter(argv[2], model_dir);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft_export: %s\n", e.what());
    return 1;
  }
}
