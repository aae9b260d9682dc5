// Safetensors checkpoints (https://github.com/huggingface/safetensors): a
// reader that maps a file and validates its whole header before exposing any
// tensor, and an atomic writer. Assumes a little-endian host, as the format does.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engine/dtype.h"
#include "engine/shape.h"
#include "engine/tensor.h"

namespace engine::io {

// One tensor as the header describes it. `dtype` is empty for valid
// safetensors dtypes the engine cannot hold (U8, BOOL, F8_E4M3, ...): such
// files still open, and only asking for that tensor's data is an error.
struct SafetensorsEntry {
  std::string name;
  std::string dtype_name;  // as written in the file: "F16", "U8", ...
  std::optional<DType> dtype;
  Shape shape;
  size_t begin = 0, end = 0;  // byte range within the data section
};

// Requires: a file in the safetensors format. Ensures: every entry's dtype,
// shape and byte range agree, ranges lie in the data section, do not overlap
// and leave no holes (as the spec and the Rust crate require); otherwise
// engine::Error with one line naming the file and the fault.
class SafetensorsFile {
 public:
  // Maps the file privately (copy-on-write): views stay valid after the
  // SafetensorsFile is gone, and writing into one never reaches the file.
  static SafetensorsFile open(const std::string& path);
  // Same validation on bytes in memory; `name` stands for the path in errors.
  static SafetensorsFile parse(std::shared_ptr<const std::vector<std::byte>> bytes, std::string name);

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::vector<std::string> keys() const;  // sorted by name
  bool contains(const std::string& key) const { return entries_.count(key) != 0; }
  const SafetensorsEntry& entry(const std::string& key) const;

  // A CPU tensor in the stored dtype that shares the mapped bytes (copied only
  // when they are misaligned for the element type). Views of open()'d files
  // are writable; views of parse()'d bytes alias the caller's buffer.
  Tensor tensor(const std::string& key) const;
  // A copy that owns its memory, converted to `as` (e.g. F16 -> F32).
  Tensor load(const std::string& key, DType as) const;

 private:
  SafetensorsFile() = default;
  static SafetensorsFile from_bytes(std::shared_ptr<void> keepalive, const std::byte* data, size_t size,
                                    std::string path);

  std::string path_;
  std::shared_ptr<void> keepalive_;  // owns the mapping or the byte buffer
  std::byte* data_section_ = nullptr;
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Writes `tensors` (any dtype, device or layout) to `path` atomically: a
// temporary file beside it is written, fsynced and renamed over `path`.
// Data is laid out by element size (largest first), then name, so every
// tensor starts aligned for its type. Names must be unique.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace engine::io
