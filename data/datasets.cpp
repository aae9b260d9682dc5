#include "data/datasets.h"

#include "data/batching.h"
#include "data/wikitext.h"
#include "engine/error.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <utility>

namespace data {

// ---- Dataset and LabelMap ----

int64_t Dataset::num_classes() const {
  int64_t largest = -1;
  for (const Example& e : examples) largest = std::max(largest, e.label);
  return largest + 1;
}

std::map<int64_t, size_t> Dataset::label_counts() const {
  std::map<int64_t, size_t> counts;
  for (const Example& e : examples) ++counts[e.label];
  return counts;
}

LabelMap LabelMap::identity() { return LabelMap(); }

LabelMap LabelMap::floor_divide(int64_t divisor) {
  engine::check(divisor > 0, "LabelMap::floor_divide: the divisor must be positive, got {}", divisor);
  LabelMap map;
  map.kind_ = Kind::FloorDivide;
  map.divisor_ = divisor;
  return map;
}

LabelMap LabelMap::table(std::map<int64_t, int64_t> raw_to_class) {
  engine::check(!raw_to_class.empty(), "LabelMap::table: the table is empty");
  LabelMap map;
  map.kind_ = Kind::Table;
  map.table_ = std::move(raw_to_class);
  return map;
}

std::optional<int64_t> LabelMap::apply(int64_t raw) const {
  switch (kind_) {
    case Kind::Identity: return raw;
    case Kind::FloorDivide: {
      // Python's // rounds toward minus infinity; C++'s / rounds toward zero.
      int64_t q = raw / divisor_;
      return (raw % divisor_ != 0 && raw < 0) ? q - 1 : q;
    }
    case Kind::Table: {
      auto it = table_.find(raw);
      if (it == table_.end()) return std::nullopt;
      return it->second;
    }
  }
  return std::nullopt;
}

std::string LabelMap::str() const {
  switch (kind_) {
    case Kind::Identity: return "identity";
    case Kind::FloorDivide: return fmt::format("label // {}", divisor_);
    case Kind::Table: {
      std::string out = "{";
      for (const auto& [raw, cls] : table_) out += fmt::format("{}{}: {}", out.size() > 1 ? ", " : "", raw, cls);
      return out + "}";
    }
  }
  return "?";
}

LabelMap sentiment140_paper_labels() { return LabelMap::floor_divide(4); }
LabelMap sentiment140_three_class_labels() { return LabelMap::table({{0, 0}, {2, 1}, {4, 2}}); }

std::optional<DatasetFormat> dataset_format_from_name(std::string_view name) {
  if (name == "mrpc") return DatasetFormat::GlueMrpc;
  if (name == "sst2") return DatasetFormat::GlueSst2;
  if (name == "sentiment140") return DatasetFormat::Sentiment140;
  if (name == "tsv") return DatasetFormat::TaskTsv;
  if (name == "jsonl") return DatasetFormat::TaskJsonl;
  return std::nullopt;
}

std::string latin1_to_utf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() + bytes.size() / 8);
  for (unsigned char c : bytes) {
    if (c < 0x80) {
      out += char(c);
    } else {  // U+0080..U+00FF take two bytes: 110000xx 10xxxxxx
      out += char(0xC0 | (c >> 6));
      out += char(0x80 | (c & 0x3F));
    }
  }
  return out;
}

namespace {

constexpr size_t npos = std::string_view::npos;

// ---- error helpers: every message is one line, "SOURCE:LINE: what is wrong" ----

template <typename... Args>
[[noreturn]] void fail_at(const std::string& source, size_t line, fmt::format_string<Args...> format,
                          Args&&... args) {
  engine::fail("{}:{}: {}", source, line, fmt::format(format, std::forward<Args>(args)...));
}

// A field as it may appear in a message: quoted, at most 40 bytes, control and
// non-ASCII bytes as \xNN, so the message stays one printable line.
std::string shown(std::string_view field) {
  std::string out = "'";
  for (size_t i = 0; i < field.size() && i < 40; ++i) {
    unsigned char c = field[i];
    out += (c >= 0x20 && c < 0x7F) ? std::string(1, char(c)) : fmt::format("\\x{:02X}", c);
  }
  return out + (field.size() > 40 ? "...'" : "'");
}

// Offset of the first byte that does not begin a valid UTF-8 sequence, or npos.
// Strict like Python's codec: no overlong forms, no surrogates, nothing past U+10FFFF.
size_t invalid_utf8_at(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t length;
    uint32_t code, smallest;
    if ((c & 0xE0) == 0xC0) {
      length = 2, code = c & 0x1F, smallest = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      length = 3, code = c & 0x0F, smallest = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      length = 4, code = c & 0x07, smallest = 0x10000;
    } else {
      return i;
    }
    if (s.size() - i < length) return i;
    for (size_t k = 1; k < length; ++k) {
      unsigned char next = s[i + k];
      if ((next & 0xC0) != 0x80) return i;
      code = (code << 6) | (next & 0x3F);
    }
    if (code < smallest || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return i;
    i += length;
  }
  return npos;
}

void check_utf8(std::string_view line, const std::string& source, size_t line_number) {
  size_t bad = invalid_utf8_at(line);
  if (bad != npos)
    fail_at(source, line_number, "invalid UTF-8 (byte 0x{:02X} at column {}); the file must be UTF-8",
            static_cast<unsigned char>(line[bad]), bad + 1);
}

// A label field: an optional '-' and decimal digits, nothing else (no spaces).
std::optional<int64_t> parse_integer(std::string_view field) {
  int64_t value = 0;
  const char* end = field.data() + field.size();
  auto [stop, error] = std::from_chars(field.data(), end, value);
  if (field.empty() || error != std::errc() || stop != end) return std::nullopt;
  return value;
}

bool is_blank(std::string_view line) { return line.find_first_not_of(" \t\r\f\v") == npos; }

// ---- lines: '\n' ends a line, a '\r' before it is dropped, a leading BOM is skipped ----

class LineReader {
 public:
  explicit LineReader(std::string_view bytes) : bytes_(bytes) {
    if (bytes_.substr(0, 3) == "\xEF\xBB\xBF") pos_ = 3;
  }
  bool next(std::string_view& line) {
    if (pos_ >= bytes_.size()) return false;
    size_t end = std::min(bytes_.find('\n', pos_), bytes_.size());
    line = bytes_.substr(pos_, end - pos_);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    pos_ = end + 1;
    ++number_;
    return true;
  }
  size_t number() const { return number_; }  // of the line last returned, from 1

 private:
  std::string_view bytes_;
  size_t pos_ = 0;
  size_t number_ = 0;
};

void split_tabs(std::string_view line, std::vector<std::string_view>& fields) {
  fields.clear();
  size_t begin = 0;
  while (true) {
    size_t tab = line.find('\t', begin);
    fields.push_back(line.substr(begin, tab == npos ? npos : tab - begin));
    if (tab == npos) return;
    begin = tab + 1;
  }
}

// ---- rows into a Dataset: label checks, the label map, the row limit ----

class DatasetBuilder {
 public:
  // `allowed` lists the raw labels the format permits; empty means any integer.
  DatasetBuilder(const std::string& source, const ReadOptions& options, std::vector<int64_t> allowed)
      : options_(options), allowed_(std::move(allowed)) {
    dataset_.source = source;
  }

  bool full() const { return options_.max_rows && dataset_.examples.size() >= *options_.max_rows; }

  void add(size_t line, std::string text, std::optional<std::string> pair, std::string_view label_field) {
    std::optional<int64_t> raw = parse_integer(label_field);
    if (!raw) fail_at(dataset_.source, line, "label {} is not an integer", shown(label_field));
    add(line, std::move(text), std::move(pair), *raw);
  }

  void add(size_t line, std::string text, std::optional<std::string> pair, int64_t raw) {
    if (!allowed_.empty() && std::find(allowed_.begin(), allowed_.end(), raw) == allowed_.end())
      fail_at(dataset_.source, line, "unknown label {} (this format allows {})", raw, fmt::join(allowed_, ", "));
    std::optional<int64_t> label = options_.labels.apply(raw);
    if (!label) fail_at(dataset_.source, line, "unknown label {} (not in the label map {})", raw, options_.labels.str());
    if (*label < 0)
      fail_at(dataset_.source, line, "label {} maps to {}, but classes are indices from 0", raw, *label);
    dataset_.examples.push_back(Example{std::move(text), std::move(pair), *label});
  }

  // `where` is the line that an error about a file without rows points at.
  Dataset finish(size_t where, const char* no_rows_message) {
    bool asked_for_none = options_.max_rows && *options_.max_rows == 0;
    if (dataset_.examples.empty() && !asked_for_none) fail_at(dataset_.source, where, "{}", no_rows_message);
    if (options_.max_rows) dataset_.source += fmt::format("[:{}]", *options_.max_rows);
    return std::move(dataset_);
  }

 private:
  const ReadOptions& options_;
  std::vector<int64_t> allowed_;
  Dataset dataset_;
};

// ---- TSV with a header naming the columns (GLUE and the generic task format) ----

struct TsvColumns {
  std::string text;
  std::string pair;  // empty: single-sentence task
  bool pair_required = false;
  std::string label;
  std::vector<int64_t> allowed_labels;
};

Dataset parse_tsv(std::string_view bytes, const std::string& source, const ReadOptions& options,
                  const TsvColumns& spec) {
  LineReader lines(bytes);
  std::string_view line;
  do {
    if (!lines.next(line)) fail_at(source, 1, "empty file (no header line)");
  } while (is_blank(line));
  size_t header_line = lines.number();
  check_utf8(line, source, header_line);

  std::vector<std::string_view> names;
  split_tabs(line, names);
  std::string found;
  for (std::string_view name : names) found += (found.empty() ? "" : ", ") + shown(name);
  auto column = [&](const std::string& name, bool required) -> std::optional<size_t> {
    auto it = std::find(names.begin(), names.end(), name);
    if (it == names.end()) {
      if (required) fail_at(source, header_line, "header lacks column '{}' (found: {})", name, found);
      return std::nullopt;
    }
    if (std::find(it + 1, names.end(), name) != names.end())
      fail_at(source, header_line, "header names column '{}' twice", name);
    return size_t(it - names.begin());
  };
  size_t text_col = *column(spec.text, true);
  std::optional<size_t> pair_col = spec.pair.empty() ? std::nullopt : column(spec.pair, spec.pair_required);
  size_t label_col = *column(spec.label, true);

  DatasetBuilder builder(source, options, spec.allowed_labels);
  std::vector<std::string_view> fields;
  while (!builder.full() && lines.next(line)) {
    if (line.empty()) continue;  // as Python's csv.DictReader skips empty rows
    check_utf8(line, source, lines.number());
    split_tabs(line, fields);
    if (fields.size() != names.size())
      fail_at(source, lines.number(), "expected {} tab-separated columns, as the header has, found {}", names.size(),
              fields.size());
    std::optional<std::string> pair;
    if (pair_col) pair = std::string(fields[*pair_col]);
    builder.add(lines.number(), std::string(fields[text_col]), std::move(pair), fields[label_col]);
  }
  return builder.finish(header_line, "no data rows after the header");
}

// ---- CSV, RFC 4180 as Python's csv module reads it ----
// Fields are split on ','. A field that opens with '"' runs to the next lone '"' ("" is
// one quote character) and may span lines; after it comes ',' or the end of the record.
// A record ends at '\n' or "\r\n" outside quotes. Unquoted fields are taken as they are.

class CsvReader {
 public:
  CsvReader(std::string_view bytes, const std::string& source) : bytes_(bytes), source_(source) {
    if (bytes_.substr(0, 3) == "\xEF\xBB\xBF") pos_ = 3;  // a UTF-8 BOM, as the TSV readers allow
  }

  // The next record into `fields`; false at the end. Blank lines are skipped.
  bool next(std::vector<std::string>& fields) {
    fields.clear();
    while (pos_ < bytes_.size() && (at_line_end(pos_))) consume_line_end();
    if (pos_ >= bytes_.size()) return false;
    record_line_ = line_;
    while (true) {
      fields.push_back(bytes_[pos_] == '"' ? quoted_field(fields.size() + 1) : plain_field());
      if (pos_ >= bytes_.size()) return true;
      if (bytes_[pos_] == ',') {
        ++pos_;
        if (pos_ >= bytes_.size()) {  // "a,b," ends in an empty field
          fields.emplace_back();
          return true;
        }
        continue;
      }
      consume_line_end();
      return true;
    }
  }
  size_t record_line() const { return record_line_; }  // where the last record began
  size_t line() const { return line_; }

 private:
  bool at_line_end(size_t at) const {
    return bytes_[at] == '\n' || (bytes_[at] == '\r' && at + 1 < bytes_.size() && bytes_[at + 1] == '\n');
  }
  void consume_line_end() {
    pos_ += bytes_[pos_] == '\r' ? 2 : 1;
    ++line_;
  }

  std::string plain_field() {
    size_t end = pos_;
    while (end < bytes_.size() && bytes_[end] != ',' && !at_line_end(end)) ++end;
    std::string field(bytes_.substr(pos_, end - pos_));
    pos_ = end;
    return field;
  }

  std::string quoted_field(size_t number) {
    size_t open_line = line_;
    std::string field;
    ++pos_;  // the opening quote
    while (true) {
      size_t quote = bytes_.find('"', pos_);
      if (quote == npos)
        fail_at(source_, open_line, "unterminated quote: field {} opens a quote that never closes", number);
      std::string_view piece = bytes_.substr(pos_, quote - pos_);
      line_ += size_t(std::count(piece.begin(), piece.end(), '\n'));
      field += piece;
      pos_ = quote + 1;
      if (pos_ < bytes_.size() && bytes_[pos_] == '"') {  // "" stands for one quote
        field += '"';
        ++pos_;
        continue;
      }
      break;
    }
    if (pos_ < bytes_.size() && bytes_[pos_] != ',' && !at_line_end(pos_))
      fail_at(source_, line_, "unexpected {} after the closing quote of field {}", shown(bytes_.substr(pos_, 1)),
              number);
    return field;
  }

  std::string_view bytes_;
  const std::string& source_;
  size_t pos_ = 0;
  size_t line_ = 1;
  size_t record_line_ = 1;
};

Dataset parse_sentiment140(std::string_view bytes, const std::string& source, const ReadOptions& options) {
  CsvReader reader(bytes, source);
  DatasetBuilder builder(source, options, {0, 2, 4});
  std::vector<std::string> fields;
  while (!builder.full() && reader.next(fields)) {
    if (fields.size() != 6)
      fail_at(source, reader.record_line(),
              "expected 6 comma-separated fields (polarity, id, date, query, user, text), found {}", fields.size());
    // The files are not UTF-8: Hugging Face opens them as ISO-8859-1, so each byte is one code point.
    builder.add(reader.record_line(), latin1_to_utf8(fields[5]), std::nullopt, fields[0]);
  }
  return builder.finish(1, "empty file (no records)");
}

// ---- JSONL: {"text": string, "text_pair": string (optional), "label": integer} per line ----

Dataset parse_jsonl(std::string_view bytes, const std::string& source, const ReadOptions& options) {
  LineReader lines(bytes);
  DatasetBuilder builder(source, options, {});
  std::optional<bool> has_pair;  // set by the first row; every row must agree
  size_t first_row_line = 0;
  std::string_view line;
  while (!builder.full() && lines.next(line)) {
    if (is_blank(line)) continue;
    size_t at = lines.number();
    nlohmann::json row;
    try {
      row = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      std::string what = e.what();
      size_t bracket = what.find("] ");  // drop nlohmann's "[json.exception.parse_error.101] " prefix
      if (bracket != std::string::npos) what.erase(0, bracket + 2);
      std::replace_if(what.begin(), what.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20; }, ' ');
      fail_at(source, at, "not valid JSON: {}", what);
    }
    if (!row.is_object()) fail_at(source, at, "expected a JSON object, found {}", row.type_name());

    auto text = row.find("text");
    if (text == row.end()) fail_at(source, at, "missing key 'text'");
    if (!text->is_string()) fail_at(source, at, "'text' must be a string, found {}", text->type_name());

    std::optional<std::string> pair;
    auto pair_it = row.find("text_pair");
    if (pair_it != row.end() && !pair_it->is_null()) {
      if (!pair_it->is_string()) fail_at(source, at, "'text_pair' must be a string, found {}", pair_it->type_name());
      pair = pair_it->get<std::string>();
    }
    if (!has_pair) {
      has_pair = pair.has_value();
      first_row_line = at;
    } else if (*has_pair != pair.has_value()) {
      fail_at(source, at, "'text_pair' is {} here but {} on line {}; a task is all pairs or all single texts",
              pair ? "present" : "absent", pair ? "absent" : "present", first_row_line);
    }

    auto label = row.find("label");
    if (label == row.end()) fail_at(source, at, "missing key 'label'");
    if (!label->is_number_integer()) fail_at(source, at, "'label' must be an integer, found {}", label->type_name());
    if (label->is_number_unsigned() && label->get<uint64_t>() > uint64_t(INT64_MAX))
      fail_at(source, at, "label {} does not fit in int64", label->get<uint64_t>());
    builder.add(at, text->get<std::string>(), std::move(pair), label->get<int64_t>());
  }
  return builder.finish(1, "empty file (no rows)");
}

}  // namespace

Dataset parse_dataset(std::string_view bytes, DatasetFormat format, const std::string& source,
                      const ReadOptions& options) {
  switch (format) {
    case DatasetFormat::GlueMrpc:
      // Hugging Face's glue/mrpc: sentence1 = "#1 String", sentence2 = "#2 String", label = "Quality".
      return parse_tsv(bytes, source, options, {"#1 String", "#2 String", true, "Quality", {0, 1}});
    case DatasetFormat::GlueSst2:
      return parse_tsv(bytes, source, options, {"sentence", "", false, "label", {0, 1}});
    case DatasetFormat::Sentiment140:
      return parse_sentiment140(bytes, source, options);
    case DatasetFormat::TaskTsv:
      return parse_tsv(bytes, source, options, {"text", "text_pair", false, "label", {}});
    case DatasetFormat::TaskJsonl:
      return parse_jsonl(bytes, source, options);
  }
  engine::fail("parse_dataset: unknown format {}", int(format));
}

Dataset read_dataset(const std::string& path, DatasetFormat format, const ReadOptions& options) {
  return parse_dataset(read_text_file(path), format, path, options);
}

// ---- balanced sampling ----

// Philox key for sampling, so a sample never shares random numbers with a shuffle
// or dropout that uses the same seed. The bytes spell "BALANCED".
constexpr uint64_t kBalancedSampleKey = 0x42414C414E434544ull;

Dataset balanced_sample(const Dataset& dataset, size_t per_class, uint64_t seed) {
  engine::check(per_class > 0, "balanced_sample: per_class must be at least 1");
  std::map<int64_t, std::vector<size_t>> by_label;
  for (size_t i = 0; i < dataset.size(); ++i) by_label[dataset.examples[i].label].push_back(i);
  engine::check(!by_label.empty(), "balanced_sample: {} has no examples", dataset.source);

  std::vector<size_t> chosen;
  uint64_t stream = 0;  // the k-th class (ascending label) shuffles with Philox blocks from k * 2^32
  for (auto& [label, rows] : by_label) {
    engine::check(rows.size() >= per_class, "balanced_sample: class {} has {} examples in {}, fewer than the {} asked for",
                  label, rows.size(), dataset.source, per_class);
    philox_shuffle(rows, seed ^ kBalancedSampleKey, stream++ << 32);
    chosen.insert(chosen.end(), rows.begin(), rows.begin() + ptrdiff_t(per_class));
  }
  std::sort(chosen.begin(), chosen.end());  // back to file order; training shuffles anyway

  Dataset out;
  out.source = fmt::format("{} (balanced: {} per class, seed {})", dataset.source, per_class, seed);
  out.examples.reserve(chosen.size());
  for (size_t i : chosen) out.examples.push_back(dataset.examples[i]);
  return out;
}

}  // namespace data
