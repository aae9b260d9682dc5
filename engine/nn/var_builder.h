// VarBuilder: where a model's tensors come from while it is built, scoped by
// a dotted prefix (candle's VarBuilder). Model code asks for
// vb.get("attn.c_attn.weight", {C, 3C}, init) and gets either the checkpoint's
// tensor (checked by name and shape, converted to the model's dtype/device)
// or a fresh one drawn as `init` says.
#pragma once

#include "engine/io/safetensors.h"
#include "engine/rng.h"
#include "engine/tensor.h"

#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace engine::nn {

// How to initialise a tensor when no checkpoint provides it.
struct Init {
  enum class Kind { Zeros, Ones, Normal, Uniform } kind = Kind::Zeros;
  double a = 0, b = 0;  // Normal: mean, std. Uniform: low, high.
  static Init zeros() { return {Kind::Zeros, 0, 0}; }
  static Init ones() { return {Kind::Ones, 0, 0}; }
  static Init normal(double std, double mean = 0) { return {Kind::Normal, mean, std}; }
  static Init uniform(double low, double high) { return {Kind::Uniform, low, high}; }
};

// The backing store a VarBuilder reads from.
class TensorSource {
 public:
  virtual ~TensorSource() = default;
  virtual Tensor get(const std::string& name, const Shape& shape, const Init& init) = 0;
  virtual bool contains(const std::string& name) const = 0;
};

// Fresh tensors in the order they are requested, from one generator: the
// same seed builds the same model.
class RandomSource : public TensorSource {
 public:
  RandomSource(Generator& gen, DType dtype, Device device) : gen_(gen), dtype_(dtype), device_(device) {}
  Tensor get(const std::string& name, const Shape& shape, const Init& init) override;
  bool contains(const std::string&) const override { return false; }

 private:
  Generator& gen_;
  DType dtype_;
  Device device_;
};

// Tensors from safetensors files (one, or the shards of an index). A key may
// be stored under any of `prefixes` (e.g. "transformer." or nothing):
// `name` is tried with each prefix removed in turn.
class CheckpointSource : public TensorSource {
 public:
  CheckpointSource(std::vector<io::SafetensorsFile> files, DType dtype, Device device,
                   std::vector<std::string> strip_prefixes = {});
  CheckpointSource(const CheckpointSource&) = delete;  // index_ points into files_
  CheckpointSource& operator=(const CheckpointSource&) = delete;
  // model.safetensors, or the shards listed by model.safetensors.index.json.
  static std::shared_ptr<CheckpointSource> from_dir(const std::string& dir, DType dtype, Device device,
                                                    std::vector<std::string> strip_prefixes = {});

  Tensor get(const std::string& name, const Shape& shape, const Init& init) override;
  bool contains(const std::string& name) const override { return find(name) != nullptr; }
  // Checkpoint keys never requested so far (a model/checkpoint mismatch shows here).
  std::vector<std::string> unused_keys() const;
  std::string describe() const;  // the file names, for messages

 private:
  struct Located {
    const io::SafetensorsFile* file;
    std::string key;
  };
  const Located* find(const std::string& name) const;

  std::vector<io::SafetensorsFile> files_;
  std::map<std::string, Located> index_;  // model name -> where it is stored
  std::set<std::string> used_;
  DType dtype_;
  Device device_;
  std::vector<std::string> strip_prefixes_;
};

class VarBuilder {
 public:
  explicit VarBuilder(std::shared_ptr<TensorSource> source, std::string prefix = "")
      : source_(std::move(source)), prefix_(std::move(prefix)) {}

  // A builder one level down: vb.pp("h").pp("3") reads "h.3.<name>".
  VarBuilder pp(const std::string& name) const { return VarBuilder(source_, full_name(name)); }
  Tensor get(const std::string& name, const Shape& shape, const Init& init = Init::zeros()) const {
    return source_->get(full_name(name), shape, init);
  }
  bool contains(const std::string& name) const { return source_->contains(full_name(name)); }
  std::string full_name(const std::string& name) const { return prefix_.empty() ? name : prefix_ + "." + name; }

 private:
  std::shared_ptr<TensorSource> source_;
  std::string prefix_;
};

}  // namespace engine::nn
