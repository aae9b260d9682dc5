// What the perplexity tests read: WikiText-2 test as transformers' recipe
// tokenizes it, and the figures transformers computed on it
// (tests/goldens/gpt2/perplexity.json, from tools/goldens/make_gpt2_goldens.py).
#pragma once

#include "data/gpt2_tokenizer.h"
#include "data/wikitext.h"
#include "tests/test_data.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <fstream>
#include <vector>

inline nlohmann::json perplexity_golden() {
  std::ifstream in(golden_dir() + "/gpt2/perplexity.json");
  REQUIRE(in.good());
  return nlohmann::json::parse(in);
}

// The test file's rows joined with "\n\n", tokenized; the first max_tokens (0: all).
inline std::vector<int32_t> wikitext_ids(int64_t max_tokens) {
  const std::string data = test_data_dir();
  data::GPT2Tokenizer tokenizer = data::GPT2Tokenizer::from_dir(data + "/gpt2-mini-wiki");
  std::vector<int32_t> ids = tokenizer.encode(data::join_wikitext(
      data::read_text_file(data + "/wikitext-2-raw/wiki.test.raw"), data::WikiTextJoin::HfDocs));
  if (max_tokens > 0 && int64_t(ids.size()) > max_tokens) ids.resize(size_t(max_tokens));
  return ids;
}
