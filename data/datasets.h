// data::Dataset: labelled text examples from the benchmark's files (GLUE MRPC and
// SST-2 TSVs, the Sentiment140 CSV) or from a user's own task (TSV with a header,
// or JSONL). Every reader rejects a malformed row with one line, "FILE:LINE: what".
// WikiText is unlabelled language-model text; its reader is data/wikitext.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace data {

struct Example {
  std::string text;                      // UTF-8, exactly as the file holds it (no trimming)
  std::optional<std::string> text_pair;  // the second sentence of a pair task (MRPC)
  int64_t label = 0;                     // a class index: the file's label after the LabelMap
};

struct Dataset {
  std::string source;  // the file, plus what was applied to it: "train.tsv[:5000]"
  std::vector<Example> examples;

  size_t size() const { return examples.size(); }
  bool is_pair() const { return !examples.empty() && examples.front().text_pair.has_value(); }
  int64_t num_classes() const;                     // largest label + 1; 0 when empty
  std::map<int64_t, size_t> label_counts() const;  // label -> examples, ascending
};

// How a file's raw labels become class indices. Readers first check the raw label
// against the labels their format allows (GLUE: 0/1, Sentiment140: 0/2/4), then map it;
// the result must be >= 0.
class LabelMap {
 public:
  static LabelMap identity();
  // Python's floor division, label // divisor: the paper's code reads Sentiment140 as
  // polarity // 4, so 0 and 2 (neutral) both become 0 and 4 becomes 1.
  static LabelMap floor_divide(int64_t divisor);
  // An explicit table; a raw label missing from it is an error ("unknown label").
  static LabelMap table(std::map<int64_t, int64_t> raw_to_class);

  std::optional<int64_t> apply(int64_t raw) const;  // nullopt: not in the table
  std::string str() const;                          // "identity", "label // 4", "{0: 0, 2: 1}"

 private:
  enum class Kind { Identity, FloorDivide, Table };
  Kind kind_ = Kind::Identity;
  int64_t divisor_ = 1;
  std::map<int64_t, int64_t> table_;
};

// Sentiment140 as the paper's code labels it (polarity // 4): two classes, neutral folded into negative.
LabelMap sentiment140_paper_labels();
// Sentiment140 with its three polarities as classes: {0: 0, 2: 1, 4: 2}.
LabelMap sentiment140_three_class_labels();

struct ReadOptions {
  // Keep only the first N data rows in file order (the paper trains on SST-2's first 5000);
  // rows after them are not parsed.
  std::optional<size_t> max_rows;
  LabelMap labels = LabelMap::identity();
};

enum class DatasetFormat {
  GlueMrpc,      // TSV: Quality, #1 ID, #2 ID, #1 String, #2 String (a pair task)
  GlueSst2,      // TSV: sentence, label
  Sentiment140,  // headerless CSV of six quoted fields, Latin-1 bytes
  TaskTsv,       // TSV whose header names the columns text, [text_pair,] label; others ignored
  TaskJsonl,     // one object per line: {"text": ..., ["text_pair": ...,] "label": integer}
};

// "mrpc", "sst2", "sentiment140", "tsv", "jsonl"; nullopt for any other name.
std::optional<DatasetFormat> dataset_format_from_name(std::string_view name);

// Reads a file. GLUE's TSVs are read as Hugging Face reads them: UTF-8 (a leading BOM is
// skipped), tab-separated with quoting off (QUOTE_NONE: a '"' is an ordinary character),
// blank lines skipped, fields kept verbatim. Throws engine::Error "FILE:LINE: ..." for an
// empty file, a missing header column, a wrong column count, an unterminated quote,
// invalid UTF-8, a label that is not an integer, or an unknown label.
Dataset read_dataset(const std::string& path, DatasetFormat format, const ReadOptions& options = {});
// The same on bytes in memory; `source` stands for the file name in errors.
Dataset parse_dataset(std::string_view bytes, DatasetFormat format, const std::string& source,
                      const ReadOptions& options = {});

// `per_class` examples of every label, drawn without replacement by a seeded Philox
// shuffle (so the same seed gives the same sample), kept in their original order.
// Throws engine::Error if a class has fewer than `per_class` examples.
Dataset balanced_sample(const Dataset& dataset, size_t per_class, uint64_t seed);

// Each byte as the code point of its value, written as UTF-8: what Python's
// open(path, encoding="ISO-8859-1") gives. Sentiment140's files need it (they are not UTF-8).
std::string latin1_to_utf8(std::string_view bytes);

}  // namespace data
