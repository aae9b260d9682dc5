// gpt2-mini-wiki's perplexity over the whole WikiText-2 test file (287,643
// targets) on CUDA against transformers' figure. Minutes on two CPU cores, so
// it runs on the GPU only: exits 77 (SKIP in Meson) without a GPU or the data.
#define CATCH_CONFIG_RUNNER
#include "engine/backend.h"
#include "models/perplexity.h"
#include "tests/perplexity_data.h"

#include <cstdio>
#include <filesystem>

int main(int argc, char** argv) {
  if (!engine::cuda_available()) {
    std::fprintf(stderr, "SKIP: no CUDA device\n");
    return 77;
  }
  if (!std::filesystem::is_directory(test_data_dir())) {
    std::fprintf(stderr, "SKIP: data folder '%s' not found; set CURLORA_DATA_DIR\n", test_data_dir().c_str());
    return 77;
  }
  return Catch::Session().run(argc, argv);
}

TEST_CASE("gpt2-mini-wiki perplexity on the whole WikiText-2 test file matches transformers", "[perplexity][cuda]") {
  const nlohmann::json golden = perplexity_golden();
  auto model = models::GPT2LMHeadModel::load(test_data_dir() + "/gpt2-mini-wiki", engine::DType::F32,
                                             engine::Device::cuda(0));
  const std::vector<int32_t> ids = wikitext_ids(0);
  CHECK(int64_t(ids.size()) == golden["tokens"].get<int64_t>());
  const models::PerplexityResult r = models::sliding_window_perplexity(*model, ids, 1024, 512);
  CHECK(r.scored == golden["scored"].get<int64_t>());
  CHECK(r.ppl() == Approx(golden["ppl"].get<double>()).epsilon(1e-3));  // the issue asks for 0.1%
}
