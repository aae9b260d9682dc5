// GPT-2 byte-level BPE, following Hugging Face `tokenizers` step by step:
//   1. split out special tokens ("<|endoftext|>") wherever they occur;
//   2. the ByteLevel pre-tokenizer: the GPT-2 regex cuts each remaining span into pieces;
//   3. the BPE model: each piece's bytes start as one symbol each (in the
//      bytes_to_unicode alphabet) and merges apply lowest rank first, leftmost
//      on ties, exactly as tokenizers' `Word::merge_all` does.
#include "data/gpt2_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <mutex>
#include <unordered_map>

#include "engine/error.h"

namespace data {
namespace {

constexpr std::string_view kEndOfText = "<|endoftext|>";

// Oniguruma (which HF tokenizers uses) defines Unicode \s as the White_Space
// property: \t..\r, U+0085 and the Z categories. PCRE2's UCP \s also takes
// U+180E (as \h does), so the class is spelled out to match Oniguruma exactly.
#define WS "\\t\\n\\x{0B}\\f\\r\\x{85}\\p{Z}"
constexpr const char* kPattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS "\\p{L}\\p{N}]+|[" WS "]+(?![^" WS "])|[" WS "]+";
#undef WS

// Caching long pieces would only fill memory with strings unlikely to repeat.
constexpr size_t kMaxCachedPieceBytes = 64;
constexpr size_t kMaxCacheEntries = 1 << 18;

// ---------------------------------------------------------------- byte alphabet

// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the
// other 68 map to U+0100.. in byte order, so no token contains a space or control.
std::array<uint32_t, 256> byte_to_codepoint() {
  std::array<uint32_t, 256> table{};
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    table[b] = printable ? b : next++;
  }
  return table;
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

// Decodes the code point at s[i] and advances i. Only used on strings that the
// JSON parser already validated as UTF-8.
uint32_t next_codepoint(std::string_view s, size_t& i) {
  auto byte = [&](size_t k) { return uint32_t(uint8_t(s[k])); };
  uint32_t c = byte(i);
  int extra = c < 0x80 ? 0 : c < 0xE0 ? 1 : c < 0xF0 ? 2 : 3;
  uint32_t cp = extra == 0 ? c : extra == 1 ? (c & 0x1F) : extra == 2 ? (c & 0x0F) : (c & 0x07);
  for (int k = 1; k <= extra && i + k < s.size(); ++k) cp = (cp << 6) | (byte(i + k) & 0x3F);
  i += size_t(extra) + 1;
  return cp;
}

// Token text for an error message: escaped and shortened so it stays one line.
std::string printable(std::string_view s) {
  std::string out = "\"";
  for (char ch : s.substr(0, 40)) {
    if (uint8_t(ch) < 0x20 || ch == '"' || ch == '\\') out += fmt::format("\\x{:02x}", uint8_t(ch));
    else out += ch;
  }
  return out + (s.size() > 40 ? "...\"" : "\"");
}

std::string read_file(const std::string& path, std::string_view what) {
  std::error_code ec;
  engine::check(std::filesystem::is_regular_file(path, ec), "GPT-2 {} file '{}' not found (or not a regular file)",
                what, path);
  std::ifstream in(path, std::ios::binary);
  engine::check(in.good(), "cannot open GPT-2 {} file '{}'", what, path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  engine::check(!in.bad(), "error reading GPT-2 {} file '{}'", what, path);
  return text;
}

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <typename V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

struct MergeRule {
  uint32_t rank;
  int32_t merged_id;
};

// (left id, right id) -> rule, open addressing with linear probing: this lookup
// is the inner loop of BPE, and std::unordered_map's node chasing doubled its cost.
class MergeTable {
 public:
  static uint64_t key(int32_t left, int32_t right) { return (uint64_t(uint32_t(left)) << 32) | uint32_t(right); }

  const MergeRule* find(uint64_t key) const {
    if (slots_.empty()) return nullptr;
    for (size_t i = hash(key) & mask_;; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return &slots_[i].rule;
      if (slots_[i].key == kEmpty) return nullptr;
    }
  }

  void insert_or_assign(uint64_t key, MergeRule rule) {
    if (2 * (size_ + 1) > slots_.size()) grow();
    size_t i = hash(key) & mask_;
    while (slots_[i].key != kEmpty && slots_[i].key != key) i = (i + 1) & mask_;
    if (slots_[i].key == kEmpty) ++size_;
    slots_[i] = Slot{key, rule};
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);  // ids stay below 2^24, so no real key collides
  struct Slot {
    uint64_t key;
    MergeRule rule;
  };
  static size_t hash(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    return size_t(k ^ (k >> 33));
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(std::max<size_t>(1024, old.size() * 2), Slot{kEmpty, {}});
    mask_ = slots_.size() - 1;
    size_ = 0;
    for (const Slot& s : old)
      if (s.key != kEmpty) insert_or_assign(s.key, s.rule);
  }
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

// Working memory of one encode call, reused for all its pieces.
struct BpeScratch {
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  struct Candidate {
    uint32_t rank;
    uint32_t pos;
    int32_t merged_id;
    // std heaps are max-heaps; "greater" puts the lowest rank, then leftmost position, on top.
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::vector<Symbol> symbols;
  std::vector<Candidate> heap;
};

// ---------------------------------------------------------------- regex

class PieceRegex {
 public:
  PieceRegex() {
    int error = 0;
    PCRE2_SIZE offset = 0;
    // MATCH_INVALID_UTF: invalid bytes simply never match instead of failing the call.
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kPattern), PCRE2_ZERO_TERMINATED,
                          PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &offset, nullptr);
    if (!code_) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof message);
      engine::fail("GPT-2 pre-tokenizer regex failed to compile at offset {}: {}", offset,
                   reinterpret_cast<const char*>(message));
    }
    // Without JIT (an unsupported CPU) pcre2_match still works, only slower.
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
  }
  ~PieceRegex() { pcre2_code_free(code_); }
  PieceRegex(const PieceRegex&) = delete;
  PieceRegex& operator=(const PieceRegex&) = delete;

  // Calls piece(begin, end) for every piece of text, in order, covering all of
  // it: matches, and the runs of invalid UTF-8 between them.
  template <typename F>
  void split(std::string_view text, F&& piece) const {
    if (text.empty()) return;
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> match(
        pcre2_match_data_create(1, nullptr), &pcre2_match_data_free);
    engine::check(match != nullptr, "out of memory allocating regex match data");
    auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t pos = 0;
    while (pos < text.size()) {
      int rc = jit_ ? pcre2_jit_match(code_, subject, text.size(), pos, 0, match.get(), nullptr)
                    : pcre2_match(code_, subject, text.size(), pos, 0, match.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) {
        piece(pos, text.size());
        return;
      }
      if (rc < 0) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof message);
        engine::fail("GPT-2 pre-tokenizer regex failed at byte {}: {}", pos, reinterpret_cast<const char*>(message));
      }
      const PCRE2_SIZE* span = pcre2_get_ovector_pointer(match.get());
      engine::check(span[1] > span[0], "GPT-2 pre-tokenizer regex matched an empty piece at byte {}", span[0]);
      if (span[0] > pos) piece(pos, size_t(span[0]));
      piece(size_t(span[0]), size_t(span[1]));
      pos = span[1];
    }
  }

 private:
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

}  // namespace

// ---------------------------------------------------------------- state

struct GPT2Tokenizer::Impl {
  StringMap<int32_t> token_to_id;
  std::vector<std::string> id_to_token;  // "" for ids the vocab skips
  std::vector<std::string> id_to_bytes;  // what decode() emits per id
  std::vector<uint8_t> id_present;
  std::array<int32_t, 256> byte_id{};    // initial BPE symbol of each byte
  MergeTable merges;
  size_t merge_count = 0;
  std::vector<std::pair<std::string, int32_t>> specials;
  PieceRegex regex;

  mutable std::mutex cache_mutex;
  mutable StringMap<std::vector<int32_t>> cache;

  void load_vocab(const std::string& path);
  void load_merges(const std::string& path);
  void bpe(std::string_view piece, std::vector<int32_t>& out, BpeScratch& scratch) const;
  void encode_piece(std::string_view piece, std::vector<int32_t>& out, BpeScratch& scratch) const;
  void encode_ordinary(std::string_view text, std::vector<int32_t>& out, BpeScratch& scratch) const;
};

void GPT2Tokenizer::Impl::load_vocab(const std::string& path) {
  std::string text = read_file(path, "vocab");
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    engine::fail("GPT-2 vocab file '{}' is not valid JSON: {}", path, e.what());
  }
  engine::check(json.is_object(), "GPT-2 vocab file '{}': expected a JSON object of token -> id, found {}", path,
                json.type_name());
  engine::check(!json.empty(), "GPT-2 vocab file '{}' is an empty object", path);
  constexpr int64_t kMaxId = (int64_t(1) << 24) - 1;  // far above any real vocab; bounds the tables
  int64_t max_id = -1;
  for (const auto& [token, value] : json.items()) {
    engine::check(value.is_number_integer(), "GPT-2 vocab file '{}': token {} has a {} where an integer id belongs",
                  path, printable(token), value.type_name());
    int64_t id = value.is_number_unsigned() ? int64_t(std::min<uint64_t>(value.get<uint64_t>(), uint64_t(kMaxId) + 1))
                                            : value.get<int64_t>();
    engine::check(id >= 0 && id <= kMaxId, "GPT-2 vocab file '{}': token {} has id {}, expected 0..{}", path,
                  printable(token), value.dump(), kMaxId);
    engine::check(!token.empty(), "GPT-2 vocab file '{}': empty token string (id {})", path, id);
    max_id = std::max(max_id, id);
  }
  // The id tables are dense, so a stray huge id must not make them huge.
  engine::check(size_t(max_id) < 2 * json.size() + 1024,
                "GPT-2 vocab file '{}': ids run up to {} for only {} tokens; expected ids 0..{} with few gaps", path,
                max_id, json.size(), json.size() - 1);
  id_to_token.assign(size_t(max_id + 1), std::string());
  id_present.assign(size_t(max_id + 1), 0);
  for (const auto& [token, value] : json.items()) {
    auto id = size_t(value.get<int64_t>());
    engine::check(!id_present[id], "GPT-2 vocab file '{}': id {} is given to both {} and {}", path, id,
                  printable(id_to_token[id]), printable(token));
    id_present[id] = 1;
    id_to_token[id] = token;
    token_to_id.emplace(token, int32_t(id));
  }

  // Like the ByteLevel decoder: a token made only of alphabet characters
  // becomes those bytes; any other token (an added one) is emitted as its text.
  std::array<int, 0x144> codepoint_to_byte;
  codepoint_to_byte.fill(-1);
  auto table = byte_to_codepoint();
  for (int b = 0; b < 256; ++b) codepoint_to_byte[table[size_t(b)]] = b;
  id_to_bytes.assign(id_to_token.size(), std::string());
  for (size_t id = 0; id < id_to_token.size(); ++id) {
    const std::string& token = id_to_token[id];
    std::string bytes;
    bool in_alphabet = true;
    for (size_t i = 0; i < token.size() && in_alphabet;) {
      uint32_t cp = next_codepoint(token, i);
      in_alphabet = cp < codepoint_to_byte.size() && codepoint_to_byte[cp] >= 0;
      if (in_alphabet) bytes += char(codepoint_to_byte[cp]);
    }
    id_to_bytes[id] = in_alphabet ? bytes : token;
  }

  for (int b = 0; b < 256; ++b) {
    std::string symbol;
    append_utf8(symbol, table[size_t(b)]);
    auto it = token_to_id.find(symbol);
    engine::check(it != token_to_id.end(), "GPT-2 vocab file '{}' lacks the byte-level token {} for byte 0x{:02x}",
                  path, printable(symbol), b);
    byte_id[size_t(b)] = it->second;
  }
  if (auto it = token_to_id.find(kEndOfText); it != token_to_id.end()) specials.emplace_back(kEndOfText, it->second);
}

// merges.txt as tokenizers reads it: "#version" lines are skipped, every other
// line is "left right" with one space; a later duplicate overrides the earlier rank.
void GPT2Tokenizer::Impl::load_merges(const std::string& path) {
  std::string text = read_file(path, "merges");
  std::string_view rest = text;
  size_t line_number = 0;
  while (!rest.empty()) {
    size_t end = rest.find('\n');
    std::string_view line = rest.substr(0, end);
    rest = end == std::string_view::npos ? std::string_view() : rest.substr(end + 1);
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);  // tolerate CRLF files
    if (line.starts_with("#version")) continue;
    if (line.empty() && rest.empty()) break;  // the final newline
    size_t space = line.find(' ');
    engine::check(space != std::string_view::npos && space > 0 && space + 1 < line.size() &&
                      line.find(' ', space + 1) == std::string_view::npos,
                  "GPT-2 merges file '{}' line {}: expected two tokens separated by one space, found {}", path,
                  line_number, printable(line));
    std::string_view left = line.substr(0, space), right = line.substr(space + 1);
    auto lookup = [&](std::string_view token) {
      auto it = token_to_id.find(token);
      engine::check(it != token_to_id.end(), "GPT-2 merges file '{}' line {}: token {} is not in the vocabulary",
                    path, line_number, printable(token));
      return it->second;
    };
    int32_t left_id = lookup(left), right_id = lookup(right);
    int32_t merged_id = lookup(std::string(left) + std::string(right));
    merges.insert_or_assign(MergeTable::key(left_id, right_id), MergeRule{uint32_t(merge_count), merged_id});
    ++merge_count;
  }
}

// ---------------------------------------------------------------- BPE

// A port of tokenizers' Word::merge_all: a min-heap of candidate merges by
// (rank, position). A popped candidate is skipped when its left symbol was
// absorbed, or the pair at its position no longer yields the same token.
void GPT2Tokenizer::Impl::bpe(std::string_view piece, std::vector<int32_t>& out, BpeScratch& scratch) const {
  using Candidate = BpeScratch::Candidate;
  auto& symbols = scratch.symbols;
  auto& heap = scratch.heap;
  const auto n = int32_t(piece.size());
  symbols.resize(size_t(n));
  for (int32_t i = 0; i < n; ++i)
    symbols[size_t(i)] = {byte_id[uint8_t(piece[size_t(i)])], i - 1, i + 1 < n ? i + 1 : -1, true};

  heap.clear();
  auto push = [&](int32_t pos) {
    const auto& s = symbols[size_t(pos)];
    if (s.next < 0) return;
    if (const MergeRule* r = merges.find(MergeTable::key(s.id, symbols[size_t(s.next)].id))) {
      heap.push_back({r->rank, uint32_t(pos), r->merged_id});
      std::push_heap(heap.begin(), heap.end(), std::greater<>());
    }
  };
  for (int32_t i = 0; i + 1 < n; ++i) push(i);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>());
    Candidate top = heap.back();
    heap.pop_back();
    auto& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    auto& right = symbols[size_t(left.next)];
    const MergeRule* current = merges.find(MergeTable::key(left.id, right.id));
    if (!current || current->merged_id != top.merged_id) continue;
    left.id = top.merged_id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[size_t(right.next)].prev = int32_t(top.pos);
    if (left.prev >= 0) push(left.prev);
    push(int32_t(top.pos));
  }
  for (const auto& s : symbols)
    if (s.alive) out.push_back(s.id);
}

void GPT2Tokenizer::Impl::encode_piece(std::string_view piece, std::vector<int32_t>& out, BpeScratch& scratch) const {
  if (piece.size() == 1) {
    out.push_back(byte_id[uint8_t(piece[0])]);
    return;
  }
  bool cacheable = piece.size() <= kMaxCachedPieceBytes;
  if (cacheable) {
    std::lock_guard lock(cache_mutex);
    if (auto it = cache.find(piece); it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  size_t first = out.size();
  bpe(piece, out, scratch);
  if (cacheable) {
    std::lock_guard lock(cache_mutex);
    if (cache.size() >= kMaxCacheEntries) cache.clear();  // crude, but bounds memory on endless novel text
    cache.emplace(std::string(piece), std::vector<int32_t>(out.begin() + std::ptrdiff_t(first), out.end()));
  }
}

void GPT2Tokenizer::Impl::encode_ordinary(std::string_view text, std::vector<int32_t>& out,
                                          BpeScratch& scratch) const {
  regex.split(text, [&](size_t begin, size_t end) { encode_piece(text.substr(begin, end - begin), out, scratch); });
}

// ---------------------------------------------------------------- public API

GPT2Tokenizer::GPT2Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GPT2Tokenizer::GPT2Tokenizer(GPT2Tokenizer&&) noexcept = default;
GPT2Tokenizer& GPT2Tokenizer::operator=(GPT2Tokenizer&&) noexcept = default;
GPT2Tokenizer::~GPT2Tokenizer() = default;

GPT2Tokenizer GPT2Tokenizer::from_files(const std::string& vocab_path, const std::string& merges_path) {
  auto impl = std::make_unique<Impl>();
  impl->load_vocab(vocab_path);
  impl->load_merges(merges_path);
  return GPT2Tokenizer(std::move(impl));
}

GPT2Tokenizer GPT2Tokenizer::from_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  engine::check(fs::is_directory(dir, ec), "GPT-2 tokenizer folder '{}' not found", dir);
  const std::pair<const char*, const char*> namings[] = {{"vocab.json", "merges.txt"}, {"encoder.json", "vocab.bpe"}};
  for (const auto& [vocab, merges] : namings) {
    fs::path vocab_path = fs::path(dir) / vocab, merges_path = fs::path(dir) / merges;
    bool has_vocab = fs::exists(vocab_path, ec), has_merges = fs::exists(merges_path, ec);
    if (has_vocab && has_merges) return from_files(vocab_path.string(), merges_path.string());
    engine::check(has_vocab == has_merges, "GPT-2 tokenizer folder '{}' has {} but not {}", dir,
                  has_vocab ? vocab : merges, has_vocab ? merges : vocab);
  }
  engine::fail("GPT-2 tokenizer folder '{}' has neither vocab.json + merges.txt nor encoder.json + vocab.bpe", dir);
}

std::vector<int32_t> GPT2Tokenizer::encode(std::string_view text, SpecialTokens special) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 4 + 1);
  encode_append(text, ids, special);
  return ids;
}

// Special tokens are found leftmost first, longest on a tie, like the
// Aho-Corasick LeftmostLongest search of tokenizers' AddedVocabulary; the
// regex then runs on each span between them separately.
void GPT2Tokenizer::encode_append(std::string_view text, std::vector<int32_t>& ids, SpecialTokens special) const {
  const Impl& s = *impl_;
  BpeScratch scratch;
  if (special == SpecialTokens::AsText || s.specials.empty()) {
    s.encode_ordinary(text, ids, scratch);
    return;
  }
  std::vector<size_t> next_at(s.specials.size(), 0);  // next occurrence of each, found lazily
  for (size_t k = 0; k < s.specials.size(); ++k) next_at[k] = text.find(s.specials[k].first);
  size_t pos = 0;
  while (true) {
    size_t best = std::string_view::npos;
    for (size_t k = 0; k < s.specials.size(); ++k) {
      if (next_at[k] != std::string_view::npos && next_at[k] < pos) next_at[k] = text.find(s.specials[k].first, pos);
      if (next_at[k] == std::string_view::npos) continue;
      if (best == std::string_view::npos || next_at[k] < next_at[best] ||
          (next_at[k] == next_at[best] && s.specials[k].first.size() > s.specials[best].first.size()))
        best = k;
    }
    if (best == std::string_view::npos) break;
    s.encode_ordinary(text.substr(pos, next_at[best] - pos), ids, scratch);
    ids.push_back(s.specials[best].second);
    pos = next_at[best] + s.specials[best].first.size();
  }
  s.encode_ordinary(text.substr(pos), ids, scratch);
}

std::string GPT2Tokenizer::decode(std::span<const int32_t> ids) const {
  std::string out;
  out.reserve(ids.size() * 4);
  for (int32_t id : ids) {
    engine::check(id >= 0 && size_t(id) < impl_->id_present.size() && impl_->id_present[size_t(id)],
                  "GPT-2 decode: token id {} is not in the vocabulary (valid ids 0..{})", id, vocab_size() - 1);
    out += impl_->id_to_bytes[size_t(id)];
  }
  return out;
}

std::vector<std::string> GPT2Tokenizer::pre_tokenize(std::string_view text) const {
  std::vector<std::string> pieces;
  impl_->regex.split(text, [&](size_t begin, size_t end) { pieces.emplace_back(text.substr(begin, end - begin)); });
  return pieces;
}

int32_t GPT2Tokenizer::vocab_size() const { return int32_t(impl_->id_to_token.size()); }

size_t GPT2Tokenizer::merge_count() const { return impl_->merge_count; }

int32_t GPT2Tokenizer::eot_id() const {
  auto id = token_to_id(kEndOfText);
  engine::check(id.has_value(), "GPT-2 vocabulary has no {} token", kEndOfText);
  return *id;
}

std::optional<int32_t> GPT2Tokenizer::token_to_id(std::string_view token) const {
  auto it = impl_->token_to_id.find(token);
  if (it == impl_->token_to_id.end()) return std::nullopt;
  return it->second;
}

const std::string& GPT2Tokenizer::id_to_token(int32_t id) const {
  engine::check(id >= 0 && size_t(id) < impl_->id_present.size() && impl_->id_present[size_t(id)],
                "GPT-2 token id {} is not in the vocabulary (valid ids 0..{})", id, vocab_size() - 1);
  return impl_->id_to_token[size_t(id)];
}

}  // namespace data
