// CUR selection (paper §3, reference code `cur_decomposition`): which columns
// and rows of a weight W feed a CURLoRA adapter. Columns and rows with a
// SMALL share of W's energy are preferred (inverted probabilities), so the
// adapter moves W in directions that matter least to what it already knows.
#pragma once

#include "engine/rng.h"
#include "engine/tensor.h"

#include <cstdint>
#include <string>
#include <vector>

namespace curlora {

using engine::Tensor;

// p_j = ||W[:,j]||^2 / ||W||_F^2 and p_i = ||W[i,:]||^2 / ||W||_F^2, for W as
// it is stored (HF Conv1D: [in, out]), so index j means what it means in the
// reference code. Computed in double.
struct SelectionProbabilities {
  std::vector<double> cols, rows;
};
SelectionProbabilities selection_probabilities(const Tensor& weight);

// The reference's smoothed inversion, normalised: q_j = (1/(p_j + eps)) / sum.
// eps = 0 is the paper's p~_j ∝ 1/p_j; then a zero p_j is an error (its
// inverse is infinite).
std::vector<double> inverted_probabilities(const std::vector<double>& p, double epsilon);

// Draws `count` indices with probability proportional to `weights` (>= 0, not
// necessarily normalised). The procedure is fixed so that one generator state
// gives one answer on every machine and compiler:
//   - draw i uses Philox block b0 + i, where b0 = gen.reserve(4 * count);
//     u = (word0 >> 5 · 2^26 + word1 >> 6) / 2^53, a uniform double in [0, 1);
//   - the cumulative sums c_j of the weights are taken in index order in double;
//     the draw is the smallest j with c_j > u · c_last (inverse CDF);
//   - without replacement each drawn index's weight is set to 0 before the
//     next draw (successive sampling, as numpy's choice(replace=False, p=...)).
std::vector<int32_t> sample_indices(const std::vector<double>& weights, int64_t count, bool with_replacement,
                                    engine::Generator& gen);

// How to choose columns and rows. The defaults are the reference code's:
// eps 0.001, with replacement (so a column may appear twice in C).
struct SelectionOptions {
  double epsilon = 1e-3;
  bool with_replacement = true;
  uint64_t seed = 0;
};

// The indices of one adapted layer: C = W[:, cols], R = W[rows, :].
struct CurSelection {
  std::vector<int32_t> cols, rows;
};

// The Philox key of one layer: splitmix64(seed ^ fnv1a64(layer_name)). Each
// layer's draw depends only on the seed, its own name and its own weight, not
// on which other layers are adapted or in what order.
uint64_t layer_seed(uint64_t seed, const std::string& layer_name);

// Samples `rank` columns, then `rank` rows, from one Generator(layer_seed(...)).
CurSelection select_columns_and_rows(const Tensor& weight, int64_t rank, const SelectionOptions& options,
                                     const std::string& layer_name);

// C = W[:, cols] and R = W[rows, :], detached copies (fixed buffers).
Tensor gather_columns(const Tensor& weight, const std::vector<int32_t>& cols);
Tensor gather_rows(const Tensor& weight, const std::vector<int32_t>& rows);

}  // namespace curlora
