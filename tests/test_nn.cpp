// Module and the basic layers. A tiny GPT-2-shaped model checks dotted names,
// tied weights, freezing by pattern, counts, modes, replace_module and
// to(DType). Each layer's forward is checked against a naive loop and its
// backward against finite differences (f64); initialisation by its statistics.
#include <catch2/catch.hpp>

#include "engine/nn/layers.h"
#include "engine/nn/module.h"
#include "tests/gradcheck.h"

#include <algorithm>
#include <cmath>
#include <set>

using namespace engine;
using namespace engine::nn;
using testing::check_gradients;
using testing::random_f64;
using testing::require_close;

namespace {

// ---- a tiny GPT-2-shaped model ----

struct Attention : Module {
  Attention(int64_t c, Generator& gen) {
    register_module("c_attn", std::make_shared<Linear>(c, 3 * c, gen, true, WeightLayout::InOut));
    register_module("c_proj", std::make_shared<Linear>(3 * c, c, gen, true, WeightLayout::InOut));
    register_buffer("bias", Tensor::ones({4, 4}));  // GPT-2 keeps its causal mask as a buffer
  }
  std::string type_name() const override { return "Attention"; }
  Tensor forward(const Tensor& x) override { return child("c_proj")(child("c_attn")(x)); }
};

struct Block : Module {
  Block(int64_t c, Generator& gen) {
    register_module("ln_1", std::make_shared<LayerNorm>(c));
    register_module("attn", std::make_shared<Attention>(c, gen));
    register_module("drop", std::make_shared<Dropout>(0.1, gen));
  }
};

struct TinyModel : Module {
  std::shared_ptr<Embedding> wte;
  TinyModel(int64_t vocab, int64_t c, int64_t layers, Generator& gen) {
    wte = register_module("wte", std::make_shared<Embedding>(vocab, c, gen, 0.02));
    auto h = register_module("h", std::make_shared<ModuleList>());
    for (int64_t i = 0; i < layers; ++i) h->push_back(std::make_shared<Block>(c, gen));
    register_module("ln_f", std::make_shared<LayerNorm>(c));
    register_module("lm_head", std::make_shared<Linear>(wte->weight, Tensor(), WeightLayout::OutIn));  // tied
    register_buffer("position_ids", Tensor::arange(0, 4));  // an integer buffer
  }
};

std::vector<std::string> names_of(const NamedTensors& list) {
  std::vector<std::string> out;
  for (const auto& entry : list) out.push_back(entry.first);
  return out;
}

// A LoRA-style wrapper, as an adapter injection would build: base(x) + x @ delta.
struct Wrapper : Module {
  Wrapper(std::shared_ptr<Module> base, int64_t in, int64_t out) {
    register_module("base", std::move(base));
    register_parameter("delta", Tensor::full({in, out}, 0.5));
  }
  Tensor forward(const Tensor& x) override { return add(child("base")(x), matmul(x, get_parameter("delta"))); }
};

// Naive y[r, o] = sum_i x[r, i] W(o, i) + b[o] over the flattened rows of x.
std::vector<double> naive_linear(const Tensor& x, const Tensor& w, const Tensor& b, WeightLayout layout) {
  const int64_t in = x.size(-1), rows = x.numel() / in;
  const int64_t out = layout == WeightLayout::OutIn ? w.size(0) : w.size(1);
  std::vector<double> xv = x.contiguous().to_vector<double>(), wv = w.to_vector<double>();
  std::vector<double> bv = b.defined() ? b.to_vector<double>() : std::vector<double>(size_t(out), 0.0);
  std::vector<double> y(size_t(rows * out));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double acc = bv[size_t(o)];
      for (int64_t i = 0; i < in; ++i) {
        const double wi = layout == WeightLayout::OutIn ? wv[size_t(o * in + i)] : wv[size_t(i * out + o)];
        acc += xv[size_t(r * in + i)] * wi;
      }
      y[size_t(r * out + o)] = acc;
    }
  return y;
}

}  // namespace

// ---- Module ----

TEST_CASE("glob_match: '*' spans dots, '?' is one character, the whole name must match", "[nn][module]") {
  CHECK(glob_match("h.*.attn.c_attn.*", "h.3.attn.c_attn.weight"));
  CHECK(glob_match("*.bias", "h.3.attn.c_attn.bias"));
  CHECK(glob_match("*", "anything.at.all"));
  CHECK(glob_match("h.?.attn.*", "h.7.attn.c_proj.weight"));
  CHECK_FALSE(glob_match("h.?.attn.*", "h.10.attn.c_proj.weight"));
  CHECK_FALSE(glob_match("h.1.*", "h.10.attn.weight"));
  CHECK_FALSE(glob_match("*.bias", "h.3.attn.c_attn.weight"));
  CHECK_FALSE(glob_match("attn", "h.3.attn"));  // no implicit prefix or suffix
  CHECK(glob_match("a*b*c", "a.x.b.y.c"));
  CHECK_FALSE(glob_match("a*b*c", "a.x.b.y.cd"));
  CHECK(glob_match("", ""));
  CHECK_FALSE(glob_match("", "x"));
}

TEST_CASE("Module lists parameters, buffers and modules by dotted name in registration order", "[nn][module]") {
  Generator gen(1);
  TinyModel model(11, 4, 2, gen);
  std::vector<std::string> expected;
  expected.push_back("wte.weight");
  for (std::string h : {"h.0.", "h.1."})
    for (std::string p : {"ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                          "attn.c_proj.bias"})
      expected.push_back(h + p);
  expected.push_back("ln_f.weight");
  expected.push_back("ln_f.bias");
  // lm_head.weight is wte.weight: listed once, under its first name.
  CHECK(names_of(model.named_parameters()) == expected);
  CHECK(model.parameters().size() == expected.size());
  CHECK(names_of(model.named_buffers()) == std::vector<std::string>{"position_ids", "h.0.attn.bias", "h.1.attn.bias"});

  std::vector<std::string> modules;
  for (const auto& [name, m] : model.named_modules()) modules.push_back(name);
  CHECK(modules == std::vector<std::string>{"wte", "h", "h.0", "h.0.ln_1", "h.0.attn", "h.0.attn.c_attn",
                                            "h.0.attn.c_proj", "h.0.drop", "h.1", "h.1.ln_1", "h.1.attn",
                                            "h.1.attn.c_attn", "h.1.attn.c_proj", "h.1.drop", "ln_f", "lm_head"});

  // Counts: wte 11*4; per block ln 2*4, c_attn 4*12+12, c_proj 12*4+4; ln_f 2*4. The tie counts once.
  const int64_t per_block = 8 + 60 + 52;
  CHECK(model.num_parameters() == 44 + 2 * per_block + 8);
  CHECK(model.num_trainable_parameters() == model.num_parameters());

  // Lookups return the very tensors the layers hold.
  auto c_attn = std::dynamic_pointer_cast<Linear>(model.get_submodule("h.1.attn.c_attn"));
  REQUIRE(c_attn);
  CHECK(c_attn->weight.shape() == Shape{4, 12});  // Conv1D layout [in, out]
  CHECK(model.get_parameter("h.1.attn.c_attn.weight").same(c_attn->weight));
  CHECK(model.get_parameter("lm_head.weight").same(model.wte->weight));
  CHECK(model.get_buffer("h.0.attn.bias").shape() == Shape{4, 4});
  CHECK(model.get_buffer("position_ids").dtype() == DType::I64);
  CHECK(&static_cast<ModuleList&>(model.child("h"))[1] == model.get_submodule("h.1").get());

  CHECK_THROWS_AS(model.get_parameter("h.1.attn.c_attn.wieght"), Error);
  CHECK_THROWS_AS(model.get_parameter("h.7.attn.c_attn.weight"), Error);
  CHECK_THROWS_AS(model.get_submodule("h.0.mlp"), Error);
  CHECK_THROWS_AS(model.get_submodule(""), Error);
  CHECK_THROWS_AS(model.get_buffer("h.0.attn.c_attn.weight"), Error);  // a parameter, not a buffer
  CHECK_THROWS_AS(model.child("transformer"), Error);
  CHECK_THROWS_AS(static_cast<ModuleList&>(model.child("h"))[2], Error);
  CHECK_THROWS_AS(model.forward(Tensor::zeros({1})), Error);  // a container has no single-input forward
}

TEST_CASE("freeze, unfreeze and set_trainable by pattern", "[nn][module]") {
  Generator gen(2);
  TinyModel model(11, 4, 2, gen);
  CHECK(model.freeze("*") == 15);
  CHECK(model.num_trainable_parameters() == 0);
  CHECK(model.unfreeze("h.*.attn.c_attn.*") == 4);
  CHECK(names_of(model.named_trainable_parameters()) ==
        std::vector<std::string>{"h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias", "h.1.attn.c_attn.weight",
                                 "h.1.attn.c_attn.bias"});
  CHECK(model.num_trainable_parameters() == 2 * 60);
  CHECK(model.freeze("*.bias") == 7);  // every bias, at any depth
  CHECK(model.num_trainable_parameters() == 2 * 48);
  CHECK(model.freeze("h.*.attn.c_atn.*") == 0);  // a typo matches nothing, and says so
  CHECK_FALSE(model.get_parameter("lm_head.weight").requires_grad());  // the tie shares the flag

  model.set_trainable([](const std::string& name, const Tensor& t) {
    return name.rfind("ln_", 0) != std::string::npos || (t.dim() == 2 && name.find("c_proj") != std::string::npos);
  });
  CHECK(names_of(model.named_trainable_parameters()) ==
        std::vector<std::string>{"h.0.attn.c_proj.weight", "h.1.attn.c_proj.weight", "ln_f.weight", "ln_f.bias"});

  // zero_grad drops the gradients of every parameter.
  Tensor w = model.get_parameter("ln_f.weight");
  w.set_grad(Tensor::ones({4}));
  model.zero_grad();
  CHECK_FALSE(w.grad().defined());
}

TEST_CASE("train and eval propagate to every descendant", "[nn][module]") {
  Generator gen(3);
  TinyModel model(11, 4, 2, gen);
  CHECK(model.is_training());
  model.eval();
  CHECK_FALSE(model.is_training());
  for (const auto& [name, m] : model.named_modules()) {
    INFO(name);
    CHECK_FALSE(m->is_training());
  }
  model.get_submodule("h.1")->train();  // a subtree only
  CHECK(model.get_submodule("h.1.drop")->is_training());
  CHECK_FALSE(model.get_submodule("h.0.drop")->is_training());
  CHECK_FALSE(model.is_training());

  // The dropout in eval mode is the identity; in training it is not.
  Tensor x = Tensor::ones({64});
  Module& drop0 = *model.get_submodule("h.0.drop");
  CHECK(drop0(x).same(x));
  Module& drop1 = *model.get_submodule("h.1.drop");
  CHECK_FALSE(drop1(x).same(x));
}

TEST_CASE("replace_module swaps a child by dotted name, as adapter injection needs", "[nn][module]") {
  Generator gen(4);
  TinyModel model(11, 4, 2, gen);
  std::shared_ptr<Module> base = model.get_submodule("h.1.attn.c_attn");
  Tensor x = random_f64({2, 4}, 5, false).to(DType::F32);
  Tensor before = model.get_submodule("h.1.attn")->forward(x);

  std::shared_ptr<Module> old = model.replace_module("h.1.attn.c_attn", std::make_shared<Wrapper>(base, 4, 12));
  CHECK(old == base);
  auto names = names_of(model.named_parameters());
  CHECK(std::find(names.begin(), names.end(), "h.1.attn.c_attn.base.weight") != names.end());
  CHECK(std::find(names.begin(), names.end(), "h.1.attn.c_attn.delta") != names.end());
  CHECK(std::find(names.begin(), names.end(), "h.1.attn.c_attn.weight") == names.end());
  CHECK(model.num_parameters() == 44 + 2 * 120 + 8 + 4 * 12);

  // The parent's forward goes through the new child: c_proj(c_attn(x) + x @ delta).
  Tensor after = model.get_submodule("h.1.attn")->forward(x);
  Module& c_proj = *model.get_submodule("h.1.attn.c_proj");
  Tensor expected = c_proj(add(base->forward(x), matmul(x, Tensor::full({4, 12}, 0.5))));
  require_close(after, expected.to_vector<double>(), 1e-6);
  CHECK(std::abs(after.to_vector<double>()[0] - before.to_vector<double>()[0]) > 1e-3);

  CHECK_THROWS_AS(model.replace_module("h.1.attn.c_atn", base), Error);
  CHECK_THROWS_AS(model.replace_module("h.9.attn.c_attn", base), Error);
  CHECK_THROWS_AS(model.replace_module("h.1.attn.c_proj", nullptr), Error);
}

TEST_CASE("to(DType) converts parameters and buffers in place, keeping flags and ties", "[nn][module]") {
  Generator gen(6);
  TinyModel model(11, 4, 2, gen);
  model.freeze("h.0.*");
  Tensor wte = model.wte->weight;  // a handle taken before the conversion
  std::vector<double> wte_values = wte.to_vector<double>();
  wte.set_grad(Tensor::full(wte.shape(), 0.25));

  model.to(DType::F64);
  for (const auto& [name, p] : model.named_parameters()) {
    INFO(name);
    CHECK(p.dtype() == DType::F64);
    CHECK(p.requires_grad() == (name.rfind("h.0.", 0) != 0));
    CHECK(p.is_leaf());
  }
  CHECK(wte.dtype() == DType::F64);  // old handles see the new data
  CHECK(wte.to_vector<double>() == wte_values);  // f32 -> f64 is exact
  CHECK(model.get_parameter("lm_head.weight").same(model.wte->weight));
  CHECK(std::dynamic_pointer_cast<Linear>(model.get_submodule("lm_head"))->weight.dtype() == DType::F64);
  CHECK(wte.grad().dtype() == DType::F64);
  CHECK(model.get_buffer("h.1.attn.bias").dtype() == DType::F64);
  CHECK(model.get_buffer("position_ids").dtype() == DType::I64);  // integer buffers stay

  // The model runs in f64 now.
  Tensor y = model.get_submodule("h.1.attn")->forward(random_f64({3, 4}, 7, false));
  CHECK(y.dtype() == DType::F64);

  model.to(Device::cpu());  // already there: nothing changes
  CHECK(wte.dtype() == DType::F64);
  CHECK_THROWS_AS(model.to(DType::I32), Error);
}

TEST_CASE("Module registration errors", "[nn][module]") {
  struct Bad : Module {
    void add(const std::string& name, Tensor t) { register_parameter(name, t); }
    void add_buffer(const std::string& name, Tensor t) { register_buffer(name, t); }
    void add_child(const std::string& name, std::shared_ptr<Module> m) { register_module(name, m); }
  };
  Bad m;
  m.add("w", Tensor::zeros({2}));
  CHECK(m.get_parameter("w").requires_grad());
  CHECK_THROWS_AS(m.add("w", Tensor::zeros({2})), Error);         // taken
  CHECK_THROWS_AS(m.add_buffer("w", Tensor::zeros({2})), Error);  // taken by a parameter
  CHECK_THROWS_AS(m.add("a.b", Tensor::zeros({2})), Error);       // dotted
  CHECK_THROWS_AS(m.add("", Tensor::zeros({2})), Error);
  CHECK_THROWS_AS(m.add("u", Tensor()), Error);
  CHECK_THROWS_AS(m.add("i", Tensor::zeros({2}, DType::I64)), Error);  // integers cannot train
  Tensor leaf = Tensor::ones({2});
  leaf.set_requires_grad(true);
  CHECK_THROWS_AS(m.add("made", mul(leaf, 2.0)), Error);  // not a leaf
  CHECK_THROWS_AS(m.add_child("c", nullptr), Error);
}

// ---- Linear ----

TEST_CASE("Linear forward in both layouts matches a naive loop", "[nn][linear]") {
  Generator gen(10);
  for (WeightLayout layout : {WeightLayout::OutIn, WeightLayout::InOut}) {
    for (bool with_bias : {true, false}) {
      INFO("layout " << (layout == WeightLayout::OutIn ? "OutIn" : "InOut") << " bias " << with_bias);
      Linear lin(7, 4, gen, with_bias, layout);
      CHECK(lin.weight.shape() == (layout == WeightLayout::OutIn ? Shape{4, 7} : Shape{7, 4}));
      CHECK(lin.bias.defined() == with_bias);
      CHECK(lin.in_features == 7);
      CHECK(lin.out_features == 4);
      Tensor x = Tensor::rand({3, 5, 7}, gen, -1, 1);
      Tensor y = lin(x);
      CHECK(y.shape() == Shape{3, 5, 4});
      require_close(y, naive_linear(x, lin.weight, lin.bias, layout), 1e-5);
      // A non-contiguous input: the transpose of a [3, 7, 5] tensor.
      Tensor xt = Tensor::rand({3, 7, 5}, gen, -1, 1).transpose(1, 2);
      require_close(lin(xt), naive_linear(xt, lin.weight, lin.bias, layout), 1e-5);
    }
  }
}

TEST_CASE("Linear gradients match finite differences (f64, both layouts)", "[nn][linear]") {
  Generator gen(11);
  for (WeightLayout layout : {WeightLayout::OutIn, WeightLayout::InOut}) {
    Linear lin(5, 3, gen, true, layout, DType::F64);
    Tensor x = random_f64({2, 3, 5}, 12);
    check_gradients([&](const std::vector<Tensor>& in) { return lin(in[0]); }, {x, lin.weight, lin.bias});
  }
  // A frozen weight gets no gradient; the input and bias still do.
  Linear lin(5, 3, gen, true, WeightLayout::InOut, DType::F64);
  lin.freeze("weight");
  Tensor x = random_f64({4, 5}, 13);
  sum(lin(x)).backward();
  CHECK_FALSE(lin.weight.grad().defined());
  CHECK(lin.bias.grad().defined());
  CHECK(x.grad().defined());
  require_close(lin.bias.grad(), {4, 4, 4}, 1e-12);
}

TEST_CASE("Linear initialises like torch: U(-1/sqrt(in), 1/sqrt(in)), weight then bias", "[nn][linear]") {
  Generator gen(20);
  Linear lin(256, 300, gen);
  const double bound = 1.0 / 16.0;
  std::vector<double> w = lin.weight.to_vector<double>(), b = lin.bias.to_vector<double>();
  double mean = 0, square = 0, largest = 0;
  for (double v : w) mean += v, square += v * v, largest = std::max(largest, std::abs(v));
  mean /= double(w.size());
  square /= double(w.size());
  CHECK(largest <= bound);
  CHECK(largest > 0.99 * bound);
  CHECK(std::abs(mean) < 0.002);
  CHECK(square == Approx(bound * bound / 3).epsilon(0.02));  // the variance of U(-a, a) is a^2 / 3
  CHECK(std::all_of(b.begin(), b.end(), [&](double v) { return std::abs(v) <= bound; }));
  CHECK(std::set<double>(b.begin(), b.end()).size() == b.size());

  // The same seed gives the same layer; the weight is drawn before the bias.
  Generator again(20);
  Linear twin(256, 300, again);
  require_close(twin.weight, w, 0);
  Generator third(20);
  Tensor first_draw = Tensor::rand({300, 256}, third, -bound, bound);
  require_close(first_draw, w, 0);
}

TEST_CASE("Linear from existing tensors, and its errors", "[nn][linear]") {
  Tensor w = Tensor::ones({3, 6});
  Linear conv1d(w, Tensor::zeros({6}), WeightLayout::InOut);
  CHECK(conv1d.in_features == 3);
  CHECK(conv1d.out_features == 6);
  CHECK(conv1d.weight.same(w));
  CHECK(conv1d(Tensor::ones({2, 3})).shape() == Shape{2, 6});
  CHECK_THROWS_AS(Linear(Tensor::ones({3, 6}), Tensor::zeros({3}), WeightLayout::InOut), Error);
  CHECK_THROWS_AS(Linear(Tensor::ones({6}), Tensor(), WeightLayout::OutIn), Error);
  CHECK_THROWS_AS(Linear(Tensor::ones({3, 6}), Tensor::zeros({6}, DType::F64), WeightLayout::InOut), Error);
  Generator gen(1);
  Linear lin(4, 2, gen);
  CHECK_THROWS_AS(lin(Tensor::ones({2, 5})), Error);  // 5 inputs for 4 features
}

// ---- Embedding ----

TEST_CASE("Embedding gathers rows and scatters gradients back", "[nn][embedding]") {
  Generator gen(30);
  Embedding emb(7, 5, gen, 0.5, DType::F64);
  Tensor ids = Tensor::from_vector(std::vector<int64_t>{3, 0, 6, 3, 1, 2}, {2, 3});
  Tensor y = emb(ids);
  CHECK(y.shape() == Shape{2, 3, 5});
  std::vector<double> table = emb.weight.to_vector<double>(), expected;
  for (int64_t id : {3, 0, 6, 3, 1, 2})
    for (int64_t c = 0; c < 5; ++c) expected.push_back(table[size_t(id * 5 + c)]);
  require_close(y, expected, 0);
  check_gradients([&](const std::vector<Tensor>&) { return emb(ids); }, {emb.weight});
  CHECK_THROWS_AS(emb(Tensor::from_vector(std::vector<int64_t>{7}, {1})), Error);  // out of range
}

TEST_CASE("Embedding initialises normal(0, std)", "[nn][embedding]") {
  Generator gen(31);
  Embedding emb(1000, 64, gen, 0.02);
  std::vector<double> w = emb.weight.to_vector<double>();
  double mean = 0, square = 0;
  for (double v : w) mean += v, square += v * v;
  mean /= double(w.size());
  square /= double(w.size());
  CHECK(std::abs(mean) < 0.001);
  CHECK(std::sqrt(square - mean * mean) == Approx(0.02).epsilon(0.02));
  CHECK_THROWS_AS(Embedding(Tensor::ones({5})), Error);
}

// ---- LayerNorm ----

TEST_CASE("LayerNorm normalises the last dim, then scales and shifts", "[nn][layernorm]") {
  LayerNorm fresh(6);
  require_close(fresh.weight, std::vector<double>(6, 1.0), 0);
  require_close(fresh.bias, std::vector<double>(6, 0.0), 0);
  CHECK(fresh.eps == 1e-5);

  Tensor w = random_f64({7}, 40), b = random_f64({7}, 41);
  LayerNorm ln(w, b, 1e-5);
  Tensor x = random_f64({3, 5, 7}, 42);
  std::vector<double> xv = x.to_vector<double>(), wv = w.to_vector<double>(), bv = b.to_vector<double>(), expected;
  for (int64_t r = 0; r < 15; ++r) {
    double mean = 0, var = 0;
    for (int64_t c = 0; c < 7; ++c) mean += xv[size_t(r * 7 + c)] / 7;
    for (int64_t c = 0; c < 7; ++c) var += std::pow(xv[size_t(r * 7 + c)] - mean, 2) / 7;  // biased, as torch
    for (int64_t c = 0; c < 7; ++c)
      expected.push_back((xv[size_t(r * 7 + c)] - mean) / std::sqrt(var + 1e-5) * wv[size_t(c)] + bv[size_t(c)]);
  }
  require_close(ln(x), expected, 1e-12);
  check_gradients([&](const std::vector<Tensor>& in) { return ln(in[0]); }, {x, ln.weight, ln.bias});
  CHECK_THROWS_AS(LayerNorm(Tensor::ones({4}), Tensor::ones({5})), Error);
  CHECK_THROWS_AS(LayerNorm(0), Error);
}

// ---- Dropout ----

TEST_CASE("Dropout zeroes with probability p and scales the rest, in training only", "[nn][dropout]") {
  Generator gen(50);
  Dropout drop(0.25, gen);
  Tensor x = Tensor::full({10000}, 2.0);
  std::vector<double> y = drop(x).to_vector<double>();
  int64_t zeros = 0, others = 0;
  for (double v : y) {
    zeros += v == 0.0;
    others += v != 0.0 && std::abs(v - 2.0 / 0.75) > 1e-6;
  }
  CHECK(others == 0);
  CHECK(double(zeros) / 10000 == Approx(0.25).margin(0.02));
  CHECK(drop(x).to_vector<double>() != y);  // the generator moved on: a new mask

  // The same generator state gives the same mask.
  Generator a(51), b(51);
  Dropout da(0.5, a), db(0.5, b);
  CHECK(da(x).to_vector<double>() == db(x).to_vector<double>());

  drop.eval();
  CHECK(drop(x).same(x));
  Dropout none(0.0, gen);
  CHECK(none(x).same(x));
  CHECK_THROWS_AS(Dropout(1.0), Error);
  CHECK_THROWS_AS(Dropout(-0.1), Error);
}
