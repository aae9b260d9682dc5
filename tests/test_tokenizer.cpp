// data::GPT2Tokenizer: exact ids against Hugging Face goldens (when present in
// tests/goldens/tokenizer, or $CURLORA_TOKENIZER_GOLDENS), plus checks that need
// no goldens: ids looked up in encoder.json, regex pieces, special tokens,
// round trips on the four corpora, invalid UTF-8, threads and malformed files.
#include <catch2/catch.hpp>

#include "data/gpt2_tokenizer.h"
#include "engine/error.h"
#include "tests/test_data.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <thread>

#include <unistd.h>

namespace fs = std::filesystem;
using data::GPT2Tokenizer;
using data::SpecialTokens;
using Ids = std::vector<int32_t>;

namespace {

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_bytes(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// The goldens' line definition: split on '\n', each piece keeps its '\n', a final empty piece is dropped.
std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = text.find('\n', pos);
    end = end == std::string::npos ? text.size() : end + 1;
    lines.push_back(text.substr(pos, end - pos));
    pos = end;
  }
  return lines;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

std::string latin1_to_utf8(const std::string& bytes) {
  std::string out;
  for (char c : bytes) append_utf8(out, uint8_t(c));
  return out;
}

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) out += char(std::stoi(hex.substr(i, 2), nullptr, 16));
  return out;
}

std::string fnv1a64_hex(const Ids& ids) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (int32_t id : ids)
    for (int k = 0; k < 4; ++k) {
      h ^= (uint32_t(id) >> (8 * k)) & 0xFFu;
      h *= 0x100000001b3ull;
    }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// For failure messages: the text on one line, non-printable bytes escaped.
std::string shown(std::string_view s, size_t limit = 160) {
  std::string out;
  for (char c : s.substr(0, limit)) {
    if (uint8_t(c) < 0x20 || c == '\\') {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", uint8_t(c));
      out += buf;
    } else {
      out += c;
    }
  }
  return out + (s.size() > limit ? "..." : "");
}

std::string ids_text(const Ids& ids, size_t limit = 40) {
  std::string out = "[";
  for (size_t i = 0; i < ids.size() && i < limit; ++i) {
    if (i) out += ',';
    out += std::to_string(ids[i]);
  }
  return out + (ids.size() > limit ? ",...]" : "]");
}

const GPT2Tokenizer& gpt2() {
  static const GPT2Tokenizer tok = GPT2Tokenizer::from_dir(test_data_dir() + "/gpt2-tokenizer");
  return tok;
}

const nlohmann::json& encoder_json() {
  static const nlohmann::json vocab = nlohmann::json::parse(read_bytes(test_data_dir() + "/gpt2-tokenizer/encoder.json"));
  return vocab;
}

int32_t vocab_id(const std::string& token) {
  INFO("token " << token);
  REQUIRE(encoder_json().contains(token));
  return encoder_json()[token].get<int32_t>();
}

// GPT-2's bytes_to_unicode, restated here from the paper's code so the test does not trust the library.
std::string byte_symbol(int b) {
  bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  uint32_t cp = uint32_t(b);
  if (!printable) {
    cp = 256;
    for (int k = 0; k < b; ++k)
      if (!((k >= '!' && k <= '~') || (k >= 0xA1 && k <= 0xAC) || (k >= 0xAE && k <= 0xFF))) ++cp;
  }
  std::string s;
  append_utf8(s, cp);
  return s;
}

struct Corpus {
  std::string name, file;
  bool latin1;
};
const std::vector<Corpus>& corpora() {
  static const std::vector<Corpus> list = {{"mrpc_dev", "glue-mrpc/dev.tsv", false},
                                           {"sst2_dev", "glue-sst2/dev.tsv", false},
                                           {"sentiment140_test", "sentiment140/testdata.manual.2009.06.14.csv", true},
                                           {"wikitext2_test", "wikitext-2-raw/wiki.test.raw", false}};
  return list;
}

std::string corpus_text(const std::string& file, bool latin1) {
  std::string bytes = read_bytes(test_data_dir() + "/" + file);
  return latin1 ? latin1_to_utf8(bytes) : bytes;
}

const std::vector<std::string>& hard_strings() {
  static const std::vector<std::string> list = {
      "", "Hello world", " Hello world", "I love 🤗 and 😀!", "👨‍👩‍👧‍👦 family", "👍🏽 thumbs 👋🏿",
      "🇺🇸🇯🇵", "日本語のテキストと中文文本，한국어 텍스트。", "مرحبا بالعالم", "שלום עולם",
      "cafe\u0301 re\u0301sume\u0301", "café résumé", "\u0301\u0301 x\u0301", "hello   ", "   hello", "\n\n\n",
      " \n ", "a  b", "\t\t x", "a \t\n b\r\n\r\nc \v\f d", "a\u00a0b \u00a0 c", "a\u3000b \u3000", "a\u0085b \u0085",
      "a\u2028b\u2029c", "a\u200bb\u200cc\u200dd\ufeffe", "x \u180ey", std::string(5000, 'a'),
      "1234567890 3.14 1,000,000", "don't DON'T we'll 's' ''s", "<|endoftext|>", "a<|endoftext|>b",
      "<|endoftext|><|endoftext|>", " <|endoftext|> ", "<|<|endoftext|>|>", std::string("a\0b", 3),
      "नमस्ते दुनिया", "\U0010fffd \U0001d518"};
  return list;
}

// A vocabulary with the 256 byte symbols plus `extra`, for malformed-file and small-BPE tests.
nlohmann::json byte_vocab(const std::vector<std::string>& extra) {
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_symbol(b)] = b;
  int next = 256;
  for (const auto& token : extra) vocab[token] = next++;
  return vocab;
}

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() / ("curlora_tok_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// The engine::Error message of from_files on these contents ("" if it loaded).
std::string load_error(const std::string& vocab, const std::string& merges) {
  TempDir dir;
  write_bytes(dir.path / "vocab.json", vocab);
  write_bytes(dir.path / "merges.txt", merges);
  try {
    GPT2Tokenizer::from_files((dir.path / "vocab.json").string(), (dir.path / "merges.txt").string());
  } catch (const engine::Error& e) {
    return e.what();
  }
  return "";
}

std::string golden_tokenizer_dir() {
  const char* env = std::getenv("CURLORA_TOKENIZER_GOLDENS");
  return env && *env ? std::string(env) : golden_dir() + "/tokenizer";
}

}  // namespace

// ---------------------------------------------------------------- no goldens needed

TEST_CASE("tokenizer loads GPT-2 files under both namings", "[tokenizer]") {
  const auto& tok = gpt2();
  CHECK(tok.vocab_size() == 50257);
  CHECK(tok.merge_count() == 50000);
  CHECK(tok.eot_id() == vocab_id("<|endoftext|>"));
  CHECK(tok.id_to_token(vocab_id("\u0120world")) == "\u0120world");
  CHECK(tok.token_to_id("\u0120world") == vocab_id("\u0120world"));
  CHECK_FALSE(tok.token_to_id(" world").has_value());

  auto hf_named = GPT2Tokenizer::from_dir(test_data_dir() + "/gpt2-mini-wiki");
  auto explicit_files = GPT2Tokenizer::from_files(test_data_dir() + "/gpt2-tokenizer/encoder.json",
                                                  test_data_dir() + "/gpt2-tokenizer/vocab.bpe");
  for (const auto& s : hard_strings()) {
    CHECK(hf_named.encode(s) == tok.encode(s));
    CHECK(explicit_files.encode(s) == tok.encode(s));
  }
}

TEST_CASE("tokenizer ids match tokens looked up in encoder.json", "[tokenizer]") {
  const auto& tok = gpt2();
  CHECK(tok.encode("Hello world") == Ids{vocab_id("Hello"), vocab_id("\u0120world")});
  CHECK(tok.encode(" Hello world") == Ids{vocab_id("\u0120Hello"), vocab_id("\u0120world")});
  CHECK(tok.encode("don't") == Ids{vocab_id("don"), vocab_id("'t")});
  CHECK(tok.encode("\n\n") == Ids{vocab_id("\u010a\u010a")});
  CHECK(tok.encode(" ") == Ids{vocab_id("\u0120")});
  CHECK(tok.encode("").empty());
  // Every byte alone is its own byte-level symbol (bytes >= 0x80 alone are invalid UTF-8, still encoded).
  for (int b = 0; b < 256; ++b) {
    INFO("byte " << b);
    CHECK(tok.encode(std::string(1, char(b))) == Ids{vocab_id(byte_symbol(b))});
  }
}

TEST_CASE("tokenizer pre-tokenizer pieces follow the GPT-2 regex", "[tokenizer]") {
  using Pieces = std::vector<std::string>;
  const auto& tok = gpt2();
  CHECK(tok.pre_tokenize("Hello world") == Pieces{"Hello", " world"});
  CHECK(tok.pre_tokenize("a  b") == Pieces{"a", " ", " b"});
  CHECK(tok.pre_tokenize("hello   ") == Pieces{"hello", "   "});
  CHECK(tok.pre_tokenize(" \n ") == Pieces{" \n "});
  CHECK(tok.pre_tokenize("a \n b") == Pieces{"a", " \n", " b"});
  CHECK(tok.pre_tokenize("\t\t x") == Pieces{"\t\t", " x"});
  CHECK(tok.pre_tokenize("DON'T don't") == Pieces{"DON", "'", "T", " don", "'t"});
  CHECK(tok.pre_tokenize("3.14 1,000") == Pieces{"3", ".", "14", " 1", ",", "000"});
  // Unicode whitespace as Oniguruma (HF) sees it: White_Space, so NBSP, U+0085, U+3000 yes;
  // U+200B, U+FEFF and U+180E (Cf since Unicode 6.3, yet in PCRE2's \s) no.
  CHECK(tok.pre_tokenize("x \u00a0y") == Pieces{"x", " ", "\u00a0", "y"});
  CHECK(tok.pre_tokenize("x \u0085y") == Pieces{"x", " ", "\u0085", "y"});
  CHECK(tok.pre_tokenize("x \u3000y") == Pieces{"x", " ", "\u3000", "y"});
  CHECK(tok.pre_tokenize("x \u200by") == Pieces{"x", " \u200b", "y"});
  CHECK(tok.pre_tokenize("x \ufeffy") == Pieces{"x", " \ufeff", "y"});
  CHECK(tok.pre_tokenize("x \u180ey") == Pieces{"x", " \u180e", "y"});
  CHECK(tok.pre_tokenize("日本語 テキスト") == Pieces{"日本語", " テキスト"});
}

TEST_CASE("tokenizer splits out <|endoftext|> unless told to treat it as text", "[tokenizer]") {
  const auto& tok = gpt2();
  const int32_t eot = tok.eot_id();
  auto concat = [](std::initializer_list<Ids> parts) {
    Ids out;
    for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
    return out;
  };
  CHECK(tok.encode("<|endoftext|>") == Ids{eot});
  CHECK(tok.encode("<|endoftext|><|endoftext|>") == Ids{eot, eot});
  CHECK(tok.encode("Hello<|endoftext|>world") == concat({tok.encode("Hello"), {eot}, tok.encode("world")}));
  CHECK(tok.encode(" <|endoftext|> ") == concat({tok.encode(" "), {eot}, tok.encode(" ")}));
  CHECK(tok.encode("<|<|endoftext|>|>") == concat({tok.encode("<|"), {eot}, tok.encode("|>")}));
  for (const std::string s : {"<|endoftext|", "<|ENDOFTEXT|>", "<endoftext|>"}) {
    Ids ids = tok.encode(s);
    CHECK(std::find(ids.begin(), ids.end(), eot) == ids.end());
  }
  Ids as_text = tok.encode("a<|endoftext|>b", SpecialTokens::AsText);
  CHECK(std::find(as_text.begin(), as_text.end(), eot) == as_text.end());
  CHECK(as_text == concat({tok.encode("a<|"), tok.encode("endoftext"), tok.encode("|>b")}));
  CHECK(tok.decode(as_text) == "a<|endoftext|>b");
  CHECK(tok.decode(Ids{eot}) == "<|endoftext|>");
}

TEST_CASE("tokenizer round-trips the four corpora and hard strings byte for byte", "[tokenizer]") {
  const auto& tok = gpt2();
  for (const auto& corpus : corpora()) {
    std::string text = corpus_text(corpus.file, corpus.latin1);
    auto lines = split_lines(text);
    size_t failures = 0;
    for (size_t i = 0; i < lines.size(); ++i) {
      Ids ids = tok.encode(lines[i]);
      if (tok.decode(ids) != lines[i] && ++failures <= 5)
        FAIL_CHECK(corpus.name << " line " << i + 1 << " does not round-trip: " << shown(lines[i]));
    }
    CHECK(failures == 0);
    Ids whole = tok.encode(text);
    CHECK(tok.decode(whole) == text);
  }
  for (const auto& s : hard_strings()) {
    INFO(shown(s));
    CHECK(tok.decode(tok.encode(s)) == s);
    CHECK(tok.decode(tok.encode(s, SpecialTokens::AsText)) == s);
  }
}

TEST_CASE("tokenizer survives invalid UTF-8 and huge pieces", "[tokenizer]") {
  const auto& tok = gpt2();
  const std::vector<std::string> invalid = {"\xff", "abc\xc3", "\xc3(", "\xed\xa0\x80 surrogate", "\xf4\x90\x80\x80",
                                            "\xc0\xaf overlong", "word\x80\x80word", "\xe2\x82", " \xf0\x9f\x98"};
  for (const auto& s : invalid) {
    INFO(shown(s));
    Ids ids;
    REQUIRE_NOTHROW(ids = tok.encode(s));
    CHECK(tok.decode(ids) == s);
  }
  uint64_t state = 12345;  // a fixed LCG, so failures reproduce
  for (int n = 0; n < 3000; ++n) {
    std::string s;
    size_t len = (state >> 33) % 48;
    for (size_t i = 0; i < len; ++i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      s += char(state >> 56);
    }
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    Ids ids;
    REQUIRE_NOTHROW(ids = tok.encode(s));
    for (int32_t id : ids) REQUIRE((id >= 0 && id < tok.vocab_size()));
    REQUIRE(tok.decode(ids) == s);
  }
  for (const std::string& s : {std::string(300000, 'a'), std::string(300000, ' ') + "x", std::string(300000, '7'),
                               std::string(100000, '!')}) {
    Ids ids;
    REQUIRE_NOTHROW(ids = tok.encode(s));
    CHECK(tok.decode(ids) == s);
  }
}

TEST_CASE("tokenizer decode rejects ids outside the vocabulary", "[tokenizer]") {
  const auto& tok = gpt2();
  CHECK_THROWS_AS(tok.decode(Ids{-1}), engine::Error);
  CHECK_THROWS_WITH(tok.decode(Ids{15496, 50257}), Catch::Contains("50257") && Catch::Contains("not in the vocabulary"));
  CHECK_THROWS_AS(tok.id_to_token(1 << 30), engine::Error);
  CHECK(tok.decode(Ids{}).empty());
}

TEST_CASE("tokenizer is safe to share between threads", "[tokenizer]") {
  auto tok = GPT2Tokenizer::from_dir(test_data_dir() + "/gpt2-tokenizer");  // fresh: an empty cache
  auto lines = split_lines(corpus_text("wikitext-2-raw/wiki.test.raw", false));
  lines.resize(std::min<size_t>(lines.size(), 1500));
  std::vector<Ids> expected;
  for (const auto& line : lines) expected.push_back(gpt2().encode(line));
  std::vector<size_t> wrong(4, 0);
  std::vector<std::thread> workers;
  for (size_t t = 0; t < wrong.size(); ++t)
    workers.emplace_back([&, t] {
      for (size_t i = t; i < lines.size(); i += 2)  // overlapping halves, so threads race on the same pieces
        if (tok.encode(lines[i]) != expected[i]) ++wrong[t];
    });
  for (auto& w : workers) w.join();
  for (size_t count : wrong) CHECK(count == 0);
}

TEST_CASE("tokenizer applies merges by rank, leftmost first, like tokenizers", "[tokenizer]") {
  TempDir dir;
  write_bytes(dir.path / "vocab.json", byte_vocab({"bc", "ab", "abc", "aa", "aaaa"}).dump());
  // "b c" outranks "a b", so "abc" is a + bc (and "abc" is unreachable); "a a" pairs leftmost first.
  write_bytes(dir.path / "merges.txt", "#version: 0.2\nb c\na b\nab c\na a\naa aa\n");
  auto tok = GPT2Tokenizer::from_dir(dir.path.string());
  auto id = [&](const char* token) { return *tok.token_to_id(token); };
  CHECK(tok.merge_count() == 5);
  CHECK(tok.encode("abc") == Ids{id("a"), id("bc")});
  CHECK(tok.encode("abd") == Ids{id("ab"), id("d")});
  CHECK(tok.encode("aaa") == Ids{id("aa"), id("a")});
  CHECK(tok.encode("aaaaa") == Ids{id("aaaa"), id("a")});
  CHECK_THROWS_WITH(tok.eot_id(), Catch::Contains("<|endoftext|>"));
  CHECK(tok.encode("<|endoftext|>").size() == 13);  // no such token here: bytes, and no merge applies
}

TEST_CASE("tokenizer reports malformed files in one line naming the file", "[tokenizer]") {
  const std::string vocab = byte_vocab({"ab"}).dump();
  const std::string merges = "#version: 0.2\na b\n";
  CHECK(load_error(vocab, merges).empty());
  CHECK(load_error(vocab, "a b").empty());         // no final newline
  CHECK(load_error(vocab, "a b\r\n").empty());     // CRLF
  auto expect = [](const std::string& message, const std::string& fragment, const char* file) {
    INFO(message);
    CHECK(message.find(fragment) != std::string::npos);
    CHECK(message.find(file) != std::string::npos);
    CHECK(message.find('\n') == std::string::npos);
  };
  expect(load_error("{\"a\": 1,", merges), "not valid JSON", "vocab.json");
  expect(load_error("[1, 2]", merges), "expected a JSON object", "vocab.json");
  expect(load_error("{}", merges), "empty object", "vocab.json");
  expect(load_error("{\"a\": \"1\"}", merges), "integer id", "vocab.json");
  expect(load_error("{\"a\": 1.5}", merges), "integer id", "vocab.json");
  expect(load_error("{\"a\": -3}", merges), "has id -3", "vocab.json");
  expect(load_error("{\"a\": 99999999999}", merges), "expected 0..", "vocab.json");
  expect(load_error("{\"a\": 0, \"b\": 0}", merges), "is given to both", "vocab.json");
  expect(load_error("{\"a\": 16000000}", merges), "few gaps", "vocab.json");
  expect(load_error("{\"a\": 0, \"b\": 1}", merges), "lacks the byte-level token", "vocab.json");
  expect(load_error(vocab, "a\n"), "expected two tokens", "merges.txt");
  expect(load_error(vocab, "a b c\n"), "line 1", "merges.txt");
  expect(load_error(vocab, "a  b\n"), "expected two tokens", "merges.txt");
  expect(load_error(vocab, "a b\n\nb c\n"), "line 2", "merges.txt");
  expect(load_error(vocab, "a zz\n"), "token \"zz\" is not in the vocabulary", "merges.txt");
  expect(load_error(vocab, "b c\n"), "token \"bc\" is not in the vocabulary", "merges.txt");

  TempDir dir;
  CHECK_THROWS_WITH(GPT2Tokenizer::from_files((dir.path / "nope.json").string(), (dir.path / "m.txt").string()),
                    Catch::Contains("nope.json") && Catch::Contains("not found"));
  CHECK_THROWS_WITH(GPT2Tokenizer::from_dir(dir.path.string()), Catch::Contains("neither"));
  CHECK_THROWS_WITH(GPT2Tokenizer::from_dir((dir.path / "missing").string()), Catch::Contains("not found"));
  write_bytes(dir.path / "vocab.json", vocab);
  CHECK_THROWS_WITH(GPT2Tokenizer::from_dir(dir.path.string()), Catch::Contains("but not merges.txt"));
}

// ---------------------------------------------------------------- Hugging Face goldens

TEST_CASE("tokenizer matches Hugging Face ids on the corpora", "[tokenizer][golden]") {
  const std::string dir = golden_tokenizer_dir();
  if (!fs::exists(dir + "/corpus_wikitext2_test.json")) {
    WARN("no tokenizer goldens in " << dir << "; run tools/goldens/make_tokenizer_goldens.py (see its README)");
    return;
  }
  const auto& tok = gpt2();
  std::map<std::string, std::string> files = {{"wikitext2_test_whole", "wikitext-2-raw/wiki.test.raw"}};
  for (const auto& c : corpora()) files[c.name] = c.file;
  for (const auto& [name, file] : files) {
    std::string path = dir + "/corpus_" + name + ".json";
    if (!fs::exists(path)) {
      FAIL_CHECK("golden file missing: " << path);
      continue;
    }
    auto golden = nlohmann::json::parse(read_bytes(path));
    REQUIRE(golden["file"].get<std::string>() == file);
    std::string text = corpus_text(file, golden["encoding"].get<std::string>() == "latin-1");
    std::vector<std::string> lines = golden["whole_file"].get<bool>() ? std::vector<std::string>{text} : split_lines(text);
    const auto& counts = golden["counts"];
    const auto& hashes = golden["hashes"];
    const auto& first_ids = golden["first_ids"];
    REQUIRE(counts.size() == lines.size());
    size_t mismatches = 0;
    for (size_t i = 0; i < lines.size(); ++i) {
      Ids ids = tok.encode(lines[i]);
      bool same = ids.size() == counts[i].get<size_t>() && fnv1a64_hex(ids) == hashes[i].get<std::string>();
      std::string expected = std::to_string(counts[i].get<size_t>()) + " ids";
      if (i < first_ids.size()) {
        Ids want = first_ids[i].get<Ids>();
        Ids head(ids.begin(), ids.begin() + std::ptrdiff_t(std::min(ids.size(), want.size())));
        same = same && head == want;
        expected += ": " + ids_text(want);
      }
      if (!same && ++mismatches <= 10)
        FAIL_CHECK(name << " line " << i + 1 << ": " << shown(lines[i]) << "\n  ours (" << ids.size()
                        << " ids): " << ids_text(ids) << "\n  expected " << expected);
    }
    INFO(name << ": " << lines.size() << " strings");
    CHECK(mismatches == 0);
  }
}

TEST_CASE("tokenizer matches Hugging Face ids on adversarial strings", "[tokenizer][golden]") {
  const std::string path = golden_tokenizer_dir() + "/adversarial.json";
  if (!fs::exists(path)) {
    WARN("no tokenizer goldens at " << path << "; run tools/goldens/make_tokenizer_goldens.py");
    return;
  }
  const auto& tok = gpt2();
  auto golden = nlohmann::json::parse(read_bytes(path));
  REQUIRE(golden["cases"].size() > 40);
  for (const auto& c : golden["cases"]) {
    std::string text = from_hex(c["utf8_hex"].get<std::string>());
    INFO(c["name"].get<std::string>() << ": " << shown(text));
    REQUIRE(text == c["text"].get<std::string>());
    CHECK(ids_text(tok.encode(text), 100000) == ids_text(c["ids"].get<Ids>(), 100000));
    if (!c["ids_as_text"].is_null())
      CHECK(ids_text(tok.encode(text, SpecialTokens::AsText), 100000) ==
            ids_text(c["ids_as_text"].get<Ids>(), 100000));
  }
}
