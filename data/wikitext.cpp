#include "data/wikitext.h"

#include "engine/error.h"

#include <fstream>
#include <sstream>

namespace data {

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  engine::check(in.good(), "{}: cannot open the file", path);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  engine::check(!in.bad(), "{}: read error", path);
  return buffer.str();
}

std::string join_wikitext(const std::string& raw, WikiTextJoin join) {
  if (join == WikiTextJoin::Raw) return raw;
  std::string out;
  out.reserve(raw.size() + raw.size() / 16);
  bool first = true;
  size_t begin = 0;
  while (begin < raw.size()) {
    size_t end = raw.find('\n', begin);
    end = end == std::string::npos ? raw.size() : end + 1;  // keep the newline, as the HF loader does
    std::string_view line(raw.data() + begin, end - begin);
    begin = end;
    // "Blank" as Python's str.strip() sees it: only whitespace.
    bool blank = line.find_first_not_of(" \t\n\r\v\f") == std::string_view::npos;
    if (join == WikiTextJoin::HfDocs) {
      if (!first) out += "\n\n";
      if (!blank) out += line;  // blank rows are "" in the dataset
    } else if (!blank) {
      out += line;
    }
    first = false;
  }
  return out;
}

}  // namespace data
