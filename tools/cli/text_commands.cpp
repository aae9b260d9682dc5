// curlora tokenize: GPT-2 ids of standard input.
#include "data/gpt2_tokenizer.h"
#include "engine/error.h"
#include "tools/cli/commands.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <iostream>
#include <iterator>
#include <memory>

namespace cli {

Command add_tokenize(CLI::App& app) {
  auto dir = std::make_shared<std::string>();
  auto jsonl = std::make_shared<bool>(false);
  auto as_text = std::make_shared<bool>(false);
  app.add_option("tokenizer", *dir, "folder with vocab.json + merges.txt (or encoder.json + vocab.bpe)")->required();
  app.add_flag("--jsonl", *jsonl, "each input line is a JSON string; each output line a JSON array of ids");
  app.add_flag("--special-as-text", *as_text, "encode <|endoftext|> as plain text, not as id 50256");
  return [=] {
    data::GPT2Tokenizer tokenizer = data::GPT2Tokenizer::from_dir(*dir);
    auto mode = *as_text ? data::SpecialTokens::AsText : data::SpecialTokens::Recognize;
    if (!*jsonl) {
      std::string text((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
      fmt::print("{}\n", fmt::join(tokenizer.encode(text, mode), " "));
      return;
    }
    std::string line;
    for (int64_t number = 1; std::getline(std::cin, line); ++number) {
      nlohmann::json value = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      engine::check(value.is_string(), "stdin line {}: expected a JSON string", number);
      fmt::print("{}\n", nlohmann::json(tokenizer.encode(value.get<std::string>(), mode)).dump());
    }
  };
}

}  // namespace cli
