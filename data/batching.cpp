#include "data/batching.h"

#include "data/gpt2_tokenizer.h"
#include "engine/cpu/parallel.h"
#include "engine/error.h"
#include "engine/rng.h"

#include <algorithm>
#include <numeric>

namespace data {

// ---- tokenising ----

std::pair<size_t, size_t> longest_first_lengths(size_t n1, size_t n2, size_t max_length) {
  if (n1 + n2 <= max_length) return {n1, n2};
  // `tokenizers`' closed form: a = the shorter part's length, b = the longer part's.
  bool swapped = n1 > n2;
  size_t a = std::min(n1, n2);
  size_t b = a > max_length ? a : std::max(a, max_length - a);
  if (a + b > max_length) {  // both parts must shrink: split max_length, the longer part rounding up
    a = max_length / 2;
    b = a + max_length % 2;
  }
  // Truncating to a length the part already has is a no-op, hence the min.
  return swapped ? std::pair{std::min(n1, b), std::min(n2, a)} : std::pair{std::min(n1, a), std::min(n2, b)};
}

std::vector<int32_t> encode_example(const GPT2Tokenizer& tokenizer, const Example& example, size_t max_length) {
  std::vector<int32_t> ids = tokenizer.encode(example.text);
  if (!example.text_pair) {
    if (ids.size() > max_length) ids.resize(max_length);
    return ids;
  }
  std::vector<int32_t> pair = tokenizer.encode(*example.text_pair);
  auto [keep1, keep2] = longest_first_lengths(ids.size(), pair.size(), max_length);
  ids.resize(keep1);
  ids.insert(ids.end(), pair.begin(), pair.begin() + ptrdiff_t(keep2));
  return ids;
}

TokenizedDataset tokenize(const Dataset& dataset, const GPT2Tokenizer& tokenizer, int64_t max_length) {
  engine::check(max_length > 0, "tokenize: max_length must be positive, got {}", max_length);
  TokenizedDataset out;
  out.source = dataset.source;
  out.max_length = max_length;
  out.ids.resize(dataset.size());
  out.labels.resize(dataset.size());
  // The tokenizer is safe to share between threads; nothing in the loop throws.
  engine::cpu::parallel_for(int64_t(dataset.size()), 1 << 12, [&](int64_t i) {
    out.ids[size_t(i)] = encode_example(tokenizer, dataset.examples[size_t(i)], size_t(max_length));
    out.labels[size_t(i)] = dataset.examples[size_t(i)].label;
  });
  for (size_t i = 0; i < out.size(); ++i)
    engine::check(!out.ids[i].empty(), "tokenize: example {} of {} encodes to no tokens (its text is empty)", i,
                  dataset.source);
  return out;
}

// ---- seeded order ----

void philox_shuffle(std::span<size_t> items, uint64_t key, uint64_t block_offset) {
  size_t n = items.size();
  // A stream holds 2^32 blocks = 2^34 uniforms = 2^33 draws (see epoch_permutation's offsets).
  engine::check(n < (size_t(1) << 33), "philox_shuffle: {} items exceed the 2^33 a stream can shuffle", n);
  for (size_t i = n; i-- > 1;) {
    uint64_t t = n - 1 - i;
    auto a = uint64_t(engine::philox_uniform(key, block_offset, 2 * t) * 16777216.0f);  // exact: 24-bit integers
    auto b = uint64_t(engine::philox_uniform(key, block_offset, 2 * t + 1) * 16777216.0f);
    uint64_t r = (a << 24) | b;
    auto j = size_t((unsigned __int128)r * (i + 1) >> 48);
    std::swap(items[i], items[j]);
  }
}

namespace {

constexpr uint64_t kEpochBlocks = uint64_t(1) << 33;  // each epoch owns two streams of 2^32 blocks
constexpr uint64_t kBatchOrderBlocks = uint64_t(1) << 32;

uint64_t epoch_offset(uint64_t epoch) {
  engine::check(epoch < (uint64_t(1) << 31), "epoch {} is too large for the shuffle's Philox counters", epoch);
  return epoch * kEpochBlocks;
}

}  // namespace

std::vector<size_t> epoch_permutation(size_t n, uint64_t seed, uint64_t epoch) {
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t(0));
  philox_shuffle(order, seed ^ kShuffleKey, epoch_offset(epoch));
  return order;
}

// ---- batches ----

std::vector<std::vector<size_t>> epoch_batches(const TokenizedDataset& dataset, const BatchOptions& options,
                                               uint64_t epoch) {
  engine::check(options.batch_size > 0, "epoch_batches: batch_size must be positive, got {}", options.batch_size);
  engine::check(options.bucket_batches >= 0, "epoch_batches: bucket_batches must be >= 0, got {}",
                options.bucket_batches);
  size_t n = dataset.size();
  auto batch_size = size_t(options.batch_size);
  std::vector<size_t> order;
  if (options.shuffle) {
    order = epoch_permutation(n, options.seed, epoch);
  } else {
    order.resize(n);
    std::iota(order.begin(), order.end(), size_t(0));
  }

  if (options.bucket_batches > 0) {
    // Sorting within a window, not the whole epoch, keeps batches random in content.
    size_t window = batch_size * size_t(options.bucket_batches);
    for (size_t begin = 0; begin < n; begin += window) {
      auto first = order.begin() + ptrdiff_t(begin);
      auto last = order.begin() + ptrdiff_t(std::min(n, begin + window));
      std::stable_sort(first, last, [&](size_t x, size_t y) { return dataset.ids[x].size() < dataset.ids[y].size(); });
    }
  }

  std::vector<std::vector<size_t>> batches;
  for (size_t begin = 0; begin < n; begin += batch_size) {
    size_t end = std::min(n, begin + batch_size);
    if (end - begin < batch_size && options.drop_last) break;
    batches.emplace_back(order.begin() + ptrdiff_t(begin), order.begin() + ptrdiff_t(end));
  }

  if (options.bucket_batches > 0 && options.shuffle) {
    // Otherwise every window would run from its shortest batch to its longest.
    std::vector<size_t> batch_order(batches.size());
    std::iota(batch_order.begin(), batch_order.end(), size_t(0));
    philox_shuffle(batch_order, options.seed ^ kShuffleKey, epoch_offset(epoch) + kBatchOrderBlocks);
    std::vector<std::vector<size_t>> shuffled;
    shuffled.reserve(batches.size());
    for (size_t k : batch_order) shuffled.push_back(std::move(batches[k]));
    batches = std::move(shuffled);
  }
  return batches;
}

std::vector<std::vector<size_t>> equal_length_batches(const TokenizedDataset& dataset, int64_t max_rows) {
  engine::check(max_rows > 0, "equal_length_batches: max_rows must be positive, got {}", max_rows);
  std::vector<size_t> order(dataset.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t x, size_t y) { return dataset.ids[x].size() < dataset.ids[y].size(); });
  std::vector<std::vector<size_t>> batches;
  for (size_t r : order) {
    if (batches.empty() || batches.back().size() == size_t(max_rows) ||
        dataset.ids[batches.back().front()].size() != dataset.ids[r].size())
      batches.emplace_back();
    batches.back().push_back(r);
  }
  return batches;
}

Batch make_batch(const TokenizedDataset& dataset, std::span<const size_t> rows, const BatchOptions& options) {
  engine::check(!rows.empty(), "make_batch: no rows");
  size_t width = 0;
  for (size_t row : rows) {
    engine::check(row < dataset.size(), "make_batch: row {} is out of range for {} examples of {}", row,
                  dataset.size(), dataset.source);
    engine::check(!dataset.ids[row].empty(), "make_batch: row {} of {} has no tokens", row, dataset.source);
    width = std::max(width, dataset.ids[row].size());
  }
  if (options.pad_to_max_length) {
    engine::check(width <= size_t(dataset.max_length), "make_batch: a row of {} tokens exceeds max_length {}", width,
                  dataset.max_length);
    width = size_t(dataset.max_length);
  }

  auto count = int64_t(rows.size());
  Batch batch;
  batch.ids = engine::Tensor::empty({count, int64_t(width)}, engine::DType::I32);
  batch.attention_mask = engine::Tensor::empty({count, int64_t(width)}, engine::DType::I32);
  batch.labels = engine::Tensor::empty({count}, engine::DType::I32);
  batch.last_index = engine::Tensor::empty({count}, engine::DType::I32);
  int32_t* ids = batch.ids.data<int32_t>();
  int32_t* mask = batch.attention_mask.data<int32_t>();
  int32_t* labels = batch.labels.data<int32_t>();
  int32_t* last = batch.last_index.data<int32_t>();
  for (size_t b = 0; b < rows.size(); ++b) {
    const std::vector<int32_t>& seq = dataset.ids[rows[b]];
    int32_t* row_ids = ids + b * width;
    int32_t* row_mask = mask + b * width;
    std::copy(seq.begin(), seq.end(), row_ids);
    std::fill(row_ids + seq.size(), row_ids + width, options.pad_id);
    std::fill(row_mask, row_mask + seq.size(), 1);
    std::fill(row_mask + seq.size(), row_mask + width, 0);
    engine::check(dataset.labels[rows[b]] >= INT32_MIN && dataset.labels[rows[b]] <= INT32_MAX,
                  "make_batch: label {} does not fit in int32", dataset.labels[rows[b]]);
    labels[b] = int32_t(dataset.labels[rows[b]]);
    last[b] = int32_t(seq.size()) - 1;
  }
  batch.rows.assign(rows.begin(), rows.end());
  return batch;
}

}  // namespace data
