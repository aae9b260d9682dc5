#include "engine/nn/var_builder.h"

#include "engine/error.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

namespace engine::nn {

Tensor RandomSource::get(const std::string&, const Shape& shape, const Init& init) {
  switch (init.kind) {
    case Init::Kind::Zeros: return Tensor::zeros(shape, dtype_, device_);
    case Init::Kind::Ones: return Tensor::ones(shape, dtype_, device_);
    case Init::Kind::Normal: return Tensor::randn(shape, gen_, init.a, init.b, dtype_, device_);
    case Init::Kind::Uniform: return Tensor::rand(shape, gen_, init.a, init.b, dtype_, device_);
  }
  return Tensor();
}

CheckpointSource::CheckpointSource(std::vector<io::SafetensorsFile> files, DType dtype, Device device,
                                   std::vector<std::string> strip_prefixes)
    : files_(std::move(files)), dtype_(dtype), device_(device), strip_prefixes_(std::move(strip_prefixes)) {
  for (const io::SafetensorsFile& file : files_)
    for (const std::string& key : file.keys()) {
      check(!index_.count(key), "{}: tensor '{}' appears in more than one shard", describe(), key);
      index_[key] = Located{&file, key};
    }
}

std::shared_ptr<CheckpointSource> CheckpointSource::from_dir(const std::string& dir, DType dtype, Device device,
                                                             std::vector<std::string> strip_prefixes) {
  namespace fs = std::filesystem;
  std::vector<io::SafetensorsFile> files;
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(single)) {
    files.push_back(io::SafetensorsFile::open(single.string()));
  } else if (fs::exists(index)) {
    std::ifstream in(index);
    nlohmann::json json = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    check(json.is_object() && json.contains("weight_map") && json["weight_map"].is_object(),
          "{}: expected a JSON object with a 'weight_map' object", index.string());
    std::set<std::string> shards;
    for (const auto& [key, shard] : json["weight_map"].items()) {
      check(shard.is_string(), "{}: weight_map['{}'] is not a file name", index.string(), key);
      std::string name = shard.get<std::string>();
      check(name.find('/') == std::string::npos && name != "..", "{}: shard name '{}' leaves the folder",
            index.string(), name);
      shards.insert(name);
    }
    for (const std::string& shard : shards) files.push_back(io::SafetensorsFile::open((fs::path(dir) / shard).string()));
  } else {
    fail("{}: no model.safetensors or model.safetensors.index.json", dir);
  }
  return std::make_shared<CheckpointSource>(std::move(files), dtype, device, std::move(strip_prefixes));
}

const CheckpointSource::Located* CheckpointSource::find(const std::string& name) const {
  if (auto it = index_.find(name); it != index_.end()) return &it->second;
  for (const std::string& prefix : strip_prefixes_)
    if (name.rfind(prefix, 0) == 0)
      if (auto it = index_.find(name.substr(prefix.size())); it != index_.end()) return &it->second;
  return nullptr;
}

Tensor CheckpointSource::get(const std::string& name, const Shape& shape, const Init&) {
  const Located* at = find(name);
  check(at != nullptr, "{}: tensor '{}' of shape {} is missing", describe(), name, shape_str(shape));
  const io::SafetensorsEntry& entry = at->file->entry(at->key);
  check(entry.shape == shape, "{}: tensor '{}' has shape {}, the model expects {}", at->file->path(), at->key,
        shape_str(entry.shape), shape_str(shape));
  used_.insert(at->key);
  return at->file->load(at->key, dtype_).to(device_);
}

std::vector<std::string> CheckpointSource::unused_keys() const {
  std::vector<std::string> unused;
  for (const auto& [key, located] : index_)
    if (!used_.count(key)) unused.push_back(key);
  return unused;
}

std::string CheckpointSource::describe() const {
  std::string names;
  for (const io::SafetensorsFile& file : files_) names += (names.empty() ? "" : ", ") + file.path();
  return names.empty() ? "checkpoint" : names;
}

}  // namespace engine::nn
