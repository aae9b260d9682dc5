// GPT-2 as Hugging Face's GPT2LMHeadModel computes it: token + position
// embeddings, pre-LN transformer blocks (causal self-attention with a key
// padding mask, gelu_new MLP), a final layer norm, and an lm_head tied to the
// token embedding. Module names match HF's state dict ("transformer.h.0.attn.c_attn.weight").
#pragma once

#include "engine/nn/layers.h"
#include "engine/nn/module.h"
#include "engine/nn/var_builder.h"
#include "models/gpt2_config.h"

#include <memory>
#include <string>
#include <vector>

namespace models {

using engine::Tensor;

// Keys and values of past positions, per layer, for incremental decoding.
struct KVCache {
  std::vector<Tensor> keys, values;  // [B, H, T_past, D] per layer
  int64_t length() const { return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2); }
};

class GPT2Attention : public engine::nn::Module {
 public:
  GPT2Attention(const GPT2Config& config, int64_t layer_index, const engine::nn::VarBuilder& vb,
                engine::Generator& dropout_gen);
  std::string type_name() const override { return "GPT2Attention"; }
  // x [B, T, C]; key_mask [B, T_past + T] (nonzero = attend) or undefined. With a
  // residual, returns residual + the output, added in resid_dropout's pass.
  Tensor forward(const Tensor& x, const Tensor& key_mask, Tensor* past_key, Tensor* past_value,
                 const Tensor& residual = Tensor());
  using engine::nn::Module::forward;  // keeps the one-input form visible (it refuses: a mask is needed)
  // The attention and c_proj, before resid_dropout.
  Tensor project(const Tensor& x, const Tensor& key_mask, Tensor* past_key, Tensor* past_value);

 private:
  int64_t n_head_;
  double scale_;
  double attn_pdrop_;
  engine::Generator& dropout_gen_;
};

class GPT2MLP : public engine::nn::Module {
 public:
  GPT2MLP(const GPT2Config& config, const engine::nn::VarBuilder& vb, engine::Generator& dropout_gen);
  std::string type_name() const override { return "GPT2MLP"; }
  Tensor forward(const Tensor& x) override { return forward(x, Tensor()); }
  // residual + forward(x), added in the output dropout's pass (residual may be undefined).
  Tensor forward(const Tensor& x, const Tensor& residual);
  // c_fc, the GELU and c_proj, before the output dropout.
  Tensor project(const Tensor& x);
};

class GPT2Block : public engine::nn::Module {
 public:
  GPT2Block(const GPT2Config& config, int64_t layer_index, const engine::nn::VarBuilder& vb,
            engine::Generator& dropout_gen);
  std::string type_name() const override { return "GPT2Block"; }
  Tensor forward(const Tensor& x, const Tensor& key_mask, Tensor* past_key, Tensor* past_value);
  using engine::nn::Module::forward;  // keeps the one-input form visible (it refuses: a mask is needed)
  // The block on the residual stream x, given normed = ln_1(x) as forward makes
  // it: the stream after the block, and `next` of it (undefined for no next;
  // into_linear: in the autocast dtype, for linear layers, with next_room
  // columns of room). Each sublayer's dropout, residual add and the layer norm
  // after it take one pass.
  std::pair<Tensor, Tensor> forward_stream(const Tensor& x, const Tensor& normed, const Tensor& key_mask,
                                           Tensor* past_key, Tensor* past_value, engine::nn::LayerNorm* next,
                                           bool next_into_linear, int64_t next_room = 0);
  engine::nn::LayerNorm& ln_1() const { return *ln_1_; }
  int64_t ln_1_room() const;  // the room c_attn asks of its input (Module::input_room; CURLoRA's)

 private:
  std::shared_ptr<engine::nn::LayerNorm> ln_1_, ln_2_;
  std::shared_ptr<GPT2Attention> attn_;
  std::shared_ptr<GPT2MLP> mlp_;
};

// The transformer body ("transformer." in HF names): returns hidden states after ln_f.
class GPT2Model : public engine::nn::Module {
 public:
  GPT2Model(const GPT2Config& config, const engine::nn::VarBuilder& vb, engine::Generator& dropout_gen);
  std::string type_name() const override { return "GPT2Model"; }
  // ids [B, T] (i32/i64); attention_mask [B, T_past + T] or undefined; cache may be null.
  Tensor forward(const Tensor& ids, const Tensor& attention_mask, KVCache* cache = nullptr);
  using engine::nn::Module::forward;  // keeps the one-input form visible (it refuses: a mask is needed)

  const Tensor& token_embedding() const { return wte_->weight; }

 private:
  GPT2Config config_;
  std::shared_ptr<engine::nn::Embedding> wte_, wpe_;
};

class GPT2LMHeadModel : public engine::nn::Module {
 public:
  // Builds the model from `vb`: a checkpoint, or fresh weights initialised as
  // transformers does (normal 0.02; c_proj weights 0.02/sqrt(2 n_layer)).
  GPT2LMHeadModel(const GPT2Config& config, const engine::nn::VarBuilder& vb, uint64_t dropout_seed = 0);

  // A Hugging Face folder (config.json + model.safetensors or its shards) or,
  // for a built-in size name, fresh weights from `init_seed`.
  static std::shared_ptr<GPT2LMHeadModel> load(const std::string& model, engine::DType dtype = engine::DType::F32,
                                               engine::Device device = engine::Device::cpu(),
                                               uint64_t init_seed = 0);

  std::string type_name() const override { return "GPT2LMHeadModel"; }
  const GPT2Config& config() const { return config_; }
  GPT2Model& transformer() { return *transformer_; }
  engine::Generator& dropout_generator() { return dropout_gen_; }

  // Hidden states [B, T, C] after ln_f.
  Tensor hidden_states(const Tensor& ids, const Tensor& attention_mask = Tensor(), KVCache* cache = nullptr);
  // The "lm_head" child applied to hidden states: logits [B, T, V] (or [.., K]
  // once a task head has replaced it).
  Tensor forward(const Tensor& ids, const Tensor& attention_mask, KVCache* cache = nullptr);
  Tensor forward(const Tensor& ids) override { return forward(ids, Tensor()); }

 private:
  GPT2Config config_;
  engine::Generator dropout_gen_;  // one stream for every dropout mask
  std::shared_ptr<GPT2Model> transformer_;
};

}  // namespace models
