// Optimisers, clipping and schedules. Each is checked two ways: against the
// published algorithm written out here as a plain double loop, and against
// torch's own trajectories (tests/goldens/optim/optim.json, made by
// tools/goldens/make_optim_goldens.py). Plus state export/restore and errors.
#include <catch2/catch.hpp>

#include "engine/ops.h"
#include "engine/optim/optimizer.h"
#include "engine/optim/schedule.h"
#include "tests/gradcheck.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <limits>
#include <numbers>

using namespace engine;
using namespace engine::optim;
using testing::require_close;

namespace {

Tensor f64_param(const std::vector<double>& values) {
  Tensor p = Tensor::from_vector(values, {int64_t(values.size())});
  p.set_requires_grad(true);
  return p;
}

Tensor make_tensor(const std::vector<double>& values, DType dtype) {
  return Tensor::from_vector(values, {int64_t(values.size())}).to(dtype);
}

// ---- reference algorithms, from the papers / torch docs, in doubles ----

struct AdamRef {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.01;
  std::vector<double> m, v;
  int t = 0;
  void step(std::vector<double>& p, const std::vector<double>& g) {
    if (m.empty()) m.assign(p.size(), 0.0), v.assign(p.size(), 0.0);
    ++t;
    for (size_t i = 0; i < p.size(); ++i) {
      p[i] -= lr * wd * p[i];
      m[i] = beta1 * m[i] + (1 - beta1) * g[i];
      v[i] = beta2 * v[i] + (1 - beta2) * g[i] * g[i];
      const double m_hat = m[i] / (1 - std::pow(beta1, t));
      const double v_hat = v[i] / (1 - std::pow(beta2, t));
      p[i] -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
  }
};

struct SgdRef {
  double lr = 0.1, momentum = 0, dampening = 0, wd = 0;
  bool nesterov = false;
  std::vector<double> buffer;
  void step(std::vector<double>& p, std::vector<double> g) {
    for (size_t i = 0; i < p.size(); ++i) g[i] += wd * p[i];
    if (momentum != 0) {
      if (buffer.empty()) {
        buffer = g;
      } else {
        for (size_t i = 0; i < p.size(); ++i) buffer[i] = momentum * buffer[i] + (1 - dampening) * g[i];
      }
      for (size_t i = 0; i < p.size(); ++i) g[i] = nesterov ? g[i] + momentum * buffer[i] : buffer[i];
    }
    for (size_t i = 0; i < p.size(); ++i) p[i] -= lr * g[i];
  }
};

std::vector<double> gradient_for_step(size_t n, int step) {
  std::vector<double> g(n);
  for (size_t i = 0; i < n; ++i) g[i] = std::sin(1.3 * double(i) + 0.7 * step) * std::pow(10.0, double(i % 4) - 2);
  return g;
}

// ---- the torch goldens ----

nlohmann::json load_goldens() {
  std::ifstream in(std::string(CURLORA_SOURCE_ROOT) + "/tests/goldens/optim/optim.json");
  REQUIRE(in.good());
  return nlohmann::json::parse(in);
}

double json_number(const nlohmann::json& x) {
  if (x.is_number()) return x.get<double>();
  const std::string s = x.get<std::string>();
  if (s == "nan") return std::numeric_limits<double>::quiet_NaN();
  return s == "inf" ? std::numeric_limits<double>::infinity() : -std::numeric_limits<double>::infinity();
}

std::vector<double> json_values(const nlohmann::json& list) {
  std::vector<double> out;
  for (const auto& x : list) out.push_back(json_number(x));
  return out;
}

// Equal up to `tolerance` (relative), with NaN equal to NaN and inf to inf.
void require_same(const std::vector<double>& got, const std::vector<double>& expected, double tolerance) {
  REQUIRE(got.size() == expected.size());
  for (size_t i = 0; i < got.size(); ++i) {
    INFO("element " << i << ": got " << got[i] << " expected " << expected[i]);
    if (std::isnan(expected[i])) {
      REQUIRE(std::isnan(got[i]));
    } else if (std::isinf(expected[i])) {
      REQUIRE(got[i] == expected[i]);
    } else {
      REQUIRE(std::abs(got[i] - expected[i]) <= tolerance * (1e-30 + std::abs(expected[i])) + 1e-300);
    }
  }
}

}  // namespace

// ---- AdamW ----

TEST_CASE("AdamW follows the published algorithm step by step", "[optim][adamw]") {
  for (double wd : {0.0, 0.01, 0.3}) {
    INFO("weight_decay " << wd);
    std::vector<double> start = {0.5, -1.25, 3.0, 0.0, -0.001, 2.0, 7.5};
    Tensor p = f64_param(start);
    AdamWOptions options;
    options.lr = 0.05;
    options.weight_decay = wd;
    AdamW opt({p}, options);
    AdamRef ref;
    ref.lr = 0.05;
    ref.wd = wd;
    std::vector<double> expected = start;
    for (int step = 0; step < 4; ++step) {
      std::vector<double> g = gradient_for_step(start.size(), step);
      p.set_grad(Tensor::from_vector(g, {int64_t(g.size())}));
      opt.step();
      ref.step(expected, g);
      require_close(p, expected, 1e-14);
    }
    CHECK(opt.step_count() == 4);
  }
}

TEST_CASE("AdamW bias correction: the first step moves each weight by lr * g / (|g| + eps)", "[optim][adamw]") {
  // At t = 1, m_hat = g and v_hat = g^2 exactly, whatever the betas.
  const std::vector<double> g = {0.3, -2.0, 1e-6, 5e-9, 0.0};
  Tensor p = f64_param({1.0, 1.0, 1.0, 1.0, 1.0});
  AdamWOptions options;
  options.lr = 0.1;
  options.beta1 = 0.5;
  options.beta2 = 0.75;
  options.eps = 1e-8;
  options.weight_decay = 0.0;
  AdamW opt({p}, options);
  p.set_grad(Tensor::from_vector(g, {5}));
  opt.step();
  std::vector<double> expected;
  for (double gi : g) expected.push_back(1.0 - 0.1 * gi / (std::abs(gi) + 1e-8));
  require_close(p, expected, 1e-14);
}

TEST_CASE("AdamW bias correction at step 3 with a constant gradient", "[optim][adamw]") {
  // A constant g makes m_hat = g and v_hat = g^2 at every t, so each step
  // moves by lr * g / (|g| + eps) again. Without bias correction it would not.
  Tensor p = f64_param({0.0, 0.0});
  AdamWOptions options;
  options.lr = 0.01;
  options.weight_decay = 0.0;
  AdamW opt({p}, options);
  for (int t = 0; t < 3; ++t) {
    p.set_grad(Tensor::from_vector(std::vector<double>{0.2, -4.0}, {2}));
    opt.step();
  }
  require_close(p, {-3 * 0.01 * 0.2 / (0.2 + 1e-8), 3 * 0.01 * 4.0 / (4.0 + 1e-8)}, 1e-14);
}

TEST_CASE("AdamW and SGD match torch trajectories (goldens)", "[optim][golden]") {
  const nlohmann::json goldens = load_goldens();
  for (const auto& c : goldens["optimizers"]) {
    const std::string name = c["name"];
    INFO("case " << name);
    const DType dtype = c["dtype"] == "f32" ? DType::F32 : DType::F64;
    Tensor p = make_tensor(json_values(c["initial"]), dtype);
    p.set_requires_grad(true);
    const auto& o = c["options"];
    std::unique_ptr<Optimizer> opt;
    if (c["kind"] == "adamw") {
      AdamWOptions options;  // our defaults must be torch's: the "defaults" case passes none
      if (o.contains("lr")) options.lr = o["lr"];
      if (o.contains("betas")) options.beta1 = o["betas"][0], options.beta2 = o["betas"][1];
      if (o.contains("eps")) options.eps = o["eps"];
      if (o.contains("weight_decay")) options.weight_decay = o["weight_decay"];
      opt = std::make_unique<AdamW>(std::vector<Tensor>{p}, options);
    } else {
      SGDOptions options;
      options.lr = o["lr"];
      if (o.contains("momentum")) options.momentum = o["momentum"];
      if (o.contains("dampening")) options.dampening = o["dampening"];
      if (o.contains("weight_decay")) options.weight_decay = o["weight_decay"];
      if (o.contains("nesterov")) options.nesterov = o["nesterov"];
      opt = std::make_unique<SGD>(std::vector<Tensor>{p}, options);
    }
    for (size_t step = 0; step < c["grads"].size(); ++step) {
      INFO("step " << step);
      const auto& g = c["grads"][step];
      p.set_grad(g.is_null() ? Tensor() : make_tensor(json_values(g), dtype));
      opt->step();
      // AdamW runs torch's float operations in torch's order, FMAs included,
      // so it agrees bit for bit. SGD goes through plain ops, where torch's
      // add_(alpha) uses an FMA: a few ulps.
      const double tolerance = c["kind"] == "adamw" ? 0.0 : dtype == DType::F64 ? 1e-15 : 5e-7;
      require_same(p.to_vector<double>(), json_values(c["expected"][step]), tolerance);
    }
  }
}

TEST_CASE("AdamW skips parameters without a gradient and counts steps per parameter", "[optim][adamw]") {
  Tensor a = f64_param({1.0, 2.0}), b = f64_param({3.0});
  AdamWOptions options;
  options.lr = 0.1;
  AdamW opt({a, b}, options);
  a.set_grad(Tensor::from_vector(std::vector<double>{0.5, -0.5}, {2}));
  opt.step();
  require_close(b, {3.0}, 0);  // no gradient: untouched, not even weight decay
  OptimizerState state = opt.state_dict();
  CHECK(state.scalars.at("0.step") == 1);
  CHECK(state.scalars.count("1.step") == 0);
  CHECK(state.tensors.count("1.exp_avg") == 0);

  // b's first update is its step 1 (bias correction from scratch), though it is the optimiser's step 2.
  b.set_grad(Tensor::from_vector(std::vector<double>{2.0}, {1}));
  a.zero_grad();
  opt.step();
  AdamRef ref;
  ref.lr = 0.1;
  std::vector<double> expected_b = {3.0};
  ref.step(expected_b, {2.0});
  require_close(b, expected_b, 1e-14);
  CHECK(opt.state_dict().scalars.at("1.step") == 1);
  CHECK(opt.step_count() == 2);
}

TEST_CASE("AdamW reads non-contiguous gradients", "[optim][adamw]") {
  Tensor base = testing::random_f64({5, 3}, 7, false);
  Tensor p1 = testing::random_f64({3, 5}, 8), p2 = p1.detach().clone();
  p2.set_requires_grad(true);
  AdamW opt1({p1}), opt2({p2});
  Tensor transposed = base.transpose(0, 1);  // a strided view, [3, 5]
  REQUIRE_FALSE(transposed.is_contiguous());
  for (int step = 0; step < 2; ++step) {
    p1.set_grad(transposed);
    p2.set_grad(transposed.contiguous());
    opt1.step();
    opt2.step();
  }
  require_close(p1, p2.to_vector<double>(), 0);
  require_close(base.transpose(0, 1), transposed.to_vector<double>(), 0);  // the gradient was only read
}

TEST_CASE("AdamW on a large f32 tensor (the threaded path) tracks the double reference", "[optim][adamw]") {
  const int64_t n = 200003;  // several chunks and a ragged tail
  std::vector<double> start(static_cast<size_t>(n)), expected;
  for (int64_t i = 0; i < n; ++i) start[size_t(i)] = std::cos(0.001 * double(i));
  Tensor p = Tensor::from_vector(start, {n}).to(DType::F32);
  p.set_requires_grad(true);
  std::vector<float> start_f = p.to_vector<float>();
  expected.assign(start_f.begin(), start_f.end());
  AdamWOptions options;
  options.lr = 1e-2;
  AdamW opt({p}, options);
  AdamRef ref;
  ref.lr = 1e-2;
  for (int step = 0; step < 3; ++step) {
    std::vector<double> g = gradient_for_step(size_t(n), step);
    Tensor gt = Tensor::from_vector(g, {n}).to(DType::F32);
    std::vector<float> gf = gt.to_vector<float>();
    p.set_grad(gt);
    opt.step();
    ref.step(expected, std::vector<double>(gf.begin(), gf.end()));
  }
  std::vector<float> got = p.to_vector<float>();
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(double(got[i]) - expected[i]));
  CHECK(worst < 1e-6);  // each step moves by ~lr; float rounding adds ~1e-7
}

TEST_CASE("optimizer state export and restore resumes exactly", "[optim][state]") {
  auto run = [](Optimizer& opt, Tensor& p, int from, int to) {
    for (int step = from; step < to; ++step) {
      p.set_grad(Tensor::from_vector(gradient_for_step(size_t(p.numel()), step), {p.numel()}));
      opt.step();
    }
  };
  SECTION("AdamW") {
    Tensor p = f64_param({0.1, 0.2, 0.3, 0.4});
    AdamWOptions options;
    options.lr = 0.02;
    options.weight_decay = 0.1;
    Tensor q = p.detach().clone();
    q.set_requires_grad(true);
    AdamW straight({{"w", p}}, options), first({{"w", q}}, options);
    run(straight, p, 0, 2);
    run(first, q, 0, 2);
    OptimizerState saved = first.state_dict();
    CHECK(saved.scalars.at("step") == 2);
    CHECK(saved.tensors.count("w.exp_avg") == 1);
    CHECK(saved.tensors.count("w.exp_avg_sq") == 1);

    // A fresh optimiser built with other settings takes over from the saved state.
    AdamWOptions other;
    other.lr = 0.5;
    AdamW resumed({{"w", q}}, other);
    resumed.load_state_dict(saved);
    CHECK(resumed.lr() == 0.02);
    CHECK(resumed.options().weight_decay == 0.1);
    CHECK(resumed.step_count() == 2);
    run(straight, p, 2, 4);
    run(resumed, q, 2, 4);
    require_close(q, p.to_vector<double>(), 0);
  }
  SECTION("SGD with momentum") {
    SGDOptions options;
    options.lr = 0.1;
    options.momentum = 0.9;
    Tensor p = f64_param({1.0, -1.0, 0.5});
    Tensor q = p.detach().clone();
    q.set_requires_grad(true);
    SGD straight({p}, options), first({q}, options);
    run(straight, p, 0, 2);
    run(first, q, 0, 2);
    SGD resumed({q}, SGDOptions{});
    resumed.load_state_dict(first.state_dict());
    run(straight, p, 2, 4);
    run(resumed, q, 2, 4);
    require_close(q, p.to_vector<double>(), 0);
  }
}

TEST_CASE("optimizer state restore rejects mismatched state", "[optim][state][errors]") {
  Tensor p = f64_param({1.0, 2.0, 3.0});
  AdamW opt({{"w", p}});
  p.set_grad(Tensor::from_vector(std::vector<double>{1.0, 1.0, 1.0}, {3}));
  opt.step();
  const OptimizerState good = opt.state_dict();

  OptimizerState unknown = good;
  unknown.tensors["v.exp_avg"] = Tensor::zeros({3}, DType::F64);
  CHECK_THROWS_AS(opt.load_state_dict(unknown), Error);

  OptimizerState wrong_shape = good;
  wrong_shape.tensors["w.exp_avg"] = Tensor::zeros({4}, DType::F64);
  CHECK_THROWS_AS(opt.load_state_dict(wrong_shape), Error);

  OptimizerState missing = good;
  missing.tensors.erase("w.exp_avg_sq");
  CHECK_THROWS_AS(opt.load_state_dict(missing), Error);

  OptimizerState no_lr = good;
  no_lr.scalars.erase("lr");
  CHECK_THROWS_AS(opt.load_state_dict(no_lr), Error);

  OptimizerState bad_beta = good;
  bad_beta.scalars["beta1"] = 1.5;
  CHECK_THROWS_AS(opt.load_state_dict(bad_beta), Error);

  // A failed load leaves the optimiser as it was.
  CHECK(opt.state_dict().scalars == good.scalars);
  opt.load_state_dict(good);  // and a good one is accepted
}

TEST_CASE("optimizer argument errors", "[optim][errors]") {
  Tensor p = f64_param({1.0, 2.0});
  CHECK_THROWS_AS(AdamW(std::vector<Tensor>{p, p}), Error);  // the same tensor twice
  CHECK_THROWS_AS(AdamW(NamedTensors{{"a", p}, {"a", f64_param({1.0})}}), Error);
  Tensor non_leaf = mul(p, 2.0);
  CHECK_THROWS_AS(AdamW(std::vector<Tensor>{non_leaf}), Error);
  CHECK_THROWS_AS(AdamW(std::vector<Tensor>{Tensor::zeros({2}, DType::I64)}), Error);
  AdamWOptions bad;
  bad.beta2 = 1.0;
  CHECK_THROWS_AS(AdamW(std::vector<Tensor>{p}, bad), Error);
  SGDOptions nesterov_without_momentum;
  nesterov_without_momentum.nesterov = true;
  CHECK_THROWS_AS(SGD(std::vector<Tensor>{p}, nesterov_without_momentum), Error);

  AdamW opt({p});
  CHECK_THROWS_AS(opt.set_lr(-1.0), Error);
  p.set_grad(Tensor::from_vector(std::vector<float>{1.0f, 2.0f}, {2}));  // f32 gradient of an f64 weight
  CHECK_THROWS_AS(opt.step(), Error);
  p.zero_grad();
  opt.step();  // no gradient: a no-op, not an error
  opt.zero_grad();
  CHECK_FALSE(p.grad().defined());
}

// ---- SGD ----

TEST_CASE("SGD follows torch's algorithm (momentum, dampening, nesterov, weight decay)", "[optim][sgd]") {
  struct Setting {
    double momentum, dampening, wd;
    bool nesterov;
  };
  for (Setting s : {Setting{0, 0, 0, false}, Setting{0.9, 0, 0, false}, Setting{0.9, 0.25, 0.01, false},
                    Setting{0.7, 0, 0.05, true}}) {
    INFO("momentum " << s.momentum << " dampening " << s.dampening << " wd " << s.wd << " nesterov " << s.nesterov);
    std::vector<double> expected = {0.5, -1.0, 2.0, 0.25, -3.0};
    Tensor p = f64_param(expected);
    SGDOptions options;
    options.lr = 0.1;
    options.momentum = s.momentum;
    options.dampening = s.dampening;
    options.weight_decay = s.wd;
    options.nesterov = s.nesterov;
    SGD opt({p}, options);
    SgdRef ref{0.1, s.momentum, s.dampening, s.wd, s.nesterov, {}};
    for (int step = 0; step < 4; ++step) {
      std::vector<double> g = gradient_for_step(expected.size(), step);
      p.set_grad(Tensor::from_vector(g, {int64_t(g.size())}));
      opt.step();
      ref.step(expected, g);
      require_close(p, expected, 1e-14);
    }
  }
}

// ---- clip_grad_norm ----

TEST_CASE("clip_grad_norm scales every gradient by max_norm / (norm + 1e-6)", "[optim][clip]") {
  Tensor a = f64_param({0, 0, 0}), b = f64_param({0, 0}), c = f64_param({0});
  Tensor ga = Tensor::from_vector(std::vector<double>{3.0, 0.0, -4.0}, {3});
  Tensor gb = Tensor::from_vector(std::vector<double>{12.0, 0.0}, {2});
  a.set_grad(ga);
  b.set_grad(gb);  // c has no gradient and is ignored
  const double total = clip_grad_norm({a, b, c}, 2.0);
  CHECK(total == Approx(13.0).epsilon(1e-15));
  const double coef = 2.0 / (13.0 + 1e-6);
  require_close(a.grad(), {3 * coef, 0, -4 * coef}, 1e-15);
  require_close(b.grad(), {12 * coef, 0}, 1e-15);
  CHECK_FALSE(c.grad().defined());
  // The old gradient tensors were replaced, not scaled in place.
  require_close(ga, {3.0, 0.0, -4.0}, 0);
  require_close(gb, {12.0, 0.0}, 0);

  // Under the threshold nothing changes, and the norm is still reported.
  Tensor kept = b.grad();
  const double small = clip_grad_norm(std::vector<Tensor>{b}, 100.0);
  CHECK(small == Approx(12 * coef).epsilon(1e-14));
  CHECK(b.grad().same(kept));

  CHECK(clip_grad_norm(std::vector<Tensor>{c}, 1.0) == 0.0);  // no gradients at all
  CHECK_THROWS_AS(clip_grad_norm(std::vector<Tensor>{a}, -1.0), Error);
}

TEST_CASE("clip_grad_norm matches torch, non-finite norms included (goldens)", "[optim][clip][golden]") {
  const nlohmann::json goldens = load_goldens();
  for (const auto& c : goldens["clip_grad_norm"]) {
    const std::string name = c["name"];
    INFO("case " << name);
    const DType dtype = c["dtype"] == "f32" ? DType::F32 : DType::F64;
    std::vector<Tensor> params;
    for (const auto& g : c["grads"]) {
      std::vector<double> values = json_values(g);
      Tensor p = Tensor::zeros({int64_t(values.size())}, dtype);
      p.set_requires_grad(true);
      p.set_grad(make_tensor(values, dtype));
      params.push_back(p);
    }
    const double total = clip_grad_norm(params, c["max_norm"].get<double>());
    const double tolerance = dtype == DType::F64 ? 1e-13 : 1e-6;
    require_same({total}, {json_number(c["total_norm"])}, tolerance);
    for (size_t i = 0; i < params.size(); ++i)
      require_same(params[i].grad().to_vector<double>(), json_values(c["clipped"][i]), tolerance);
  }
}

// ---- schedules ----

namespace {

// HF transformers' lambdas, written out again from optimization.py.
double hf_linear(int64_t s, int64_t w, int64_t total) {
  if (s < w) return double(s) / double(std::max<int64_t>(1, w));
  return std::max(0.0, double(total - s) / double(std::max<int64_t>(1, total - w)));
}
double hf_cosine(int64_t s, int64_t w, int64_t total, double cycles = 0.5) {
  if (s < w) return double(s) / double(std::max<int64_t>(1, w));
  const double progress = double(s - w) / double(std::max<int64_t>(1, total - w));
  return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * cycles * 2.0 * progress)));
}

}  // namespace

TEST_CASE("schedules match Hugging Face's formulas at key steps", "[optim][schedule]") {
  const int64_t w = 500, total = 2000;
  const std::vector<int64_t> steps = {0, 1, w - 1, w, w + 1, (w + total) / 2, total - 1, total, total + 10};
  const Schedule linear = Schedule::linear(w, total), cosine = Schedule::cosine(w, total);
  const Schedule warm = Schedule::constant_with_warmup(w), flat = Schedule::constant();
  for (int64_t s : steps) {
    INFO("step " << s);
    CHECK(linear.multiplier(s) == Approx(hf_linear(s, w, total)).margin(1e-15));
    CHECK(cosine.multiplier(s) == Approx(hf_cosine(s, w, total)).margin(1e-15));
    CHECK(warm.multiplier(s) == Approx(s < w ? double(s) / w : 1.0).margin(1e-15));
    CHECK(flat.multiplier(s) == 1.0);
  }
  // Landmarks that need no formula: warmup starts at 0 and ends at 1, the
  // cosine is at half height midway and reaches 0 at the end.
  CHECK(cosine.multiplier(0) == 0.0);
  CHECK(cosine.multiplier(w - 1) == Approx(499.0 / 500.0));
  CHECK(cosine.multiplier(w) == 1.0);
  CHECK(cosine.multiplier((w + total) / 2) == Approx(0.5).margin(1e-12));
  CHECK(cosine.multiplier(total) == Approx(0.0).margin(1e-15));
  CHECK(linear.multiplier((w + total) / 2) == Approx(0.5));
  CHECK(linear.multiplier(total + 10) == 0.0);
  // A full cosine cycle comes back up; no warmup starts at 1.
  CHECK(Schedule::cosine(0, 100, 1.0).multiplier(100) == Approx(1.0));
  CHECK(Schedule::linear(0, 100).multiplier(0) == 1.0);
  // HF's max(1, ...) guards: zero total steps, and warmup longer than training.
  CHECK(Schedule::linear(0, 0).multiplier(0) == 0.0);
  CHECK(Schedule::linear(10, 5).multiplier(10) == Approx(hf_linear(10, 10, 5)));
}

TEST_CASE("schedules by name, and their errors", "[optim][schedule][errors]") {
  CHECK(Schedule::from_name("cosine", 10, 100).kind == ScheduleKind::Cosine);
  CHECK(Schedule::from_name("linear", 10, 100).total_steps == 100);
  CHECK(Schedule::from_name("constant_with_warmup", 10, 100).warmup_steps == 10);
  CHECK(Schedule::from_name("constant", 10, 100).multiplier(0) == 1.0);
  CHECK_THROWS_AS(Schedule::from_name("cosine_with_restarts", 10, 100), Error);
  CHECK_THROWS_AS(Schedule::linear(-1, 100), Error);
  CHECK_THROWS_AS(Schedule::cosine(0, 100).multiplier(-1), Error);
}

TEST_CASE("a schedule drives the optimiser's lr", "[optim][schedule]") {
  Tensor p = f64_param({1.0});
  AdamW opt({p});
  const Schedule schedule = Schedule::linear(2, 4);
  std::vector<double> seen;
  for (int step = 0; step < 5; ++step) {
    opt.set_lr(0.1 * schedule.multiplier(opt.step_count()));
    seen.push_back(opt.lr());
    p.set_grad(Tensor::from_vector(std::vector<double>{1.0}, {1}));
    opt.step();
  }
  require_close(Tensor::from_vector(seen, {5}), {0.0, 0.05, 0.1, 0.05, 0.0}, 1e-15);
}
