// data::TokenizedDataset and data::Batch: each example tokenised once (a sentence pair is
// the two encodings joined, as GPT-2's Hugging Face tokenizer does it), then cut into
// right-padded int32 batches in an order that is a pure function of (seed, epoch).
#pragma once

#include "data/datasets.h"
#include "engine/tensor.h"

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace data {

class GPT2Tokenizer;

struct TokenizedDataset {
  std::string source;
  int64_t max_length = 0;                 // no sequence is longer
  std::vector<std::vector<int32_t>> ids;  // one sequence per example, at least one token each
  std::vector<int64_t> labels;
  size_t size() const { return ids.size(); }
};

// ---- tokenising ----

// The lengths Hugging Face's `longest_first` truncation keeps of a pair of n1 and n2
// tokens so that at most max_length remain. This is the rule of the `tokenizers` library,
// which AutoTokenizer's GPT-2 tokenizer runs: if the shorter part fits in half or less,
// the longer one gets the rest; otherwise the shorter part keeps max_length / 2 and the
// longer part the other ceil(max_length / 2) (the second part, when both are as long).
// It equals cutting one token at a time from the longer part, on a tie from the part that
// was the shorter (or the first) at the start. (transformers' slow Python tokenizer breaks
// ties the other way, so for an odd max_length it can give the other part the extra token.)
std::pair<size_t, size_t> longest_first_lengths(size_t n1, size_t n2, size_t max_length);

// The ids a model sees for one example, as HF's tokenizer(text, text_pair, truncation=True,
// max_length=max_length) gives them for GPT-2: encode(text) then encode(text_pair), each
// encoded on its own and joined with no separator, space or special token (GPT-2 has no pair
// template: build_inputs_with_special_tokens returns ids_0 + ids_1). A single text keeps its
// first max_length tokens; each part of a pair keeps the head that longest_first_lengths allows.
std::vector<int32_t> encode_example(const GPT2Tokenizer& tokenizer, const Example& example, size_t max_length);

// Tokenises every example once, in parallel. Throws engine::Error naming the source and
// the example when one encodes to no tokens: a classifier needs one real position.
TokenizedDataset tokenize(const Dataset& dataset, const GPT2Tokenizer& tokenizer, int64_t max_length);

// ---- seeded order ----
// Every shuffle is Fisher-Yates from the back whose draws come from engine::philox_uniform
// (engine/rng.h). Draw t of a stream (key, block offset O) is the 48-bit integer
//   r_t = a * 2^24 + b,  a = 2^24 * philox_uniform(key, O, 2t),  b = 2^24 * philox_uniform(key, O, 2t + 1)
// and for i = n-1 down to 1, with t = n-1-i, item i swaps with item j = floor(r_t * (i+1) / 2^48).
// (One 24-bit uniform would bias j by up to n / 2^24, 0.4% at SST-2's 67349 rows; 48 bits make it
// negligible.) So an order can be recomputed anywhere, in any language, from (key, O) alone.
void philox_shuffle(std::span<size_t> items, uint64_t key, uint64_t block_offset);

// Philox key of the shuffles below: seed XOR kShuffleKey, so that they draw different numbers
// from dropout or balanced_sample run with the same seed. The bytes spell "SHUFFLE1".
inline constexpr uint64_t kShuffleKey = 0x53485546464C4531ull;

// The order of n examples in `epoch`: philox_shuffle of 0..n-1 with key seed ^ kShuffleKey and
// block offset epoch * 2^33. A pure function, so a resumed run re-creates any epoch's order.
std::vector<size_t> epoch_permutation(size_t n, uint64_t seed, uint64_t epoch);

// ---- batches ----

struct BatchOptions {
  int64_t batch_size = 32;
  bool shuffle = true;  // false: file order, as the paper's code slices dataset[i:i+32]
  uint64_t seed = 0;
  // Length bucketing, 0 = off. Otherwise the epoch's order is cut into windows of
  // bucket_batches * batch_size examples; each window is sorted by length (stably) and cut
  // into batches, and then, when shuffle is on, the batches themselves are shuffled with
  // block offset epoch * 2^33 + 2^32. Less padding, still every example once per epoch.
  int64_t bucket_batches = 0;
  bool drop_last = false;  // drop the epoch's final batch when it is smaller than batch_size
  // true: every batch is max_length wide (HF padding='max_length'); false: as wide as its
  // longest row (HF padding=True, what the paper's code uses).
  bool pad_to_max_length = false;
  int32_t pad_id = 50256;  // GPT-2's <|endoftext|>: the paper's code sets pad_token = eos_token
};

// The example indices of each batch of `epoch`, in the order they are to be used.
std::vector<std::vector<size_t>> epoch_batches(const TokenizedDataset& dataset, const BatchOptions& options,
                                               uint64_t epoch);

// Batches of examples that are all as long: the examples sorted by length (file order within a
// length) and each length's run cut into batches of at most max_rows. No row is padded, so each
// computes what it would alone (up to rounding); this is how a batch size of 1 is evaluated, in
// far fewer calls.
std::vector<std::vector<size_t>> equal_length_batches(const TokenizedDataset& dataset, int64_t max_rows);

// CPU tensors for one batch. Rows are padded on the right (GPT-2's default padding side),
// so a row's real tokens sit at positions 0..length-1 and its last one at length-1.
struct Batch {
  engine::Tensor ids;             // [B, T] int32; pad_id after each row's tokens
  engine::Tensor attention_mask;  // [B, T] int32; 1 for a real token, 0 for padding
  engine::Tensor labels;          // [B] int32
  engine::Tensor last_index;      // [B] int32; position of each row's last real token
  std::vector<size_t> rows;       // which examples of the dataset, in batch order
};

Batch make_batch(const TokenizedDataset& dataset, std::span<const size_t> rows, const BatchOptions& options);

}  // namespace data
