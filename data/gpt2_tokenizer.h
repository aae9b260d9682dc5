// data::GPT2Tokenizer: GPT-2's byte-level BPE loaded from vocab.json + merges.txt
// (or OpenAI's encoder.json + vocab.bpe). encode() gives exactly the ids that
// Hugging Face `tokenizers` gives; decode() turns ids back into the raw bytes.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace data {

// What encode() does with "<|endoftext|>" written in the input text.
enum class SpecialTokens {
  Recognize,  // split it out as its own id (50256), as Hugging Face does by default
  AsText,     // tokenize it like ordinary text (HF `split_special_tokens=True`)
};

// Thread safety: after loading, every method is const and may be called from
// several threads at once; the only shared mutable state is the merge cache,
// which a mutex guards.
class GPT2Tokenizer {
 public:
  // Requires readable files; throws engine::Error naming the file and the fault
  // (not JSON, non-integer or duplicate id, bad merge line, token not in vocab).
  static GPT2Tokenizer from_files(const std::string& vocab_path, const std::string& merges_path);
  // Accepts a folder holding vocab.json + merges.txt (HF) or encoder.json + vocab.bpe (OpenAI).
  static GPT2Tokenizer from_dir(const std::string& dir);

  GPT2Tokenizer(GPT2Tokenizer&&) noexcept;
  GPT2Tokenizer& operator=(GPT2Tokenizer&&) noexcept;
  ~GPT2Tokenizer();

  // Any bytes are accepted. Valid UTF-8 gives HF's ids. Bytes that are not valid
  // UTF-8 (which HF cannot receive) never match the pre-tokenizer regex, so each
  // run of them becomes a piece of its own; decode() still restores them exactly.
  std::vector<int32_t> encode(std::string_view text,
                              SpecialTokens special = SpecialTokens::Recognize) const;
  // As encode(), appending to `ids` (saves an allocation per line in loaders).
  void encode_append(std::string_view text, std::vector<int32_t>& ids,
                     SpecialTokens special = SpecialTokens::Recognize) const;

  // Concatenated bytes of the tokens. A token may hold part of a multi-byte
  // character, so the result is raw bytes and need not be valid UTF-8 (HF would
  // put U+FFFD there). Throws engine::Error for an id outside the vocabulary.
  std::string decode(std::span<const int32_t> ids) const;

  // The pre-tokenizer's pieces of `text` (the GPT-2 regex only; no special-token split).
  std::vector<std::string> pre_tokenize(std::string_view text) const;

  int32_t vocab_size() const;  // largest id + 1 (50257 for GPT-2)
  size_t merge_count() const;  // merge rules loaded (50000 for GPT-2)
  // Id of "<|endoftext|>"; throws engine::Error if the vocabulary lacks it.
  int32_t eot_id() const;
  // Vocabulary lookups in the byte-level alphabet ("Ġworld", not " world").
  std::optional<int32_t> token_to_id(std::string_view token) const;
  const std::string& id_to_token(int32_t id) const;  // throws engine::Error if out of range

 private:
  struct Impl;
  explicit GPT2Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace data
