// CURLoRA and LoRA layers: CUR selection (formula, determinism, sampled
// distribution), the factored forward against a naive materialised one,
// gradients by finite differences, frozen bases costing no weight-gradient
// GEMM, injection and parameter counts, merging, and diagnostics.
// Files and the PyTorch/PEFT goldens are in test_curlora_io.cpp.
#include "curlora/inject.h"
#include "engine/precision.h"
#include "engine/profiler.h"
#include "tests/curlora_test_util.h"
#include "tests/gradcheck.h"

#include <catch2/catch.hpp>

#include <map>
#include <set>

using namespace adapter_testing;
using curlora::AdapterConfig;
using curlora::CurLoRALinear;
using curlora::LoRALinear;
using curlora::Method;
using engine::WeightLayout;
using engine::nn::Linear;

namespace {

// a [n, k] @ b [k, m], row-major, in double.
std::vector<double> naive_matmul(const std::vector<double>& a, const std::vector<double>& b, int64_t n, int64_t k,
                                 int64_t m) {
  std::vector<double> c(size_t(n * m), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t p = 0; p < k; ++p)
      for (int64_t j = 0; j < m; ++j) c[size_t(i * m + j)] += a[size_t(i * k + p)] * b[size_t(p * m + j)];
  return c;
}

std::vector<double> naive_transpose(const std::vector<double>& a, int64_t n, int64_t m) {
  std::vector<double> t(a.size());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) t[size_t(j * n + i)] = a[size_t(i * m + j)];
  return t;
}

// A weight whose column j carries energy ∝ (1 + j % 7) and row i ∝ (1 + i % 3):
// probabilities spread over a factor of 7, so the inversion matters.
Tensor graded_weight(int64_t rows, int64_t cols) {
  std::vector<double> w(size_t(rows * cols));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      w[size_t(i * cols + j)] = std::sqrt(double(1 + j % 7) * double(1 + i % 3)) * ((i + j) % 2 ? 1.0 : -1.0);
  return Tensor::from_vector<double>(w, {rows, cols});
}

// A module holding one adapter as child "proj", so find_adapters sees it.
struct Holder : engine::nn::Module {
  explicit Holder(std::shared_ptr<engine::nn::Module> m) { register_module("proj", std::move(m)); }
};

}  // namespace

// ---- selection ----

TEST_CASE("CUR probabilities follow p_j = |W[:,j]|^2 / |W|_F^2 and its smoothed inversion", "[curlora][cur]") {
  const Tensor w = testing::random_f64({7, 11}, 3, false);
  const std::vector<double> v = w.to_vector<double>();
  double total = 0;
  for (double x : v) total += x * x;
  const curlora::SelectionProbabilities p = curlora::selection_probabilities(w.transpose(0, 1).transpose(0, 1));
  REQUIRE(p.cols.size() == 11);
  REQUIRE(p.rows.size() == 7);
  for (int64_t j = 0; j < 11; ++j) {
    double col = 0;
    for (int64_t i = 0; i < 7; ++i) col += v[size_t(i * 11 + j)] * v[size_t(i * 11 + j)];
    CHECK(p.cols[size_t(j)] == Approx(col / total).epsilon(1e-12));
  }
  for (int64_t i = 0; i < 7; ++i) {
    double row = 0;
    for (int64_t j = 0; j < 11; ++j) row += v[size_t(i * 11 + j)] * v[size_t(i * 11 + j)];
    CHECK(p.rows[size_t(i)] == Approx(row / total).epsilon(1e-12));
  }
  // The reference's 1/(p + 0.001), normalised; and eps = 0 is plain 1/p.
  for (double eps : {1e-3, 0.0}) {
    const std::vector<double> q = curlora::inverted_probabilities(p.cols, eps);
    double norm = 0;
    for (double x : p.cols) norm += 1.0 / (x + eps);
    for (size_t j = 0; j < q.size(); ++j) CHECK(q[j] == Approx(1.0 / (p.cols[j] + eps) / norm).epsilon(1e-12));
  }
  CHECK_THROWS_WITH(curlora::inverted_probabilities({0.5, 0.0, 0.5}, 0.0), Catch::Contains("infinite"));
  CHECK_NOTHROW(curlora::inverted_probabilities({0.5, 0.0, 0.5}, 1e-3));
  CHECK_THROWS_WITH(curlora::selection_probabilities(Tensor::zeros({3, 4})), Catch::Contains("Frobenius"));
  CHECK_THROWS_WITH(curlora::selection_probabilities(Tensor::zeros({3})), Catch::Contains("2-D"));
}

TEST_CASE("CUR sampling follows its documented inverse-CDF procedure on Philox", "[curlora][cur]") {
  const std::vector<double> weights = {0.5, 0.0, 2.0, 1.0, 0.25, 3.0, 0.0, 1.25};
  for (bool replace : {true, false}) {
    engine::Generator gen(77);
    gen.reserve(40);  // a generator that has been used before: draws start at its offset
    const uint64_t first_block = gen.offset();
    const std::vector<int32_t> drawn = curlora::sample_indices(weights, 5, replace, gen);
    CHECK(gen.offset() == first_block + 5);  // one block per draw
    // The procedure, re-derived from its description in cur.h.
    std::vector<double> w = weights;
    for (size_t i = 0; i < drawn.size(); ++i) {
      const engine::Philox4 r = engine::philox4x32_10(77, first_block + i);
      const double u = double((uint64_t(r.v[0] >> 5) << 26) | (r.v[1] >> 6)) / 9007199254740992.0;
      double total = 0;
      for (double x : w) total += x;
      double running = 0;
      int32_t expected = -1;
      for (size_t j = 0; j < w.size() && expected < 0; ++j)
        if ((running += w[j]) > u * total) expected = int32_t(j);
      INFO("draw " << i << (replace ? " with" : " without") << " replacement");
      CHECK(drawn[i] == expected);
      if (!replace) w[size_t(expected)] = 0;
    }
    if (!replace) CHECK(std::set<int32_t>(drawn.begin(), drawn.end()).size() == drawn.size());
  }
  engine::Generator gen(1);
  CHECK_THROWS_WITH(curlora::sample_indices(weights, 7, false, gen), Catch::Contains("distinct"));
  CHECK_THROWS_WITH(curlora::sample_indices({0.0, 0.0}, 1, true, gen), Catch::Contains("zero"));
  CHECK_THROWS(curlora::sample_indices({1.0, -1.0}, 1, true, gen));
}

TEST_CASE("CUR selection is deterministic per seed and layer, and differs across seeds", "[curlora][cur]") {
  const Tensor w = testing::random_f64({40, 120}, 9, false);
  const curlora::SelectionOptions options{1e-3, true, 1234};
  const auto a = curlora::select_columns_and_rows(w, 8, options, "h.0.attn.c_attn");
  const auto b = curlora::select_columns_and_rows(w.clone(), 8, options, "h.0.attn.c_attn");
  CHECK(a.cols == b.cols);
  CHECK(a.rows == b.rows);
  for (int32_t c : a.cols) CHECK((c >= 0 && c < 120));
  for (int32_t r : a.rows) CHECK((r >= 0 && r < 40));
  const auto other_seed = curlora::select_columns_and_rows(w, 8, {1e-3, true, 1235}, "h.0.attn.c_attn");
  const auto other_layer = curlora::select_columns_and_rows(w, 8, options, "h.1.attn.c_attn");
  CHECK(other_seed.cols != a.cols);
  CHECK(other_layer.cols != a.cols);
  CHECK(curlora::layer_seed(1234, "h.0.attn.c_attn") != curlora::layer_seed(1234, "h.1.attn.c_attn"));
  const auto distinct = curlora::select_columns_and_rows(w, 30, {0.0, false, 5}, "x");
  CHECK(std::set<int32_t>(distinct.cols.begin(), distinct.cols.end()).size() == 30);
  CHECK(std::set<int32_t>(distinct.rows.begin(), distinct.rows.end()).size() == 30);
  CHECK_THROWS_WITH(curlora::select_columns_and_rows(w, 41, {0.0, false, 5}, "x"), Catch::Contains("distinct"));
  CHECK_THROWS_WITH(curlora::select_columns_and_rows(w, 0, options, "x"), Catch::Contains("rank"));
}

TEST_CASE("sampled CUR indices follow the inverted distribution (eps = 0)", "[curlora][cur][statistics]") {
  // Fixed seeds: the outcome is deterministic, and the bounds are ~5 standard
  // deviations, so a correct sampler passes with any seed too.
  const Tensor w = graded_weight(30, 210);
  const curlora::SelectionProbabilities p = curlora::selection_probabilities(w);
  const std::vector<double> q = curlora::inverted_probabilities(p.cols, 0.0);
  // The graded weight makes q_j ∝ 1/(1 + j % 7): column 0's class is 7x as likely as column 6's.
  CHECK(q[0] / q[6] == Approx(7.0).epsilon(1e-9));

  SECTION("with replacement: the frequency of every index") {
    const int64_t draws = 400000;
    engine::Generator gen(2024);
    std::vector<int64_t> counts(q.size(), 0);
    for (int32_t j : curlora::sample_indices(q, draws, true, gen)) ++counts[size_t(j)];
    double chi2 = 0;
    for (size_t j = 0; j < q.size(); ++j) {
      const double expected = q[j] * double(draws);
      CHECK(std::abs(double(counts[j]) - expected) < 5 * std::sqrt(expected) + 1);
      chi2 += (double(counts[j]) - expected) * (double(counts[j]) - expected) / expected;
    }
    CHECK(chi2 < 209 + 5 * std::sqrt(2 * 209.0));  // 209 degrees of freedom
  }
  SECTION("without replacement: the first pick follows q, later picks exclude earlier ones") {
    const int64_t trials = 60000;
    std::vector<int64_t> first(q.size(), 0);
    for (int64_t s = 0; s < trials; ++s) {
      engine::Generator gen(curlora::layer_seed(uint64_t(s), "synthetic"));  // as select_columns_and_rows seeds
      const std::vector<int32_t> cols = curlora::sample_indices(q, 4, false, gen);
      ++first[size_t(cols[0])];
      REQUIRE(std::set<int32_t>(cols.begin(), cols.end()).size() == 4);
    }
    // Pool the 30 columns of each energy class (j % 7) for a sharper test.
    for (int c = 0; c < 7; ++c) {
      double pooled_q = 0, pooled = 0;
      for (size_t j = size_t(c); j < q.size(); j += 7) pooled_q += q[j], pooled += double(first[j]);
      const double sd = std::sqrt(pooled_q * (1 - pooled_q) / double(trials));
      CHECK(std::abs(pooled / double(trials) - pooled_q) < 5 * sd);
    }
  }
  SECTION("without replacement: inclusion probabilities of successive sampling") {
    // P(i in a draw of 2) = q_i + sum_{j != i} q_j q_i / (1 - q_j), exactly.
    const std::vector<double> small = {0.4, 0.25, 0.2, 0.1, 0.05};
    const int64_t trials = 100000;
    std::vector<int64_t> included(small.size(), 0);
    engine::Generator gen(31);
    for (int64_t t = 0; t < trials; ++t)
      for (int32_t j : curlora::sample_indices(small, 2, false, gen)) ++included[size_t(j)];
    for (size_t i = 0; i < small.size(); ++i) {
      double expected = small[i];
      for (size_t j = 0; j < small.size(); ++j)
        if (j != i) expected += small[j] * small[i] / (1 - small[j]);
      const double sd = std::sqrt(expected * (1 - expected) / double(trials));
      CHECK(std::abs(double(included[i]) / double(trials) - expected) < 5 * sd);
    }
  }
}

// ---- the layers ----

TEST_CASE("CurLoRALinear: C, R, U and the factored forward against the materialised formula", "[curlora][layer]") {
  const int64_t in = 7, out = 11, r = 3;
  for (WeightLayout layout : {WeightLayout::InOut, WeightLayout::OutIn}) {
    INFO((layout == WeightLayout::InOut ? "Conv1D [in, out]" : "torch Linear [out, in]"));
    const bool conv1d = layout == WeightLayout::InOut;
    const int64_t m = conv1d ? in : out, n = conv1d ? out : in;  // the stored weight is [m, n]
    const Tensor w = testing::random_f64({m, n}, 1, false), b = testing::random_f64({out}, 2, false);
    auto base = std::make_shared<Linear>(w, b, layout);
    const curlora::CurSelection selection{{1, 4, 1}, {0, 5, 2}};  // a repeated column, as with replacement
    auto adapter = std::make_shared<CurLoRALinear>(base, selection, 1.7);

    const std::vector<double> wv = w.to_vector<double>(), cv = adapter->C.to_vector<double>(),
                              rv = adapter->R.to_vector<double>();
    REQUIRE(adapter->C.shape() == engine::Shape{m, r});
    REQUIRE(adapter->R.shape() == engine::Shape{r, n});
    for (int64_t i = 0; i < m; ++i)
      for (int64_t k = 0; k < r; ++k) CHECK(cv[size_t(i * r + k)] == wv[size_t(i * n + selection.cols[size_t(k)])]);
    for (int64_t k = 0; k < r; ++k)
      for (int64_t j = 0; j < n; ++j) CHECK(rv[size_t(k * n + j)] == wv[size_t(selection.rows[size_t(k)] * n + j)]);
    CHECK(max_abs(adapter->U) == 0);
    auto trainable = adapter->named_trainable_parameters();
    REQUIRE(trainable.size() == 1);
    CHECK(trainable[0].first == "U");
    CHECK_FALSE(base->weight.requires_grad());
    CHECK_FALSE(base->bias.requires_grad());

    fill_normal(adapter->U, 4, 1.0);
    // A non-contiguous input: a transposed view.
    const Tensor x = testing::random_f64({5, 2, in}, 3, false).transpose(0, 1);
    const Tensor y = adapter->forward(x);
    REQUIRE(y.shape() == engine::Shape{2, 5, out});
    // y = x W_io + b + 1.7 x ΔW_io with ΔW = C U R in the stored layout.
    const std::vector<double> xv = x.contiguous().to_vector<double>();
    const std::vector<double> delta =
        naive_matmul(naive_matmul(cv, adapter->U.to_vector<double>(), m, r, r), rv, m, r, n);
    const std::vector<double> w_io = conv1d ? wv : naive_transpose(wv, m, n);
    const std::vector<double> delta_io = conv1d ? delta : naive_transpose(delta, m, n);
    std::vector<double> expected = naive_matmul(xv, w_io, 10, in, out);
    const std::vector<double> shift = naive_matmul(xv, delta_io, 10, in, out);
    const std::vector<double> bv = b.to_vector<double>();
    for (size_t i = 0; i < expected.size(); ++i) expected[i] += bv[i % size_t(out)] + 1.7 * shift[i];
    testing::require_close(y, expected, 1e-12);
    testing::require_close(
        adapter->delta_weight(),
        [&] {
          std::vector<double> scaled = delta;
          for (double& v : scaled) v *= 1.7;
          return scaled;
        }(),
        1e-12);
  }
  auto base = std::make_shared<Linear>(testing::random_f64({4, 6}, 1, false), Tensor(), WeightLayout::InOut);
  CHECK_THROWS_WITH(CurLoRALinear(base, {{0, 6}, {0, 1}}, 1.0), Catch::Contains("out of range"));
  CHECK_THROWS_WITH(CurLoRALinear(base, {{0, 1}, {0}}, 1.0), Catch::Contains("as many rows as columns"));
}

TEST_CASE("LoRALinear: kaiming-uniform A with fan_in = r, zero B, y = x W + b + alpha (x A) B", "[curlora][layer]") {
  const int64_t in = 400, out = 9, r = 4;
  auto base = std::make_shared<Linear>(testing::random_f64({in, out}, 1, false), testing::random_f64({out}, 2, false),
                                       WeightLayout::InOut);
  engine::Generator gen(3);
  auto lora = std::make_shared<LoRALinear>(base, r, 0.5, gen);
  REQUIRE(lora->A.shape() == engine::Shape{in, r});
  REQUIRE(lora->B.shape() == engine::Shape{r, out});
  CHECK(max_abs(lora->B) == 0);
  // torch's kaiming_uniform_(a=sqrt(5)) on [in, r] is U(-1/sqrt(r), 1/sqrt(r)).
  const std::vector<double> a = lora->A.to_vector<double>();
  const double bound = 1 / std::sqrt(double(r));
  double lo = 1, hi = -1, mean = 0;
  for (double v : a) lo = std::min(lo, v), hi = std::max(hi, v), mean += v / double(a.size());
  CHECK(lo >= -bound);
  CHECK(hi < bound);
  CHECK(lo < -0.98 * bound);
  CHECK(hi > 0.98 * bound);
  CHECK(std::abs(mean) < 0.05 * bound);
  CHECK(lora->num_trainable_parameters() == r * (in + out));

  fill_normal(lora->B, 5, 1.0);
  const Tensor x = testing::random_f64({3, in}, 6, false);
  const std::vector<double> xv = x.to_vector<double>();
  std::vector<double> expected = naive_matmul(xv, base->weight.to_vector<double>(), 3, in, out);
  const std::vector<double> shift = naive_matmul(naive_matmul(xv, a, 3, in, r), lora->B.to_vector<double>(), 3, r, out);
  const std::vector<double> bv = base->bias.to_vector<double>();
  for (size_t i = 0; i < expected.size(); ++i) expected[i] += bv[i % size_t(out)] + 0.5 * shift[i];
  testing::require_close(lora->forward(x), expected, 1e-12);
}

TEST_CASE("under autocast an adapter's two products read its input rounded to bf16, and give bf16 rounded once",
          "[curlora][layer]") {
  const int64_t in = 48, out = 16;
  const Tensor w = testing::random_f64({in, out}, 11, false).to(engine::DType::F32);
  const Tensor b = testing::random_f64({out}, 12, false).to(engine::DType::F32);
  engine::Generator gen(13);
  auto lora = std::make_shared<LoRALinear>(std::make_shared<Linear>(w, b, WeightLayout::InOut), 4, 0.5, gen);
  fill_normal(lora->B, 14, 1.0);
  Tensor x = testing::random_f64({5, in}, 15, false).to(engine::DType::F32);
  x.set_requires_grad(true);
  Tensor y, base, head;
  {
    const Tensor xr = x.detach().to(engine::DType::BF16);
    const engine::AutocastGuard autocast(engine::DType::BF16);
    y = lora->forward(x);
    base = engine::matmul(xr, w);
    head = engine::matmul(xr, lora->A) * 0.5;
  }
  REQUIRE(y.dtype() == engine::DType::BF16);
  // The last product and the bias (rounded to bf16, as autocast rounds it) are
  // added to the base product's bf16 output in f32, and the sum rounded once
  // (engine::addmm), not rounded on its own first.
  const auto f32 = engine::DType::F32;
  const Tensor tail = lora->B.detach().to(engine::DType::BF16).to(f32);
  const Tensor sum = engine::add(base.to(f32), engine::matmul(head.to(f32), tail));
  const Tensor want = engine::add(sum, b.to(engine::DType::BF16).to(f32)).to(engine::DType::BF16);
  testing::require_close(y.to(f32), want.to(f32).to_vector<double>(), 0);
  engine::sum(y.to(engine::DType::F32)).backward();
  REQUIRE(x.grad().dtype() == engine::DType::F32);  // the two products' bf16 gradients, summed and widened
  REQUIRE(lora->A.grad().dtype() == engine::DType::F32);
}

TEST_CASE("store_frozen_weights stores the base and CURLoRA's C and R in bf16, as if taken from a bf16 weight",
          "[curlora][layer]") {
  const int64_t in = 48, out = 16;
  const Tensor w = testing::random_f64({in, out}, 21, false).to(engine::DType::F32);
  const Tensor b = testing::random_f64({out}, 22, false).to(engine::DType::F32);
  const curlora::CurSelection selection{{0, 5, 9, 15}, {1, 7, 30, 47}};
  auto cur = std::make_shared<CurLoRALinear>(std::make_shared<Linear>(w, b, WeightLayout::InOut), selection, 0.5);
  fill_normal(cur->U, 23, 1.0);
  const Tensor x = testing::random_f64({5, in}, 24, false).to(engine::DType::F32);
  Tensor before;
  {
    const engine::AutocastGuard autocast(engine::DType::BF16);
    before = cur->forward(x);
  }
  REQUIRE(curlora::store_frozen_weights(*cur, engine::DType::BF16) == 4);  // W, b, C, R; U stays f32
  REQUIRE(cur->U.dtype() == engine::DType::F32);
  // The factors of a bf16 weight: gathering commutes with rounding.
  auto twin = std::make_shared<CurLoRALinear>(
      std::make_shared<Linear>(w.to(engine::DType::BF16), b, WeightLayout::InOut), selection, 0.5);
  for (const auto& [mine, theirs] : {std::pair{&cur->C, &twin->C}, std::pair{&cur->R, &twin->R}}) {
    REQUIRE(mine->dtype() == engine::DType::BF16);
    testing::require_close(mine->to(engine::DType::F32), theirs->to_vector<double>(), 0);
  }
  // Under autocast every product rounded its operands anyway: the output is unchanged, bit for bit.
  const engine::AutocastGuard autocast(engine::DType::BF16);
  testing::require_close(cur->forward(x).to(engine::DType::F32), before.to(engine::DType::F32).to_vector<double>(), 0);
}

TEST_CASE("CurLoRALinear stores R and the bias after W's rows, so that an input with room runs the layer as one GEMM",
          "[curlora][layer][profiler]") {
  engine::Generator gen(9);
  auto base = std::make_shared<Linear>(Tensor::randn({8, 12}, gen), Tensor::randn({12}, gen), WeightLayout::InOut);
  auto cur = std::make_shared<CurLoRALinear>(base, curlora::CurSelection{{1, 2}, {3, 4}}, 2.0);
  fill_normal(cur->U, 10, 1.0);
  auto r_follows_w = [&] {
    const Tensor &w = base->weight, &r = cur->R;
    return r.impl().storage == w.impl().storage && r.offset() == w.offset() + w.numel();
  };
  CHECK(r_follows_w());
  CHECK(cur->tail_stacked());
  CHECK(cur->bias_stacked());
  // [W; R; b; 0]: 8 + 2 + 1 rows, then zeros up to 16, so 8 columns of room: t2, a column of ones, zeros.
  REQUIRE(cur->input_room() == 8);
  const Tensor x = Tensor::randn({4, 6, 8}, gen), ln_w = Tensor::randn({8}, gen), ln_b = Tensor::randn({8}, gen);
  const Tensor plain = engine::layer_norm(x, ln_w, ln_b);
  const Tensor want = engine::add((*base)(plain), cur->update(plain));
  // Room 8: the bias is a row of the GEMM, its ones written into the room; room 2: the bias in the epilogue.
  for (const int64_t room : {8, 2}) {
    const Tensor roomy = engine::layer_norm(x, ln_w, ln_b, 1e-5, {}, room);
    engine::Profiler profiler;
    testing::require_close(cur->forward(roomy), want.to_vector<double>(), 1e-5);
    CHECK(profiler.calls("gemm") == 3);  // x C, then t1 U, then [x | t2 (| 1 | 0)] [W; R (; b; 0)] (+ b)
    if (room == 8) {  // the first row's room: t2's 2 columns, then the bias row's 1, then zeros
      const float* row = static_cast<const float*>(roomy.impl().storage->data) + roomy.offset();
      CHECK(row[8 + 2] == 1.0f);
      CHECK(row[15] == 0.0f);
    }
  }
  testing::require_close(cur->forward(plain), want.to_vector<double>(), 1e-5);  // two GEMMs in place of the last
  // The backward joins them too: [dx | dt2] = g [W; R]^T. Then dt2 U^T, dU, and dx + dt1 C^T, whose addend
  // the CPU copies in first (two calls): 5 against 6, with the same gradient.
  auto input_gradient = [&](int64_t room, int gemms) {
    const Tensor trained = x.detach().set_requires_grad(true);
    Tensor loss = engine::sum(engine::square(cur->forward(engine::layer_norm(trained, ln_w, ln_b, 1e-5, {}, room))));
    engine::Profiler profiler;
    loss.backward();
    CHECK(profiler.calls("gemm") == gemms);
    return trained.grad();
  };
  testing::require_close(input_gradient(8, 5), input_gradient(0, 6).to_vector<double>(), 1e-4);
  curlora::store_frozen_weights(*cur, engine::DType::BF16);  // converted one by one, then stacked again
  CHECK(r_follows_w());
  CHECK(cur->bias_stacked());
  cur->merge();
  CHECK(cur->input_room() == 0);  // merged: the base layer alone
  engine::Generator lora_gen(10);
  CHECK(LoRALinear(base, 2, 1.0, lora_gen).input_room() == 0);  // its trained B is never stacked
}

TEST_CASE("adapter gradients match finite differences (f64)", "[curlora][layer][gradcheck]") {
  for (WeightLayout layout : {WeightLayout::InOut, WeightLayout::OutIn}) {
    const engine::Shape shape = layout == WeightLayout::InOut ? engine::Shape{5, 8} : engine::Shape{8, 5};
    auto base =
        std::make_shared<Linear>(testing::random_f64(shape, 1, false), testing::random_f64({8}, 2, false), layout);
    auto cur = std::make_shared<CurLoRALinear>(base, curlora::CurSelection{{0, 3, 3}, {4, 1, 2}}, 0.8);
    fill_normal(cur->U, 7, 1.0);  // away from zero, so every path is exercised
    const Tensor x = testing::random_f64({2, 3, 5}, 8);
    testing::check_gradients([&](const std::vector<Tensor>& in) { return cur->forward(in[1]); }, {cur->U, x});

    engine::Generator gen(9);
    auto base2 = std::make_shared<Linear>(testing::random_f64(shape, 1, false), Tensor(), layout);
    auto lora = std::make_shared<LoRALinear>(base2, 3, 1.3, gen);
    fill_normal(lora->B, 10, 1.0);
    testing::check_gradients([&](const std::vector<Tensor>& in) { return lora->forward(in[2]); },
                             {lora->A, lora->B, testing::random_f64({4, 5}, 11)});
  }
}

TEST_CASE("a frozen base gets no gradient and costs no weight-gradient GEMM", "[curlora][layer][profiler]") {
  engine::Generator gen(5);
  auto base = std::make_shared<Linear>(Tensor::randn({8, 12}, gen), Tensor::randn({12}, gen), WeightLayout::InOut);
  auto cur = std::make_shared<CurLoRALinear>(base, curlora::CurSelection{{1, 2}, {3, 4}}, 2.0);
  const Tensor x = Tensor::randn({4, 6, 8}, gen);
  {
    Tensor loss = engine::sum(engine::square(cur->forward(x)));
    engine::Profiler profiler;
    loss.backward();
    // dU needs two GEMMs (dy Rᵀ, then (α x C)ᵀ times it); nothing reaches W, b, C, R or x.
    CHECK(profiler.calls("gemm") == 2);
  }
  CHECK(cur->U.grad().defined());
  CHECK_FALSE(base->weight.grad().defined());
  CHECK_FALSE(base->bias.grad().defined());
  {
    // With x trainable, dx flows through W and through R, U, C: three more GEMMs, still no dW.
    const Tensor x2 = x.detach().set_requires_grad(true);
    Tensor loss = engine::sum(engine::square(cur->forward(x2)));
    engine::Profiler profiler;
    loss.backward();
    CHECK(profiler.calls("gemm") == 5);
    CHECK_FALSE(base->weight.grad().defined());
    // The counter does see a weight-gradient GEMM when W trains: one more.
    base->weight.set_requires_grad(true);
    Tensor loss2 = engine::sum(engine::square(cur->forward(x2)));
    engine::Profiler profiler2;
    loss2.backward();
    CHECK(profiler2.calls("gemm") == 6);
  }

  // In the whole model, only the adapters' U receive gradients.
  auto model = tiny_model();
  curlora::inject_adapters(*model, AdapterConfig{});
  auto [ids, mask] = tiny_batch(model->config().vocab_size);
  lm_loss(model->forward(ids, mask), ids, mask).backward();
  int with_grad = 0;
  for (const auto& [name, t] : model->named_parameters()) {
    INFO(name);
    const bool adapter = name.ends_with(".U");
    CHECK(t.grad().defined() == adapter);
    with_grad += adapter;
    if (adapter) CHECK(max_abs(t.grad()) > 0);
  }
  CHECK(with_grad == model->config().n_layer);
}

// ---- injection and counts ----

TEST_CASE("injection adapts the named Linears and freezes everything else", "[curlora][inject]") {
  auto model = tiny_model();
  const int64_t base_elements = model->num_parameters();
  const curlora::Adapters adapters = curlora::inject_adapters(*model, AdapterConfig{});
  std::vector<std::string> names;
  for (const auto& [name, adapter] : adapters) names.push_back(name);
  CHECK(names == std::vector<std::string>{"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"});
  CHECK(&model->get_submodule("transformer.h.1.attn.c_attn")->child("base_layer") == &adapters[1].second->base_layer());
  for (const auto& [name, t] : model->named_parameters()) {
    INFO(name);
    CHECK(t.requires_grad() == name.ends_with(".U"));
  }
  CHECK(model->num_trainable_parameters() == 2 * 8 * 8);
  CHECK(model->num_parameters() == base_elements + 2 * 8 * 8);
  CHECK(curlora::find_adapters(*model).size() == 2);

  // With an adapter of zero U in place, the model computes what the base did.
  auto plain = tiny_model();
  auto [ids, mask] = tiny_batch(model->config().vocab_size);
  engine::NoGradGuard no_grad;
  CHECK(max_abs_difference(model->forward(ids, mask), plain->forward(ids, mask)) == 0);
}

TEST_CASE("trainable counts: the analytic count equals the injected model's", "[curlora][inject][counts]") {
  const std::vector<std::vector<std::string>> target_sets = {{"attn.c_attn"},
                                                             {"c_proj"},
                                                             {"attn.c_proj", "mlp.c_fc"},
                                                             {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}};
  for (Method method : {Method::CurLoRA, Method::LoRA})
    for (const auto& targets : target_sets)
      for (int64_t rank : {2, 5}) {
        AdapterConfig config;
        config.method = method;
        config.targets = targets;
        config.rank = rank;
        INFO(curlora::method_name(method) << " rank " << rank << " targets " << targets.size());
        auto model = tiny_model();
        const curlora::Adapters adapters = curlora::inject_adapters(*model, config);
        const curlora::ParameterCounts counts = curlora::count_parameters(model->config(), config);
        // The count from first principles, per adapted layer's actual weight.
        int64_t expected = 0;
        for (const auto& [name, adapter] : adapters) {
          const Linear& l = adapter->base_layer();
          expected += method == Method::CurLoRA ? rank * rank : rank * (l.in_features + l.out_features);
        }
        CHECK(model->num_trainable_parameters() == expected);
        CHECK(counts.trainable == expected);
        CHECK(counts.adapted.size() == adapters.size());
        for (size_t i = 0; i < adapters.size() && i < counts.adapted.size(); ++i)
          CHECK(counts.adapted[i] == adapters[i].first);
        CHECK(counts.base == model->num_parameters() - expected);
      }
}

TEST_CASE("trainable counts on gpt2-large match the paper and the reference code", "[curlora][inject][counts]") {
  const models::GPT2Config large = models::GPT2Config::builtin("gpt2-large");
  AdapterConfig config;  // curlora, attn.c_attn, rank 8: the paper's 2,304
  CHECK(curlora::count_parameters(large, config).trainable == 2304);
  config.rank = 16;
  CHECK(curlora::count_parameters(large, config).trainable == 9216);
  config.rank = 24;
  CHECK(curlora::count_parameters(large, config).trainable == 20736);
  config.rank = 8;
  config.method = Method::LoRA;
  CHECK(curlora::count_parameters(large, config).trainable == 1474560);
  CHECK(curlora::count_parameters(large, config).adapted.size() == 36);
  CHECK(curlora::count_parameters(large, config).base == large.num_parameters());

  config.targets = {"attn.c_atn"};
  CHECK_THROWS_WITH(curlora::count_parameters(large, config), Catch::Contains("matches no Linear"));
  config.targets = {"attn.c_attn"};
  config.rank = 0;
  CHECK_THROWS_WITH(curlora::count_parameters(large, config), Catch::Contains("rank"));
}

TEST_CASE("injection errors name the module", "[curlora][inject][errors]") {
  auto model = tiny_model();
  AdapterConfig config;
  config.targets = {"attn.c_atn"};
  CHECK_THROWS_WITH(curlora::inject_adapters(*model, config), Catch::Contains("'attn.c_atn' matches no Linear"));
  config.targets = {"attn"};
  CHECK_THROWS_WITH(curlora::inject_adapters(*model, config), Catch::Contains("GPT2Attention, not a Linear"));
  config.targets = {"lm_head"};
  CHECK_THROWS_WITH(curlora::inject_adapters(*model, config), Catch::Contains("tied"));
  config.targets = {"attn.c_attn"};
  config.epsilon = -1;
  CHECK_THROWS_WITH(curlora::inject_adapters(*model, config), Catch::Contains("epsilon"));
  // A zero column has probability 0, which eps = 0 cannot invert; h.0 is
  // adapted before h.1 fails, and must be undone.
  {
    engine::NoGradGuard no_grad;
    model->get_parameter("transformer.h.1.attn.c_attn.weight").slice(1, 5, 6).fill_(0.0);
  }
  config.epsilon = 0;
  CHECK_THROWS_WITH(curlora::inject_adapters(*model, config), Catch::Contains("infinite"));
  // Nothing was changed by the failed attempts.
  CHECK(curlora::find_adapters(*model).empty());
  CHECK(model->num_trainable_parameters() == model->num_parameters());
  config.epsilon = 1e-3;
  curlora::inject_adapters(*model, config);
  CHECK_THROWS_WITH(curlora::inject_adapters(*model, config), Catch::Contains("already has an adapter"));
  CHECK_THROWS_WITH(curlora::parse_method("dora"), Catch::Contains("dora"));
}

TEST_CASE("LoRA initialisation is seeded per layer", "[curlora][inject]") {
  AdapterConfig config;
  config.method = Method::LoRA;
  config.targets = {"attn.c_attn", "mlp.c_fc"};
  auto a = tiny_model(), b = tiny_model(), c = tiny_model();
  const auto la = curlora::inject_adapters(*a, config);
  const auto lb = curlora::inject_adapters(*b, config);
  config.seed = 1;
  const auto lc = curlora::inject_adapters(*c, config);
  auto A = [](const curlora::Adapters& l, size_t i) { return static_cast<LoRALinear&>(*l[i].second).A; };
  CHECK(max_abs_difference(A(la, 0), A(lb, 0)) == 0);
  CHECK(max_abs_difference(A(la, 0), A(lc, 0)) > 0);
  // Each layer draws from its own stream: adapting fewer layers changes none of the others.
  config.seed = 0;
  config.targets = {"mlp.c_fc"};
  auto d = tiny_model();
  const auto ld = curlora::inject_adapters(*d, config);
  CHECK(la[1].first == ld[0].first);
  CHECK(max_abs_difference(A(la, 1), A(ld, 0)) == 0);
}

// ---- merging ----

TEST_CASE("merge and unmerge: same logits, and W restored to fp32 rounding", "[curlora][merge]") {
  for (Method method : {Method::CurLoRA, Method::LoRA}) {
    INFO(curlora::method_name(method));
    auto model = tiny_model();
    AdapterConfig config;
    config.method = method;
    config.rank = 4;
    config.alpha = 1.5;
    config.targets = {"attn.c_attn", "mlp.c_fc"};
    const curlora::Adapters adapters = curlora::inject_adapters(*model, config);
    std::map<std::string, Tensor> original;
    for (const auto& [name, adapter] : adapters) {
      for (const auto& [tname, t] : adapter->trainable_tensors())
        if (tname != "A") fill_normal(t, 100 + original.size(), method == Method::CurLoRA ? 30.0 : 0.05);
      original[name] = adapter->base_layer().weight.clone();
    }
    auto [ids, mask] = tiny_batch(model->config().vocab_size);
    engine::NoGradGuard no_grad;
    const Tensor unmerged = model->forward(ids, mask);
    const Tensor base = tiny_model()->forward(ids, mask);
    CHECK(max_abs_difference(unmerged, base) > 0.1);  // the adapters do something

    curlora::merge_adapters(*model);
    for (const auto& [name, adapter] : adapters) CHECK(adapter->merged());
    const Tensor merged = model->forward(ids, mask);
    CHECK(max_abs_difference(merged, unmerged) < 1e-5 * (1 + max_abs(unmerged)));
    CHECK_THROWS_WITH(adapters[0].second->merge(), Catch::Contains("already merged"));

    curlora::unmerge_adapters(*model);
    for (const auto& [name, adapter] : adapters) {
      const Tensor& w = adapter->base_layer().weight;
      const double scale = max_abs(original[name]) + max_abs(adapter->delta_weight());
      CHECK(max_abs_difference(w, original[name]) <= 2e-7 * scale);
      CHECK(max_abs_difference(w, original[name]) < max_abs(adapter->delta_weight()) * 1e-3);
    }
    CHECK(max_abs_difference(model->forward(ids, mask), unmerged) < 1e-5 * (1 + max_abs(unmerged)));
    CHECK_THROWS_WITH(adapters[0].second->unmerge(), Catch::Contains("not merged"));
  }
}

// ---- diagnostics ----

TEST_CASE("diagnostics: |U|, |ΔW| without the m x n matrix, relative change, output shift", "[curlora][diagnostics]") {
  for (WeightLayout layout : {WeightLayout::InOut, WeightLayout::OutIn}) {
    const Tensor w =
        testing::random_f64(layout == WeightLayout::InOut ? engine::Shape{6, 9} : engine::Shape{9, 6}, 1, false);
    auto cur = std::make_shared<CurLoRALinear>(std::make_shared<Linear>(w, Tensor(), layout),
                                               curlora::CurSelection{{0, 2, 5}, {1, 1, 3}}, 0.6);
    fill_normal(cur->U, 2, 1.0);
    engine::Generator gen(3);
    auto lora = std::make_shared<LoRALinear>(std::make_shared<Linear>(w.clone(), Tensor(), layout), 2, 1.2, gen);
    fill_normal(lora->B, 4, 1.0);
    const Tensor x = testing::random_f64({2, 4, 6}, 5, false);

    for (const std::shared_ptr<curlora::AdapterLinear>& adapter :
         std::vector<std::shared_ptr<curlora::AdapterLinear>>{cur, lora}) {
      INFO(adapter->type_name());
      Holder holder(adapter);
      const auto report = curlora::diagnose_adapters(holder, [&] { holder.child("proj")(x); });
      REQUIRE(report.size() == 1);
      const curlora::LayerDiagnostics& d = report[0];
      CHECK(d.name == "proj");
      // Reference values from the materialised ΔW with naive loops.
      const std::vector<double> delta = adapter->delta_weight().to_vector<double>();
      double delta_sq = 0, w_sq = 0;
      for (double v : delta) delta_sq += v * v;
      for (double v : w.to_vector<double>()) w_sq += v * v;
      CHECK(d.delta_norm == Approx(std::sqrt(delta_sq)).epsilon(1e-10));
      CHECK(d.weight_norm == Approx(std::sqrt(w_sq)).epsilon(1e-12));
      CHECK(d.relative_delta == Approx(std::sqrt(delta_sq / w_sq)).epsilon(1e-10));
      const std::vector<double> delta_io = layout == WeightLayout::InOut ? delta : naive_transpose(delta, 9, 6);
      double shift_sq = 0;
      for (double v : naive_matmul(x.to_vector<double>(), delta_io, 8, 6, 9)) shift_sq += v * v;
      REQUIRE(d.output_shift.has_value());
      CHECK(*d.output_shift == Approx(std::sqrt(shift_sq)).epsilon(1e-10));
      const auto [first_name, first] = adapter->trainable_tensors().front();
      double first_sq = 0;
      for (double v : first.to_vector<double>()) first_sq += v * v;
      CHECK(d.trainable_norms.front().first == first_name);
      CHECK(d.trainable_norms.front().second == Approx(std::sqrt(first_sq)).epsilon(1e-12));
      CHECK_FALSE(adapter->captured_input().defined());  // capture is off again

      // Merged, the base norm is still that of the unmerged weight.
      adapter->merge();
      const auto merged = curlora::diagnose_adapters(holder);
      CHECK(merged[0].weight_norm == Approx(d.weight_norm).epsilon(1e-9));
      CHECK_FALSE(merged[0].output_shift.has_value());
      adapter->unmerge();
    }
  }
}
