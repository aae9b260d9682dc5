// WikiText raw files and the ways the perplexity recipes join them: the
// transformers docs join the HF dataset's rows (lines, blank ones as "") with
// "\n\n"; the paper's reference code drops blank lines and joins with nothing.
#pragma once

#include <string>

namespace data {

// The whole file as bytes; engine::Error naming the path if it cannot be read.
std::string read_text_file(const std::string& path);

enum class WikiTextJoin {
  Raw,         // the file as it is
  HfDocs,      // rows joined with "\n\n" (transformers' perplexity guide)
  PaperCode,   // non-blank lines joined with no separator (the paper's code)
};

std::string join_wikitext(const std::string& raw, WikiTextJoin join);

}  // namespace data
