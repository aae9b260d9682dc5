// CUR selection: energies of columns and rows, their smoothed inversion, and
// a platform-independent inverse-CDF sampler on Philox.
#include "curlora/cur.h"

#include "engine/error.h"
#include "engine/ops.h"

#include <algorithm>
#include <cmath>

namespace curlora {

using engine::check;
using engine::DType;

SelectionProbabilities selection_probabilities(const Tensor& weight) {
  check(weight.defined() && weight.dim() == 2, "CUR selection: weight must be 2-D, got shape {}",
        weight.defined() ? std::string(engine::shape_str(weight.shape())) : "undefined");
  check(engine::is_floating(weight.dtype()), "CUR selection: weight must be floating, got {}",
        engine::dtype_name(weight.dtype()));
  const Tensor w = weight.detach().to(engine::Device::cpu()).to(DType::F64).contiguous();
  const int64_t m = w.size(0), n = w.size(1);
  const double* data = w.data<double>();
  SelectionProbabilities p{std::vector<double>(size_t(n), 0.0), std::vector<double>(size_t(m), 0.0)};
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double sq = data[i * n + j] * data[i * n + j];
      p.rows[size_t(i)] += sq;
      p.cols[size_t(j)] += sq;
    }
  double total = 0;
  for (double r : p.rows) total += r;
  check(total > 0 && std::isfinite(total), "CUR selection: weight [{}, {}] has Frobenius norm {} (need finite, > 0)", m,
        n, std::sqrt(total));
  for (double& c : p.cols) c /= total;
  for (double& r : p.rows) r /= total;
  return p;
}

std::vector<double> inverted_probabilities(const std::vector<double>& p, double epsilon) {
  check(epsilon >= 0 && std::isfinite(epsilon), "CUR selection: epsilon must be finite and >= 0, got {}", epsilon);
  std::vector<double> q(p.size());
  double total = 0;
  for (size_t j = 0; j < p.size(); ++j) {
    check(p[j] + epsilon > 0, "CUR selection: index {} has probability 0 and epsilon is 0, so 1/p is infinite", j);
    q[j] = 1.0 / (p[j] + epsilon);
    total += q[j];
  }
  for (double& x : q) x /= total;
  return q;
}

namespace {

// A uniform double in [0, 1) with 53 random bits from one Philox block.
double uniform53(uint64_t seed, uint64_t block) {
  const engine::Philox4 r = engine::philox4x32_10(seed, block);
  const uint64_t bits = (uint64_t(r.v[0] >> 5) << 26) | uint64_t(r.v[1] >> 6);
  return double(bits) * (1.0 / 9007199254740992.0);  // 2^-53
}

std::vector<double> cumulative_sums(const std::vector<double>& weights) {
  std::vector<double> cumulative(weights.size());
  double running = 0;
  for (size_t j = 0; j < weights.size(); ++j) cumulative[j] = running += weights[j];
  return cumulative;
}

// The smallest j with cumulative[j] > u * total; never an index of weight 0,
// since such a j shares its cumulative sum with the index before it.
int32_t inverse_cdf(const std::vector<double>& cumulative, const std::vector<double>& weights, double u) {
  auto it = std::upper_bound(cumulative.begin(), cumulative.end(), u * cumulative.back());
  size_t j = size_t(it - cumulative.begin());
  // u * total can round up to total itself: fall back to the last positive weight.
  if (j == weights.size()) j = weights.size() - 1;
  while (weights[j] == 0) --j;
  return int32_t(j);
}

uint64_t fnv1a64(const std::string& text) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : text) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

std::vector<int32_t> sample_indices(const std::vector<double>& weights, int64_t count, bool with_replacement,
                                    engine::Generator& gen) {
  check(count >= 0, "sample_indices: count {} is negative", count);
  int64_t positive = 0;
  for (double w : weights) {
    check(w >= 0 && std::isfinite(w), "sample_indices: weights must be finite and >= 0, got {}", w);
    positive += w > 0;
  }
  check(count == 0 || positive > 0, "sample_indices: all {} weights are zero", weights.size());
  check(with_replacement || count <= positive,
        "sample_indices: cannot draw {} distinct indices from {} with non-zero probability", count, positive);

  const uint64_t first_block = gen.reserve(4 * uint64_t(count));
  std::vector<double> remaining = weights;
  std::vector<double> cumulative = cumulative_sums(remaining);
  std::vector<int32_t> drawn;
  drawn.reserve(size_t(count));
  for (int64_t i = 0; i < count; ++i) {
    const int32_t j = inverse_cdf(cumulative, remaining, uniform53(gen.seed(), first_block + uint64_t(i)));
    drawn.push_back(j);
    if (!with_replacement) {
      remaining[size_t(j)] = 0;
      cumulative = cumulative_sums(remaining);
    }
  }
  return drawn;
}

uint64_t layer_seed(uint64_t seed, const std::string& layer_name) { return splitmix64(seed ^ fnv1a64(layer_name)); }

CurSelection select_columns_and_rows(const Tensor& weight, int64_t rank, const SelectionOptions& options,
                                     const std::string& layer_name) {
  check(rank > 0, "CUR selection of '{}': rank must be positive, got {}", layer_name, rank);
  const SelectionProbabilities p = selection_probabilities(weight);
  engine::Generator gen(layer_seed(options.seed, layer_name));
  CurSelection s;
  s.cols = sample_indices(inverted_probabilities(p.cols, options.epsilon), rank, options.with_replacement, gen);
  s.rows = sample_indices(inverted_probabilities(p.rows, options.epsilon), rank, options.with_replacement, gen);
  return s;
}

namespace {

Tensor index_tensor(const std::vector<int32_t>& indices, int64_t size, const Tensor& weight, const char* what) {
  for (int32_t i : indices)
    check(i >= 0 && i < size, "CUR: {} index {} is out of range for a weight of shape {}", what, i,
          engine::shape_str(weight.shape()));
  return Tensor::from_vector<int32_t>(indices, {int64_t(indices.size())}, weight.device());
}

}  // namespace

Tensor gather_columns(const Tensor& weight, const std::vector<int32_t>& cols) {
  engine::NoGradGuard no_grad;
  return engine::index_select(weight.detach(), 1, index_tensor(cols, weight.size(1), weight, "column")).contiguous();
}

Tensor gather_rows(const Tensor& weight, const std::vector<int32_t>& rows) {
  engine::NoGradGuard no_grad;
  return engine::index_select(weight.detach(), 0, index_tensor(rows, weight.size(0), weight, "row")).contiguous();
}

}  // namespace curlora
