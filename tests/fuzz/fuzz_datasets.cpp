// libFuzzer harness for the dataset readers (GLUE TSV, Sentiment140 CSV, task TSV/JSONL)
// and the batching that follows them: any input must either give a Dataset or throw
// engine::Error. The data code is built with the sanitizers; the engine library may be the
// GCC-built one (clang 14 cannot compile all of engine/):
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fopenmp -I. tests/fuzz/fuzz_datasets.cpp \
//     data/datasets.cpp data/batching.cpp data/wikitext.cpp data/gpt2_tokenizer.cpp build/engine/libengine.a \
//     -lopenblas -lfmt -lpcre2-8 -lgomp -o build/fuzz_datasets
//   build/fuzz_datasets -max_total_time=60 -max_len=4096 CORPUS_DIR SEED_DIR
// A seed is one control byte (format = byte % 5, see options_from) and a few lines of a real file.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "data/batching.h"
#include "data/datasets.h"
#include "engine/error.h"

namespace {

// The first input byte picks the format and the options; the rest is the file.
data::ReadOptions options_from(uint8_t control) {
  data::ReadOptions options;
  if (control & 0x08) options.max_rows = size_t(control >> 6);  // 0..3 rows
  if (control & 0x10) options.labels = data::sentiment140_paper_labels();
  if (control & 0x20) options.labels = data::sentiment140_three_class_labels();
  return options;
}

// Batches of the parsed examples, their bytes standing in for token ids, so the
// batching code sees whatever lengths and labels the parser let through.
void batch_everything(const data::Dataset& dataset, uint8_t control) {
  data::TokenizedDataset tokens;
  tokens.source = dataset.source;
  tokens.max_length = 64;
  for (const data::Example& e : dataset.examples) {
    std::string joined = e.text + e.text_pair.value_or("");
    std::vector<int32_t> ids(joined.begin(), joined.begin() + std::min<size_t>(joined.size(), 64));
    if (ids.empty()) ids.push_back(0);
    tokens.ids.push_back(ids);
    tokens.labels.push_back(e.label);
  }
  data::BatchOptions options;
  options.batch_size = 1 + (control & 3);
  options.bucket_batches = (control >> 2) & 1;
  options.pad_to_max_length = control & 0x80;
  for (const auto& rows : data::epoch_batches(tokens, options, control)) {
    data::Batch batch = data::make_batch(tokens, rows, options);
    (void)batch;
  }
  if (!dataset.examples.empty()) (void)data::balanced_sample(dataset, 1, control);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  uint8_t control = data[0];
  std::string_view bytes(reinterpret_cast<const char*>(data + 1), size - 1);
  auto format = static_cast<data::DatasetFormat>(control % 5);
  try {
    data::Dataset dataset = data::parse_dataset(bytes, format, "fuzz", options_from(control));
    batch_everything(dataset, control);
  } catch (const engine::Error&) {
    // Rejecting malformed input is the expected outcome; anything else escapes and aborts.
  }
  return 0;
}
