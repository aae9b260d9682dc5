// data::Dataset readers and batching: the real benchmark files (counts from their
// PROVENANCE.md, rows re-read here by a separate naive parser), Latin-1 decoding,
// pair truncation against a one-token-at-a-time model, batch tensors, seeded order,
// bucketing, balanced sampling, and every malformed-input error as FILE:LINE.
#include <catch2/catch.hpp>

#include "data/batching.h"
#include "data/datasets.h"
#include "data/gpt2_tokenizer.h"
#include "engine/error.h"
#include "engine/rng.h"
#include "tests/test_data.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <numeric>

#include <unistd.h>

namespace fs = std::filesystem;
using data::Dataset;
using data::DatasetFormat;
using data::Example;
using data::ReadOptions;
using data::TokenizedDataset;

namespace {

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string data_file(const std::string& name) { return test_data_dir() + "/" + name; }

// ---- a naive reference parser: lines split on '\n', fields on a separator ----

std::vector<std::string> split(const std::string& s, const std::string& sep) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (true) {
    size_t at = s.find(sep, begin);
    out.push_back(s.substr(begin, at == std::string::npos ? std::string::npos : at - begin));
    if (at == std::string::npos) return out;
    begin = at + sep.size();
  }
}

// The data lines of a headed TSV, each split on tabs (the BOM cut off the header, the final "" line dropped).
std::vector<std::vector<std::string>> naive_tsv_rows(const std::string& path) {
  std::vector<std::string> lines = split(read_bytes(path), "\n");
  REQUIRE(lines.back().empty());
  lines.pop_back();
  std::vector<std::vector<std::string>> rows;
  for (size_t i = 1; i < lines.size(); ++i) rows.push_back(split(lines[i], "\t"));
  return rows;
}

// Sentiment140 rows: the first five fields never hold a quote, so the text is everything after
// the fifth '","', less the closing quote, with "" undone. (Splitting on every '","' would break
// on texts like ""hi"",""bye"".)
struct RawTweet {
  int polarity;
  std::string text_bytes;
};
std::vector<RawTweet> naive_sentiment140(const std::string& path) {
  std::vector<std::string> lines = split(read_bytes(path), "\n");
  REQUIRE(lines.back().empty());
  lines.pop_back();
  std::vector<RawTweet> rows;
  for (const std::string& line : lines) {
    size_t at = 0;
    for (int k = 0; k < 5; ++k) at = line.find("\",\"", at) + 3;
    REQUIRE(line.front() == '"');
    REQUIRE(line.back() == '"');
    std::string text = line.substr(at, line.size() - 1 - at), unescaped;
    for (size_t i = 0; i < text.size(); ++i) {
      unescaped += text[i];
      if (text[i] == '"') ++i;  // the second quote of ""
    }
    rows.push_back({std::stoi(line.substr(1, line.find('"', 1) - 1)), unescaped});
  }
  return rows;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  }
}

const data::GPT2Tokenizer& gpt2() {
  static const data::GPT2Tokenizer tok = data::GPT2Tokenizer::from_dir(test_data_dir() + "/gpt2-tokenizer");
  return tok;
}

// A scratch folder for malformed files, removed at exit.
struct TempDir {
  fs::path path = fs::temp_directory_path() / ("curlora_test_datasets_" + std::to_string(getpid()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
  std::string write(const std::string& name, const std::string& bytes) const {
    std::ofstream(path / name, std::ios::binary) << bytes;
    return (path / name).string();
  }
};
const TempDir& temp_dir() {
  static const TempDir dir;
  return dir;
}

// Requires reading `bytes` as `format` to throw exactly "PATH:LINE: ..." on one line, with `words` in it.
void require_error(DatasetFormat format, const std::string& bytes, size_t line, const std::string& words,
                   const ReadOptions& options = {}) {
  static int counter = 0;
  std::string path = temp_dir().write("bad" + std::to_string(counter++), bytes);
  std::string prefix = path + ":" + std::to_string(line) + ": ";
  try {
    data::read_dataset(path, format, options);
    FAIL("no error for " << prefix << " expected '" << words << "'");
  } catch (const engine::Error& e) {
    std::string message = e.what();
    INFO(message);
    CHECK(message.rfind(prefix, 0) == 0);
    CHECK(message.find(words) != std::string::npos);
    CHECK(message.find('\n') == std::string::npos);
  }
}

TokenizedDataset made_up_dataset(const std::vector<size_t>& lengths, int64_t max_length = 16) {
  TokenizedDataset ds;
  ds.source = "made-up";
  ds.max_length = max_length;
  for (size_t i = 0; i < lengths.size(); ++i) {
    std::vector<int32_t> ids(lengths[i]);
    for (size_t t = 0; t < ids.size(); ++t) ids[t] = int32_t(1000 * i + t);  // distinct per (row, position)
    ds.ids.push_back(ids);
    ds.labels.push_back(int64_t(i % 3));
  }
  return ds;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Real files

TEST_CASE("datasets: GLUE MRPC has the provenance counts and the rows a naive reader sees", "[datasets]") {
  struct Split {
    const char* file;
    size_t rows, positive, negative;
  };
  for (Split split : {Split{"glue-mrpc/dev.tsv", 408, 279, 129}, Split{"glue-mrpc/train.tsv", 3668, 2474, 1194}}) {
    INFO(split.file);
    Dataset ds = data::read_dataset(data_file(split.file), DatasetFormat::GlueMrpc);
    REQUIRE(ds.size() == split.rows);
    CHECK(ds.is_pair());
    CHECK(ds.num_classes() == 2);
    CHECK(ds.label_counts() == std::map<int64_t, size_t>{{0, split.negative}, {1, split.positive}});
    std::vector<std::vector<std::string>> rows = naive_tsv_rows(data_file(split.file));
    REQUIRE(rows.size() == ds.size());
    for (size_t i = 0; i < rows.size(); ++i) {
      REQUIRE(rows[i].size() == 5);
      INFO("row " << i);
      REQUIRE(ds.examples[i].text == rows[i][3]);
      REQUIRE(*ds.examples[i].text_pair == rows[i][4]);
      REQUIRE(ds.examples[i].label == std::stoi(rows[i][0]));
    }
  }
  // HF glue/mrpc validation[0], as the dataset viewer shows it; the BOM must not leak into it.
  Dataset dev = data::read_dataset(data_file("glue-mrpc/dev.tsv"), DatasetFormat::GlueMrpc);
  CHECK(dev.examples[0].text == "He said the foodservice pie business doesn 't fit the company 's long-term growth strategy .");
  CHECK(dev.examples[0].label == 1);
  // QUOTE_NONE: quotes are text. Some sentence begins with one, and it survives.
  bool literal_quote = std::any_of(dev.examples.begin(), dev.examples.end(),
                                   [](const Example& e) { return e.text_pair->rfind("\" ", 0) == 0; });
  CHECK(literal_quote);
}

TEST_CASE("datasets: GLUE SST-2 counts, verbatim sentences, and the paper's first 5000 rows", "[datasets]") {
  Dataset dev = data::read_dataset(data_file("glue-sst2/dev.tsv"), DatasetFormat::GlueSst2);
  REQUIRE(dev.size() == 872);
  CHECK(!dev.is_pair());
  CHECK(dev.label_counts() == std::map<int64_t, size_t>{{0, 428}, {1, 444}});
  CHECK(dev.examples[0].text == "it 's a charming and often affecting journey . ");  // GLUE keeps the space before the tab
  CHECK(dev.examples[0].label == 1);

  Dataset train = data::read_dataset(data_file("glue-sst2/train.tsv"), DatasetFormat::GlueSst2);
  REQUIRE(train.size() == 67349);
  CHECK(train.label_counts() == std::map<int64_t, size_t>{{0, 29780}, {1, 37569}});
  std::vector<std::vector<std::string>> rows = naive_tsv_rows(data_file("glue-sst2/train.tsv"));
  REQUIRE(rows.size() == train.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    INFO("row " << i);
    REQUIRE(rows[i].size() == 2);
    REQUIRE(train.examples[i].text == rows[i][0]);
    REQUIRE(train.examples[i].label == std::stoi(rows[i][1]));
  }

  ReadOptions first5000;
  first5000.max_rows = 5000;
  Dataset head = data::read_dataset(data_file("glue-sst2/train.tsv"), DatasetFormat::GlueSst2, first5000);
  REQUIRE(head.size() == 5000);
  CHECK(head.source == data_file("glue-sst2/train.tsv") + "[:5000]");
  for (size_t i = 0; i < head.size(); ++i) REQUIRE(head.examples[i].text == train.examples[i].text);

  // GLUE's test split has no label column: a clear header error, not a crash.
  CHECK_THROWS_WITH(data::read_dataset(data_file("glue-sst2/test.tsv"), DatasetFormat::GlueSst2),
                    Catch::Contains(":1: header lacks column 'label' (found: 'index', 'sentence')"));
}

TEST_CASE("datasets: Sentiment140 test CSV counts, label maps, quotes and the training sample", "[datasets]") {
  std::string test_csv = data_file("sentiment140/testdata.manual.2009.06.14.csv");
  Dataset raw = data::read_dataset(test_csv, DatasetFormat::Sentiment140);
  REQUIRE(raw.size() == 498);
  CHECK(raw.label_counts() == std::map<int64_t, size_t>{{0, 177}, {2, 139}, {4, 182}});
  CHECK(raw.examples[0].text ==
        "@stellargirl I loooooooovvvvvveee my Kindle2. Not that the DX is cool, but the 2 is fantastic in its own right.");

  std::vector<RawTweet> naive = naive_sentiment140(test_csv);
  REQUIRE(naive.size() == raw.size());
  size_t with_quotes = 0;
  for (size_t i = 0; i < naive.size(); ++i) {
    INFO("row " << i);
    REQUIRE(raw.examples[i].text == naive[i].text_bytes);  // this file is ASCII
    REQUIRE(raw.examples[i].label == naive[i].polarity);
    with_quotes += naive[i].text_bytes.find('"') != std::string::npos;
  }
  CHECK(with_quotes > 0);  // "" escapes were exercised

  ReadOptions paper;
  paper.labels = data::sentiment140_paper_labels();
  CHECK(data::read_dataset(test_csv, DatasetFormat::Sentiment140, paper).label_counts() ==
        std::map<int64_t, size_t>{{0, 177 + 139}, {1, 182}});
  ReadOptions three;
  three.labels = data::sentiment140_three_class_labels();
  Dataset three_class = data::read_dataset(test_csv, DatasetFormat::Sentiment140, three);
  CHECK(three_class.label_counts() == std::map<int64_t, size_t>{{0, 177}, {1, 139}, {2, 182}});
  CHECK(three_class.num_classes() == 3);

  // The training sample: 9999 negatives then 10001 positives; the paper evaluates on the first 1000.
  std::string train_csv = data_file("sentiment140/training.1600000.processed.noemoticon.head9999_tail10001.csv");
  Dataset train = data::read_dataset(train_csv, DatasetFormat::Sentiment140);
  REQUIRE(train.size() == 20000);
  CHECK(train.label_counts() == std::map<int64_t, size_t>{{0, 9999}, {4, 10001}});
  ReadOptions eval_rows = paper;
  eval_rows.max_rows = 1000;
  CHECK(data::read_dataset(train_csv, DatasetFormat::Sentiment140, eval_rows).label_counts() ==
        std::map<int64_t, size_t>{{0, 1000}});
}

TEST_CASE("datasets: Sentiment140 bytes >= 0x80 decode as Latin-1", "[datasets]") {
  std::string train_csv = data_file("sentiment140/training.1600000.processed.noemoticon.head9999_tail10001.csv");
  Dataset train = data::read_dataset(train_csv, DatasetFormat::Sentiment140);
  std::vector<RawTweet> naive = naive_sentiment140(train_csv);
  REQUIRE(naive.size() == train.size());
  size_t high_rows = 0;
  for (size_t i = 0; i < naive.size(); ++i) {
    std::string expected;
    bool high = false;
    for (char c : naive[i].text_bytes) {
      append_utf8(expected, uint8_t(c));  // byte value = code point
      high |= uint8_t(c) >= 0x80;
    }
    high_rows += high;
    INFO("row " << i);
    REQUIRE(train.examples[i].text == expected);
  }
  CHECK(high_rows > 100);  // the provenance counts 243 such rows
  // A direct case: Latin-1 0xE9 is U+00E9 'é' (C3 A9 in UTF-8); 0x80 is U+0080 (C2 80).
  CHECK(data::latin1_to_utf8("caf\xE9 \x80!") == "caf\xC3\xA9 \xC2\x80!");
}

TEST_CASE("datasets: the paper's texts all fit in 256 tokens, so its max_length never truncates", "[datasets]") {
  // The paper says max length 256; its utils.py sets 512. Neither cuts any text it trains or evaluates on.
  ReadOptions first5000, first1000;
  first5000.max_rows = 5000;
  first1000.max_rows = 1000;
  struct Source {
    const char* file;
    DatasetFormat format;
    ReadOptions options;
  };
  const std::string s140_train = "sentiment140/training.1600000.processed.noemoticon.head9999_tail10001.csv";
  for (const Source& source : {Source{"glue-mrpc/train.tsv", DatasetFormat::GlueMrpc, {}},
                               Source{"glue-mrpc/dev.tsv", DatasetFormat::GlueMrpc, {}},
                               Source{"glue-sst2/train.tsv", DatasetFormat::GlueSst2, first5000},
                               Source{"glue-sst2/dev.tsv", DatasetFormat::GlueSst2, {}},
                               Source{"sentiment140/testdata.manual.2009.06.14.csv", DatasetFormat::Sentiment140, {}},
                               Source{s140_train.c_str(), DatasetFormat::Sentiment140, first1000}}) {
    auto start = std::chrono::steady_clock::now();
    Dataset ds = data::read_dataset(data_file(source.file), source.format, source.options);
    TokenizedDataset tok = data::tokenize(ds, gpt2(), 1 << 20);  // no truncation: the true lengths
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    size_t longest = 0;
    for (size_t i = 0; i < tok.size(); ++i) {
      REQUIRE(!tok.ids[i].empty());
      REQUIRE(tok.labels[i] == ds.examples[i].label);
      longest = std::max(longest, tok.ids[i].size());
    }
    CHECK(longest < 256);
    WARN(source.file << ": " << tok.size() << " examples read and tokenised in " << seconds << " s; longest "
                     << longest << " tokens");
  }
  // One pair against the tokenizer called directly.
  Dataset mrpc = data::read_dataset(data_file("glue-mrpc/dev.tsv"), DatasetFormat::GlueMrpc);
  std::vector<int32_t> expected = gpt2().encode(mrpc.examples[7].text);
  std::vector<int32_t> second = gpt2().encode(*mrpc.examples[7].text_pair);
  expected.insert(expected.end(), second.begin(), second.end());
  CHECK(data::tokenize(mrpc, gpt2(), 256).ids[7] == expected);
}

// ---------------------------------------------------------------------------------------------
// Pairs and truncation

TEST_CASE("datasets: longest_first matches cutting one token at a time from the longer part", "[datasets]") {
  // The model the closed form must equal: one token at a time from the longer part; on a tie,
  // from the part that was the shorter at the start (the first, if they started equal).
  auto one_at_a_time = [](size_t n1, size_t n2, size_t max_length) {
    bool tie_cuts_first = n1 <= n2;
    size_t a = n1, b = n2;
    while (a + b > max_length) {
      if (a > b || (a == b && tie_cuts_first)) --a;
      else --b;
    }
    return std::pair{a, b};
  };
  for (size_t max_length = 0; max_length <= 14; ++max_length)
    for (size_t n1 = 0; n1 <= 14; ++n1)
      for (size_t n2 = 0; n2 <= 14; ++n2) {
        INFO(n1 << " + " << n2 << " into " << max_length);
        REQUIRE(data::longest_first_lengths(n1, n2, max_length) == one_at_a_time(n1, n2, max_length));
      }
  // Worked through `tokenizers`' truncate_encodings by hand:
  CHECK(data::longest_first_lengths(3, 20, 10) == std::pair<size_t, size_t>{3, 7});   // shorter fits
  CHECK(data::longest_first_lengths(10, 12, 9) == std::pair<size_t, size_t>{4, 5});   // both cut, longer rounds up
  CHECK(data::longest_first_lengths(12, 10, 9) == std::pair<size_t, size_t>{5, 4});
  CHECK(data::longest_first_lengths(7, 7, 9) == std::pair<size_t, size_t>{4, 5});     // tie: the second gets the extra
  CHECK(data::longest_first_lengths(300, 2, 256) == std::pair<size_t, size_t>{254, 2});
  CHECK(data::longest_first_lengths(5, 5, 10) == std::pair<size_t, size_t>{5, 5});    // fits: untouched
}

TEST_CASE("datasets: a pair is the two encodings joined, with no separator, then truncated", "[datasets]") {
  const data::GPT2Tokenizer& tok = gpt2();
  Example pair{"to", std::string("ken"), 0};
  std::vector<int32_t> a = tok.encode("to"), b = tok.encode("ken");
  std::vector<int32_t> joined = a;
  joined.insert(joined.end(), b.begin(), b.end());
  CHECK(data::encode_example(tok, pair, 256) == joined);
  CHECK(joined != tok.encode("token"));  // encoding "token" whole would merge across the join

  Example long_pair{"one two three four five six seven eight nine ten",
                    std::string(" alpha beta gamma"), 1};
  std::vector<int32_t> first = tok.encode(long_pair.text), second = tok.encode(*long_pair.text_pair);
  REQUIRE(first.size() == 10);
  REQUIRE(second.size() == 3);
  std::vector<int32_t> cut = data::encode_example(tok, long_pair, 8);  // keeps 5 + 3
  std::vector<int32_t> expected(first.begin(), first.begin() + 5);
  expected.insert(expected.end(), second.begin(), second.end());
  CHECK(cut == expected);

  Example single{"one two three four five six seven eight nine ten", std::nullopt, 0};
  CHECK(data::encode_example(tok, single, 4) == std::vector<int32_t>(first.begin(), first.begin() + 4));

  Dataset empty_text{"made-up", {Example{"", std::nullopt, 0}}};
  CHECK_THROWS_WITH(data::tokenize(empty_text, tok, 8), Catch::Contains("example 0 of made-up encodes to no tokens"));
}

// ---------------------------------------------------------------------------------------------
// Batches

TEST_CASE("datasets: make_batch pads on the right with eos and marks the real tokens", "[datasets]") {
  TokenizedDataset ds = made_up_dataset({3, 1, 5, 2});
  std::vector<size_t> rows = {2, 0, 1};
  for (bool to_max : {false, true}) {
    data::BatchOptions options;
    options.pad_to_max_length = to_max;
    data::Batch batch = data::make_batch(ds, rows, options);
    int64_t width = to_max ? 16 : 5;
    REQUIRE(batch.ids.shape() == engine::Shape{3, width});
    REQUIRE(batch.attention_mask.shape() == engine::Shape{3, width});
    REQUIRE(batch.labels.shape() == engine::Shape{3});
    REQUIRE(batch.last_index.shape() == engine::Shape{3});
    for (const engine::Tensor* t : {&batch.ids, &batch.attention_mask, &batch.labels, &batch.last_index})
      CHECK((t->dtype() == engine::DType::I32 && t->device().is_cpu()));
    CHECK(batch.rows == rows);
    std::vector<int32_t> ids = batch.ids.to_vector<int32_t>(), mask = batch.attention_mask.to_vector<int32_t>();
    std::vector<int32_t> labels = batch.labels.to_vector<int32_t>(), last = batch.last_index.to_vector<int32_t>();
    for (size_t b = 0; b < rows.size(); ++b) {
      size_t length = ds.ids[rows[b]].size();
      for (size_t t = 0; t < size_t(width); ++t) {
        bool real = t < length;
        INFO("row " << b << " position " << t);
        CHECK(ids[b * width + t] == (real ? int32_t(1000 * rows[b] + t) : 50256));
        CHECK(mask[b * width + t] == (real ? 1 : 0));
      }
      CHECK(last[b] == int32_t(length) - 1);
      CHECK(labels[b] == int32_t(rows[b] % 3));
    }
  }
  data::BatchOptions options;
  CHECK_THROWS_AS(data::make_batch(ds, std::vector<size_t>{4}, options), engine::Error);
  CHECK_THROWS_AS(data::make_batch(ds, std::vector<size_t>{}, options), engine::Error);
}

TEST_CASE("datasets: the paper's order is file order in ceil(n / 32) batches", "[datasets]") {
  TokenizedDataset ds = made_up_dataset(std::vector<size_t>(3668, 2));
  data::BatchOptions options;
  options.shuffle = false;
  std::vector<std::vector<size_t>> batches = data::epoch_batches(ds, options, 0);
  REQUIRE(batches.size() == 115);  // the paper's notebook shows 115 iterations per MRPC epoch
  CHECK(batches.back().size() == 3668 - 114 * 32);
  size_t next = 0;
  for (const auto& batch : batches)
    for (size_t row : batch) REQUIRE(row == next++);
  options.drop_last = true;
  CHECK(data::epoch_batches(ds, options, 0).size() == 114);
}

TEST_CASE("datasets: equal_length_batches holds every example once, one length per batch, unpadded",
          "[datasets]") {
  // Lengths 3 1 3 2 3 3 1 3: length 3 has five examples, so max_rows 2 cuts it into 2 + 2 + 1.
  TokenizedDataset ds = made_up_dataset({3, 1, 3, 2, 3, 3, 1, 3});
  const std::vector<std::vector<size_t>> batches = data::equal_length_batches(ds, 2);
  const std::vector<std::vector<size_t>> expected = {{1, 6}, {3}, {0, 2}, {4, 5}, {7}};
  CHECK(batches == expected);  // shortest first, file order within a length
  data::BatchOptions options;
  for (const auto& rows : batches) {
    const data::Batch batch = data::make_batch(ds, rows, options);
    CHECK(batch.ids.size(1) == int64_t(ds.ids[rows.front()].size()));
    for (int32_t m : batch.attention_mask.to_vector<int32_t>()) CHECK(m == 1);  // no padding anywhere
  }
  CHECK(data::equal_length_batches(ds, 64).size() == 3);
  CHECK(data::equal_length_batches(TokenizedDataset{}, 4).empty());
  CHECK_THROWS_WITH(data::equal_length_batches(ds, 0), Catch::Contains("max_rows must be positive"));
}

TEST_CASE("datasets: shuffles are a pure function of (seed, epoch), following the documented draws", "[datasets]") {
  const size_t n = 1000;
  std::vector<size_t> e0 = data::epoch_permutation(n, 42, 0);
  CHECK(e0 == data::epoch_permutation(n, 42, 0));
  CHECK(e0 != data::epoch_permutation(n, 42, 1));
  CHECK(e0 != data::epoch_permutation(n, 43, 0));
  std::vector<size_t> sorted = e0;
  std::sort(sorted.begin(), sorted.end());
  std::vector<size_t> identity(n);
  std::iota(identity.begin(), identity.end(), size_t(0));
  CHECK(sorted == identity);

  // Re-derive epoch 3 from the raw Philox words, as the header documents it: key seed ^ "SHUFFLE1",
  // block offset epoch * 2^33, draw t = the top 24 bits of stream words 2t and 2t+1.
  uint64_t seed = 7, epoch = 3, key = seed ^ 0x53485546464C4531ull, offset = epoch << 33;
  auto word24 = [&](uint64_t element) {
    return uint64_t(engine::philox4x32_10(key, offset + element / 4).v[element % 4] >> 8);
  };
  std::vector<size_t> expected = identity;
  for (size_t i = n - 1; i >= 1; --i) {
    uint64_t t = n - 1 - i;
    uint64_t r = (word24(2 * t) << 24) | word24(2 * t + 1);
    std::swap(expected[i], expected[size_t((unsigned __int128)r * (i + 1) >> 48)]);
  }
  CHECK(data::epoch_permutation(n, seed, epoch) == expected);

  // Uniform over the 6 orders of 3 items: 6000 epochs, each order near 1000 (sd ~ 29).
  std::map<std::vector<size_t>, int> seen;
  for (uint64_t e = 0; e < 6000; ++e) ++seen[data::epoch_permutation(3, 5, e)];
  REQUIRE(seen.size() == 6);
  for (const auto& [order, count] : seen) CHECK(std::abs(count - 1000) < 150);
}

TEST_CASE("datasets: bucketing keeps every example once, cuts padding, and repeats per epoch", "[datasets]") {
  std::vector<size_t> lengths(1000);
  for (size_t i = 0; i < lengths.size(); ++i) lengths[i] = 1 + (i * 7919) % 61;  // 1..61, scattered
  TokenizedDataset ds = made_up_dataset(lengths, 64);
  data::BatchOptions plain;
  plain.batch_size = 16;
  plain.seed = 11;
  data::BatchOptions bucketed = plain;
  bucketed.bucket_batches = 8;

  auto padding = [&](const std::vector<std::vector<size_t>>& batches) {
    size_t pad = 0;
    for (const auto& batch : batches) {
      size_t width = 0;
      for (size_t row : batch) width = std::max(width, ds.ids[row].size());
      for (size_t row : batch) pad += width - ds.ids[row].size();
    }
    return pad;
  };
  for (uint64_t epoch : {0, 1, 2}) {
    std::vector<std::vector<size_t>> batches = data::epoch_batches(ds, bucketed, epoch);
    CHECK(batches == data::epoch_batches(ds, bucketed, epoch));
    std::vector<size_t> all;
    for (const auto& batch : batches) {
      CHECK(batch.size() <= 16);
      all.insert(all.end(), batch.begin(), batch.end());
    }
    std::sort(all.begin(), all.end());
    std::vector<size_t> identity(ds.size());
    std::iota(identity.begin(), identity.end(), size_t(0));
    CHECK(all == identity);
    size_t bucketed_pad = padding(batches), plain_pad = padding(data::epoch_batches(ds, plain, epoch));
    CHECK(bucketed_pad * 3 < plain_pad);
    // Batch order is shuffled: widths are not ascending within the first window's 8 batches.
    std::vector<size_t> widths;
    for (const auto& batch : batches) widths.push_back(ds.ids[batch.back()].size());
    CHECK(!std::is_sorted(widths.begin(), widths.end()));
  }
  CHECK(data::epoch_batches(ds, bucketed, 0) != data::epoch_batches(ds, bucketed, 1));
  bucketed.drop_last = true;  // 1000 = 62 * 16 + 8: one short batch to drop
  std::vector<std::vector<size_t>> dropped = data::epoch_batches(ds, bucketed, 0);
  CHECK(dropped.size() == 62);
  for (const auto& batch : dropped) CHECK(batch.size() == 16);
}

TEST_CASE("datasets: balanced_sample draws k per class, seeded, from the dataset", "[datasets]") {
  Dataset s140 = data::read_dataset(data_file("sentiment140/testdata.manual.2009.06.14.csv"), DatasetFormat::Sentiment140);
  Dataset a = data::balanced_sample(s140, 100, 1);
  CHECK(a.size() == 300);
  CHECK(a.label_counts() == std::map<int64_t, size_t>{{0, 100}, {2, 100}, {4, 100}});
  Dataset again = data::balanced_sample(s140, 100, 1), other = data::balanced_sample(s140, 100, 2);
  auto texts = [](const Dataset& d) {
    std::vector<std::string> out;
    for (const Example& e : d.examples) out.push_back(e.text + "\t" + std::to_string(e.label));
    return out;
  };
  CHECK(texts(a) == texts(again));
  CHECK(texts(a) != texts(other));
  // Every sampled example is a distinct original, in the original order.
  std::vector<std::string> all = texts(s140), sampled = texts(a);
  size_t at = 0;
  for (const std::string& e : sampled) {
    auto it = std::find(all.begin() + ptrdiff_t(at), all.end(), e);
    REQUIRE(it != all.end());
    at = size_t(it - all.begin()) + 1;
  }
  CHECK_THROWS_WITH(data::balanced_sample(s140, 140, 1), Catch::Contains("class 2 has 139 examples"));
}

// ---------------------------------------------------------------------------------------------
// The generic task formats

TEST_CASE("datasets: task TSV and JSONL read columns by name, with BOM, CRLF and blank lines", "[datasets]") {
  std::string tsv = temp_dir().write("task.tsv",
                                     "\xEF\xBB\xBFid\tlabel\ttext_pair\ttext\r\n"
                                     "a\t2\tsecond \"quoted\"\tfirst\r\n"
                                     "\r\n"
                                     "b\t0\t\tonly\r\n");
  Dataset t = data::read_dataset(tsv, DatasetFormat::TaskTsv);
  REQUIRE(t.size() == 2);
  CHECK(t.examples[0].text == "first");
  CHECK(*t.examples[0].text_pair == "second \"quoted\"");
  CHECK(t.examples[0].label == 2);
  CHECK(*t.examples[1].text_pair == "");
  CHECK(t.examples[1].label == 0);

  std::string single = temp_dir().write("single.tsv", "text\tlabel\nhello\t1\n");
  CHECK(!data::read_dataset(single, DatasetFormat::TaskTsv).is_pair());

  std::string jsonl = temp_dir().write("task.jsonl",
                                       "{\"text\": \"caf\\u00e9\", \"label\": 1, \"extra\": [1, 2]}\n"
                                       "   \n"
                                       "{\"label\": 0, \"text\": \"tab\\there\", \"text_pair\": null}\n");
  Dataset j = data::read_dataset(jsonl, DatasetFormat::TaskJsonl);
  REQUIRE(j.size() == 2);
  CHECK(j.examples[0].text == "caf\xC3\xA9");
  CHECK(!j.examples[0].text_pair);
  CHECK(j.examples[1].text == "tab\there");
  ReadOptions mapped;
  mapped.labels = data::LabelMap::table({{0, 1}, {1, 0}});
  CHECK(data::read_dataset(jsonl, DatasetFormat::TaskJsonl, mapped).examples[0].label == 0);

  CHECK(data::dataset_format_from_name("mrpc") == DatasetFormat::GlueMrpc);
  CHECK(data::dataset_format_from_name("jsonl") == DatasetFormat::TaskJsonl);
  CHECK(!data::dataset_format_from_name("csv"));
}

TEST_CASE("datasets: CSV quoting follows RFC 4180 and counts lines inside quoted fields", "[datasets]") {
  std::string path = temp_dir().write("multi.csv",
                                      "\"0\",\"1\",\"d\",\"q\",\"u\",\"two\nlines, and \"\"quotes\"\"\"\r\n"
                                      "4,2,d,q,u,plain field\n"
                                      "\"2\",\"3\",\"d\",\"q\",\"u\",\"\"\n");
  Dataset ds = data::read_dataset(path, DatasetFormat::Sentiment140);
  REQUIRE(ds.size() == 3);
  CHECK(ds.examples[0].text == "two\nlines, and \"quotes\"");
  CHECK(ds.examples[1].text == "plain field");
  CHECK(ds.examples[1].label == 4);
  CHECK(ds.examples[2].text.empty());
  // The record after a two-line field starts on line 3, so an error there says 3.
  require_error(DatasetFormat::Sentiment140, "\"0\",\"1\",\"d\",\"q\",\"u\",\"a\nb\"\n\"0\",\"1\"\n", 3,
                "expected 6 comma-separated fields");
}

TEST_CASE("datasets: label maps", "[datasets]") {
  data::LabelMap div = data::LabelMap::floor_divide(4);
  CHECK(div.apply(0) == 0);
  CHECK(div.apply(2) == 0);
  CHECK(div.apply(4) == 1);
  CHECK(div.apply(-1) == -1);  // Python: -1 // 4 == -1
  CHECK(div.str() == "label // 4");
  CHECK(data::sentiment140_three_class_labels().str() == "{0: 0, 2: 1, 4: 2}");
  CHECK(!data::sentiment140_three_class_labels().apply(1));
  CHECK_THROWS_AS(data::LabelMap::floor_divide(0), engine::Error);
}

// ---------------------------------------------------------------------------------------------
// Malformed inputs: one line, FILE:LINE: what is wrong

TEST_CASE("datasets: malformed files give FILE:LINE errors", "[datasets]") {
  const std::string mrpc_header = "\xEF\xBB\xBFQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n";
  require_error(DatasetFormat::GlueMrpc, mrpc_header + "1\t1\t2\ta\tb\n0\t3\t4\tc\n", 3,
                "expected 5 tab-separated columns, as the header has, found 4");
  require_error(DatasetFormat::GlueMrpc, mrpc_header + "yes\t1\t2\ta\tb\n", 2, "label 'yes' is not an integer");
  require_error(DatasetFormat::GlueMrpc, "Quality\t#1 ID\t#2 ID\t#1 String\n", 1,
                "header lacks column '#2 String'");
  require_error(DatasetFormat::GlueMrpc, "", 1, "empty file");
  require_error(DatasetFormat::GlueMrpc, "\xEF\xBB\xBF", 1, "empty file");
  require_error(DatasetFormat::GlueMrpc, mrpc_header, 1, "no data rows after the header");

  require_error(DatasetFormat::GlueSst2, "sentence\tlabel\ngood \t1\nbad \t2\n", 3,
                "unknown label 2 (this format allows 0, 1)");
  require_error(DatasetFormat::GlueSst2, "sentence\tlabel\ngood \t1.0\n", 2, "label '1.0' is not an integer");
  require_error(DatasetFormat::GlueSst2, "sentence\tlabel\ngood \t\n", 2, "label '' is not an integer");
  require_error(DatasetFormat::GlueSst2, "sentence\tlabel\nok\t1\ncaf\xE9\t1\n", 3, "invalid UTF-8 (byte 0xE9");
  require_error(DatasetFormat::GlueSst2, "sentence\tlabel\tlabel\n", 1, "header names column 'label' twice");

  const std::string row = "\"0\",\"1\",\"date\",\"q\",\"user\",\"text\"\n";
  require_error(DatasetFormat::Sentiment140, row + row + "\"0\",\"1\",\"date\",\"q\",\"user\",\"never closed\n", 3,
                "unterminated quote: field 6");
  require_error(DatasetFormat::Sentiment140, row + "\"3\",\"1\",\"d\",\"q\",\"u\",\"t\"\n", 2,
                "unknown label 3 (this format allows 0, 2, 4)");
  require_error(DatasetFormat::Sentiment140, row + "\"0\",\"1\",\"d\"x,\"q\",\"u\",\"t\"\n", 2,
                "unexpected 'x' after the closing quote of field 3");
  require_error(DatasetFormat::Sentiment140, "\"4\",\"1\",\"d\"\n", 1, "expected 6 comma-separated fields");
  require_error(DatasetFormat::Sentiment140, "\n\n", 1, "empty file");
  ReadOptions three;
  three.labels = data::LabelMap::table({{0, 0}, {4, 1}});
  require_error(DatasetFormat::Sentiment140, row + "\"2\",\"1\",\"d\",\"q\",\"u\",\"t\"\n", 2,
                "unknown label 2 (not in the label map {0: 0, 4: 1})", three);
  ReadOptions negative;
  negative.labels = data::LabelMap::table({{0, -1}, {2, 0}, {4, 1}});
  require_error(DatasetFormat::Sentiment140, row, 1, "label 0 maps to -1", negative);

  require_error(DatasetFormat::TaskTsv, "text\ttext_pair\n", 1, "header lacks column 'label' (found: 'text', 'text_pair')");
  require_error(DatasetFormat::TaskTsv, "text\tlabel\nx\t-2\n", 2, "label -2 maps to -2");

  require_error(DatasetFormat::TaskJsonl, "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": 1\n", 2,
                "not valid JSON");
  require_error(DatasetFormat::TaskJsonl, "[1, 2]\n", 1, "expected a JSON object, found array");
  require_error(DatasetFormat::TaskJsonl, "{\"label\": 0}\n", 1, "missing key 'text'");
  require_error(DatasetFormat::TaskJsonl, "{\"text\": 5, \"label\": 0}\n", 1, "'text' must be a string, found number");
  require_error(DatasetFormat::TaskJsonl, "{\"text\": \"a\"}\n", 1, "missing key 'label'");
  require_error(DatasetFormat::TaskJsonl, "{\"text\": \"a\", \"label\": \"1\"}\n", 1,
                "'label' must be an integer, found string");
  require_error(DatasetFormat::TaskJsonl, "{\"text\": \"a\", \"label\": 1.5}\n", 1, "'label' must be an integer");
  require_error(DatasetFormat::TaskJsonl,
                "{\"text\": \"a\", \"label\": 0}\n\n{\"text\": \"b\", \"text_pair\": \"c\", \"label\": 1}\n", 3,
                "'text_pair' is present here but absent on line 1");
  require_error(DatasetFormat::TaskJsonl, "{\"text\": \"caf\xE9\", \"label\": 0}\n", 1, "not valid JSON");
  require_error(DatasetFormat::TaskJsonl, "  \n", 1, "empty file");

  CHECK_THROWS_WITH(data::read_dataset(temp_dir().path.string() + "/missing.tsv", DatasetFormat::TaskTsv),
                    Catch::Contains("missing.tsv: cannot open the file"));
}

TEST_CASE("datasets: a row limit stops before later malformed rows and 0 rows is allowed", "[datasets]") {
  std::string path = temp_dir().write("limit.tsv", "sentence\tlabel\na\t0\nb\t1\nbroken\n");
  ReadOptions two;
  two.max_rows = 2;
  CHECK(data::read_dataset(path, DatasetFormat::GlueSst2, two).size() == 2);
  ReadOptions none;
  none.max_rows = 0;
  CHECK(data::read_dataset(path, DatasetFormat::GlueSst2, none).size() == 0);
  CHECK_THROWS_WITH(data::read_dataset(path, DatasetFormat::GlueSst2), Catch::Contains(":4: expected 2"));
}

// ---------------------------------------------------------------------------------------------
// tools/fetch_data.py writes the layout the readers expect

TEST_CASE("datasets: fetch_data.py --dry-run names the files ../shared/data has, and writes nothing", "[datasets]") {
  if (!fs::exists("/usr/bin/python3")) {
    WARN("no /usr/bin/python3: fetch_data.py not checked");
    return;
  }
  fs::path out = temp_dir().path / "fetch-out";
  std::string command = "/usr/bin/python3 " CURLORA_SOURCE_ROOT "/tools/fetch_data.py --dry-run --out " +
                        out.string() + " 2>/dev/null";
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::string listing;
  char buffer[4096];
  while (size_t got = fread(buffer, 1, sizeof buffer, pipe)) listing.append(buffer, got);
  REQUIRE(pclose(pipe) == 0);
  CHECK(!fs::exists(out));

  size_t checked = 0;
  for (const std::string& line : split(listing, "\n")) {
    size_t arrow = line.find("-> ");
    if (arrow == std::string::npos) continue;
    for (std::string path : split(line.substr(arrow + 3), ", ")) {
      REQUIRE(path.rfind(out.string() + "/", 0) == 0);
      std::string relative = path.substr(out.string().size() + 1);
      std::string folder = relative.substr(0, relative.find('/'));
      bool checkpoint = folder.rfind("gpt2", 0) == 0 && folder != "gpt2-tokenizer";
      bool other_wiki_split = relative == "wikitext-2-raw/wiki.valid.raw" || relative == "wikitext-2-raw/wiki.train.raw";
      if (checkpoint || other_wiki_split) continue;  // not in ../shared/data
      INFO(relative);
      CHECK(fs::exists(test_data_dir() + "/" + relative));
      ++checked;
    }
  }
  CHECK(checked >= 12);
}
