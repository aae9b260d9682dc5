// GPT-2 forward, block by block, as transformers' modeling_gpt2.py computes it.
#include "models/gpt2.h"

#include "engine/error.h"
#include "engine/ops.h"
#include "engine/precision.h"

#include <cmath>
#include <filesystem>
#include <optional>
#include <tuple>

namespace models {

using engine::check;
using engine::DType;
using engine::Shape;
using engine::nn::Init;
using engine::nn::Linear;
using engine::nn::VarBuilder;
using engine::WeightLayout;

namespace {

// HF's Conv1D: weight [in, out], y = x W + b.
std::shared_ptr<Linear> conv1d(const VarBuilder& vb, int64_t in, int64_t out, double std) {
  return std::make_shared<Linear>(vb.get("weight", {in, out}, Init::normal(std)), vb.get("bias", {out}),
                                  WeightLayout::InOut);
}

std::shared_ptr<engine::nn::LayerNorm> layer_norm(const VarBuilder& vb, int64_t dim, double eps) {
  return std::make_shared<engine::nn::LayerNorm>(vb.get("weight", {dim}, Init::ones()), vb.get("bias", {dim}), eps);
}

// dropout(y), or residual + dropout(y): in one pass where the module is still a Dropout.
Tensor dropout_then_add(engine::nn::Module& dropout, const Tensor& y, const Tensor& residual) {
  if (!residual.defined()) return dropout(y);
  if (auto* d = dynamic_cast<engine::nn::Dropout*>(&dropout)) return d->forward_added_to(residual, y);
  return residual + dropout(y);
}

// {residual + dropout(y), norm of it} (no norm: undefined), the norm's output
// for linear layers when into_linear, with `room` after its rows (see
// LayerNorm::forward_into_linear): one pass where the module is a Dropout.
std::pair<Tensor, Tensor> dropout_add_then_norm(engine::nn::Module& dropout, const Tensor& y, const Tensor& residual,
                                                engine::nn::LayerNorm* norm, bool into_linear, int64_t room = 0) {
  auto* d = dynamic_cast<engine::nn::Dropout*>(&dropout);
  if (!norm || !d) {
    const Tensor sum = dropout_then_add(dropout, y, residual);
    return {sum, !norm ? Tensor() : into_linear ? norm->forward_into_linear(sum, room) : (*norm)(sum)};
  }
  const std::optional<DType> out = into_linear ? engine::autocast_dtype_for(residual.dtype()) : std::nullopt;
  return engine::dropout_add_layer_norm(residual, y, d->p, d->is_training(), d->generator(), norm->weight,
                                        norm->bias, norm->eps, out, into_linear ? room : 0);
}

}  // namespace

// ---- attention ----

GPT2Attention::GPT2Attention(const GPT2Config& config, int64_t layer_index, const VarBuilder& vb,
                             engine::Generator& dropout_gen)
    : n_head_(config.n_head), attn_pdrop_(config.attn_pdrop), dropout_gen_(dropout_gen) {
  const int64_t C = config.n_embd;
  const double proj_std = config.initializer_range / std::sqrt(2.0 * double(config.n_layer));
  register_module("c_attn", conv1d(vb.pp("c_attn"), C, 3 * C, config.initializer_range));
  register_module("c_proj", conv1d(vb.pp("c_proj"), C, C, proj_std));
  register_module("resid_dropout", std::make_shared<engine::nn::Dropout>(config.resid_pdrop, dropout_gen));
  scale_ = config.scale_attn_weights ? 1.0 / std::sqrt(double(config.head_dim())) : 1.0;
  if (config.scale_attn_by_inverse_layer_idx) scale_ /= double(layer_index + 1);
}

Tensor GPT2Attention::forward(const Tensor& x, const Tensor& key_mask, Tensor* past_key, Tensor* past_value,
                              const Tensor& residual) {
  return dropout_then_add(child("resid_dropout"), project(x, key_mask, past_key, past_value), residual);
}

Tensor GPT2Attention::project(const Tensor& x, const Tensor& key_mask, Tensor* past_key, Tensor* past_value) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), D = C / n_head_;
  Tensor qkv = child("c_attn")(x);  // [B, T, 3C]; an adapter may have replaced c_attn
  // In training, attn_pdrop drops attention probabilities inside the fused kernel, as HF does.
  const double dropout_p = is_training() ? attn_pdrop_ : 0.0;
  Tensor a;
  if (!past_key) {  // q, k, v stay together: [B, T, 3, H, D] -> [3, B, H, T, D], one gradient buffer
    const Tensor packed = qkv.reshape({B, T, 3, n_head_, D}).permute({2, 0, 3, 1, 4});
    a = engine::scaled_dot_product_attention_packed(packed, key_mask, /*causal=*/true, scale_, dropout_p,
                                                    &dropout_gen_);
  } else {  // incremental decoding: attend to the cached positions too
    auto heads = [&](const Tensor& t) { return t.view({B, T, n_head_, D}).permute({0, 2, 1, 3}); };
    std::vector<Tensor> parts = engine::split(qkv, C, -1);
    Tensor q = heads(parts[0]), k = heads(parts[1]), v = heads(parts[2]);
    if (past_key->defined()) {
      k = engine::cat({*past_key, k}, 2);
      v = engine::cat({*past_value, v}, 2);
    }
    *past_key = k.detach();
    *past_value = v.detach();
    a = engine::scaled_dot_product_attention(q, k, v, key_mask, /*causal=*/true, scale_, dropout_p, &dropout_gen_);
  }
  a = a.permute({0, 2, 1, 3}).reshape({B, T, C});
  return child("c_proj")(a);
}

// ---- MLP ----

GPT2MLP::GPT2MLP(const GPT2Config& config, const VarBuilder& vb, engine::Generator& dropout_gen) {
  const int64_t C = config.n_embd, inner = config.inner_dim();
  const double proj_std = config.initializer_range / std::sqrt(2.0 * double(config.n_layer));
  register_module("c_fc", conv1d(vb.pp("c_fc"), C, inner, config.initializer_range));
  register_module("c_proj", conv1d(vb.pp("c_proj"), inner, C, proj_std));
  register_module("dropout", std::make_shared<engine::nn::Dropout>(config.resid_pdrop, dropout_gen));
}

Tensor GPT2MLP::forward(const Tensor& x, const Tensor& residual) {
  return dropout_then_add(child("dropout"), project(x), residual);
}

Tensor GPT2MLP::project(const Tensor& x) {
  // Plain layers take the GELU inside their GEMMs, forward and backward; an
  // adapter in either place composes the ops.
  auto plain = [&](const char* name) {
    const auto* linear = dynamic_cast<const Linear*>(&child(name));
    return linear && linear->type_name() == "Linear" ? linear : nullptr;
  };
  const Linear *fc = plain("c_fc"), *proj = plain("c_proj");
  if (fc && proj && fc->layout == proj->layout)
    return engine::linear_gelu_linear(x, fc->weight, fc->bias, proj->weight, proj->bias, fc->layout);
  if (fc) return child("c_proj")(engine::linear_gelu(x, fc->weight, fc->bias, fc->layout));
  return child("c_proj")(engine::gelu_new(child("c_fc")(x)));
}

// ---- block ----

GPT2Block::GPT2Block(const GPT2Config& config, int64_t layer_index, const VarBuilder& vb,
                     engine::Generator& dropout_gen) {
  ln_1_ = register_module("ln_1", layer_norm(vb.pp("ln_1"), config.n_embd, config.layer_norm_epsilon));
  attn_ = register_module("attn", std::make_shared<GPT2Attention>(config, layer_index, vb.pp("attn"), dropout_gen));
  ln_2_ = register_module("ln_2", layer_norm(vb.pp("ln_2"), config.n_embd, config.layer_norm_epsilon));
  mlp_ = register_module("mlp", std::make_shared<GPT2MLP>(config, vb.pp("mlp"), dropout_gen));
}

// ln_1 feeds only c_attn and ln_2 only c_fc (or adapters in their place). The
// residual adds ride in the sublayers' output dropouts.
Tensor GPT2Block::forward(const Tensor& x, const Tensor& key_mask, Tensor* past_key, Tensor* past_value) {
  return forward_stream(x, ln_1_->forward_into_linear(x, ln_1_room()), key_mask, past_key, past_value, nullptr, false)
      .first;
}

std::pair<Tensor, Tensor> GPT2Block::forward_stream(const Tensor& x, const Tensor& normed, const Tensor& key_mask,
                                                    Tensor* past_key, Tensor* past_value,
                                                    engine::nn::LayerNorm* next, bool next_into_linear,
                                                    int64_t next_room) {
  const Tensor a = attn_->project(normed, key_mask, past_key, past_value);
  const auto [h, h_normed] = dropout_add_then_norm(attn_->child("resid_dropout"), a, x, ln_2_.get(), true,
                                                   mlp_->child("c_fc").input_room());
  return dropout_add_then_norm(mlp_->child("dropout"), mlp_->project(h_normed), h, next, next_into_linear, next_room);
}

int64_t GPT2Block::ln_1_room() const { return attn_->child("c_attn").input_room(); }

// ---- the transformer body ----

GPT2Model::GPT2Model(const GPT2Config& config, const VarBuilder& vb, engine::Generator& dropout_gen)
    : config_(config) {
  const double std = config.initializer_range;
  wte_ = register_module("wte", std::make_shared<engine::nn::Embedding>(
                                    vb.get("wte.weight", {config.vocab_size, config.n_embd}, Init::normal(std))));
  wpe_ = register_module("wpe", std::make_shared<engine::nn::Embedding>(
                                    vb.get("wpe.weight", {config.n_positions, config.n_embd}, Init::normal(std))));
  register_module("drop", std::make_shared<engine::nn::Dropout>(config.embd_pdrop, dropout_gen));
  auto h = std::make_shared<engine::nn::ModuleList>();
  for (int64_t i = 0; i < config.n_layer; ++i)
    h->push_back(std::make_shared<GPT2Block>(config, i, vb.pp("h").pp(std::to_string(i)), dropout_gen));
  register_module("h", h);
  register_module("ln_f", layer_norm(vb.pp("ln_f"), config.n_embd, config.layer_norm_epsilon));
}

Tensor GPT2Model::forward(const Tensor& ids, const Tensor& attention_mask, KVCache* cache) {
  check(ids.dim() == 2, "GPT-2 expects token ids [batch, time], got shape {}", engine::shape_str(ids.shape()));
  const int64_t B = ids.size(0), T = ids.size(1);
  const int64_t past = cache ? cache->length() : 0;
  check(past + T <= config_.n_positions, "GPT-2: {} positions exceed the context of {}", past + T,
        config_.n_positions);
  if (attention_mask.defined())
    check(attention_mask.shape() == Shape{B, past + T}, "GPT-2: attention_mask shape {}, expected [{}, {}]",
          engine::shape_str(attention_mask.shape()), B, past + T);
  if (cache && cache->keys.empty()) {
    cache->keys.resize(size_t(config_.n_layer));
    cache->values.resize(size_t(config_.n_layer));
  }

  // Positions past..past+T-1 are a slice of wpe: no index tensor, no gather.
  Tensor x = child("drop")(wte_->forward(ids) + wpe_->weight.narrow(0, past, T));
  // Looked up by name, so that a block replaced in the tree takes effect.
  auto block = [&](int64_t i) {
    auto* b = dynamic_cast<GPT2Block*>(&child("h").child(std::to_string(i)));
    check(b != nullptr, "GPT-2: h.{} is not a GPT2Block", i);
    return b;
  };
  auto* ln_f = dynamic_cast<engine::nn::LayerNorm*>(&child("ln_f"));
  if (ln_f && ln_f->type_name() != "LayerNorm") ln_f = nullptr;  // a subclass keeps its own forward
  // Each block hands the next its ln_1 (the last, ln_f) of the stream, made in the pass of its last residual add.
  GPT2Block* current = config_.n_layer > 0 ? block(0) : nullptr;
  Tensor normed = current ? current->ln_1().forward_into_linear(x, current->ln_1_room()) : Tensor();
  for (int64_t i = 0; i < config_.n_layer; ++i) {
    GPT2Block* next = i + 1 < config_.n_layer ? block(i + 1) : nullptr;
    std::tie(x, normed) = current->forward_stream(x, normed, attention_mask,
                                                  cache ? &cache->keys[size_t(i)] : nullptr,
                                                  cache ? &cache->values[size_t(i)] : nullptr,
                                                  next ? &next->ln_1() : ln_f, next != nullptr,
                                                  next ? next->ln_1_room() : 0);
    current = next;
  }
  return normed.defined() ? normed : child("ln_f")(x);
}

// ---- the LM head ----

GPT2LMHeadModel::GPT2LMHeadModel(const GPT2Config& config, const VarBuilder& vb, uint64_t dropout_seed)
    : config_(config), dropout_gen_(dropout_seed) {
  transformer_ = register_module("transformer", std::make_shared<GPT2Model>(config, vb.pp("transformer"), dropout_gen_));
  // Tied: lm_head shares wte's tensor (listed once among the parameters).
  Tensor head = config.tie_word_embeddings || !vb.contains("lm_head.weight")
                    ? transformer_->token_embedding()
                    : vb.get("lm_head.weight", {config.vocab_size, config.n_embd});
  register_module("lm_head", std::make_shared<Linear>(head, Tensor(), WeightLayout::OutIn));
}

std::shared_ptr<GPT2LMHeadModel> GPT2LMHeadModel::load(const std::string& model, DType dtype, engine::Device device,
                                                      uint64_t init_seed) {
  namespace fs = std::filesystem;
  if (GPT2Config::is_builtin(model) && !fs::exists(model)) {
    engine::Generator gen(init_seed);
    auto source = std::make_shared<engine::nn::RandomSource>(gen, dtype, device);
    return std::make_shared<GPT2LMHeadModel>(GPT2Config::builtin(model), VarBuilder(source));
  }
  check(fs::is_directory(model), "model '{}': not a folder, and not one of gpt2, gpt2-medium, gpt2-large, gpt2-xl",
        model);
  GPT2Config config = GPT2Config::from_file((fs::path(model) / "config.json").string());
  // Hub files name keys "h.0..." and state dicts "transformer.h.0...": accept both.
  auto source = engine::nn::CheckpointSource::from_dir(model, dtype, device, {"transformer."});
  auto gpt2 = std::make_shared<GPT2LMHeadModel>(config, VarBuilder(source));
  for (const std::string& key : source->unused_keys()) {
    bool buffer = key.ends_with(".attn.bias") || key.ends_with(".attn.masked_bias");  // causal-mask buffers
    check(buffer || key == "lm_head.weight", "{}: tensor '{}' is not part of GPT-2", source->describe(), key);
  }
  return gpt2;
}

Tensor GPT2LMHeadModel::hidden_states(const Tensor& ids, const Tensor& attention_mask, KVCache* cache) {
  return transformer_->forward(ids, attention_mask, cache);
}

Tensor GPT2LMHeadModel::forward(const Tensor& ids, const Tensor& attention_mask, KVCache* cache) {
  return child("lm_head")(hidden_states(ids, attention_mask, cache));
}

}  // namespace models
