// Safetensors reading and writing. The file is an 8-byte little-endian header
// length N, N bytes of JSON, then the data section that the JSON indexes.
// The reader trusts nothing in the file: every check below runs before any
// tensor is handed out, and each failure is one line naming the file.
#include "engine/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <unordered_set>

namespace engine::io {

static_assert(std::endian::native == std::endian::little,
              "safetensors stores little-endian data and the reader maps it as-is");

namespace {

using json = nlohmann::json;

// The Rust crate's limit: a bigger header is a corrupt or hostile file.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// ---- dtypes ----

struct DTypeInfo {
  const char* name;
  uint64_t bits;  // sub-byte types (F4, F6_*) exist, so sizes are in bits
  std::optional<DType> engine_dtype;
};

// Every dtype the safetensors spec names; only some map to engine dtypes.
constexpr DTypeInfo kDTypes[] = {
    {"F64", 64, DType::F64},      {"F32", 32, DType::F32},      {"F16", 16, DType::F16},
    {"BF16", 16, DType::BF16},    {"I64", 64, DType::I64},      {"I32", 32, DType::I32},
    {"U64", 64, std::nullopt},    {"U32", 32, std::nullopt},    {"I16", 16, std::nullopt},
    {"U16", 16, std::nullopt},    {"I8", 8, std::nullopt},      {"U8", 8, std::nullopt},
    {"BOOL", 8, std::nullopt},    {"C64", 64, std::nullopt},    {"F8_E4M3", 8, std::nullopt},
    {"F8_E5M2", 8, std::nullopt}, {"F8_E8M0", 8, std::nullopt}, {"F6_E2M3", 6, std::nullopt},
    {"F6_E3M2", 6, std::nullopt}, {"F4", 4, std::nullopt},
};

const DTypeInfo* find_dtype(const std::string& name) {
  for (const DTypeInfo& info : kDTypes)
    if (name == info.name) return &info;
  return nullptr;
}

const char* safetensors_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
  }
  fail("safetensors: unknown engine dtype {}", int(dtype));
}

// ---- one-line error text ----

// Names come from the file and may hold newlines, stray bytes or megabytes;
// errors must stay on one short printable line, so such bytes are shown as
// \xNN and long text is cut.
std::string printable(std::string_view text, bool escape_non_ascii = false, size_t limit = 256) {
  std::string out;
  for (char c : text.substr(0, limit)) {
    auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f || (escape_non_ascii && u >= 0x80))
      out += fmt::format("\\x{:02x}", u);
    else
      out += c;
  }
  return text.size() > limit ? out + "..." : out;
}

std::string printable_path(std::string_view path) { return printable(path, false, 4096); }

// A short rendering of a header value for an error message. It looks only one
// level deep: dump() recurses, and a hostile header can nest a million arrays.
std::string describe(const json& value) {
  constexpr size_t kShown = 8;
  auto scalar = [](const json& item) -> std::string {
    if (item.is_number() || item.is_boolean() || item.is_null()) return item.dump();
    if (item.is_string()) return fmt::format("\"{}\"", printable(item.get_ref<const std::string&>(), false, 32));
    return item.is_array() ? "[...]" : "{...}";
  };
  if (!value.is_array()) return scalar(value);
  std::string out = "[";
  for (size_t i = 0; i < value.size() && i < kShown; ++i) out += (i ? ", " : "") + scalar(value[i]);
  return out + (value.size() > kShown ? ", ...]" : "]");
}

// ---- header validation ----

class HeaderParser {
 public:
  HeaderParser(const std::string& path, size_t data_size) : path_(path), data_size_(data_size) {}

  template <typename... Args>
  [[noreturn]] void fault(fmt::format_string<Args...> format, Args&&... args) const {
    throw Error(printable_path(path_) + ": " + fmt::format(format, std::forward<Args>(args)...));
  }

  json parse_json(const char* begin, const char* end) const {
    // nlohmann keeps the last of duplicate keys silently; a repeated tensor
    // name makes the file ambiguous, so spot it while parsing.
    std::string duplicate;
    std::unordered_set<std::string> seen;
    auto on_event = [&](int depth, json::parse_event_t event, json& parsed) {
      if (event == json::parse_event_t::key && depth == 1 && duplicate.empty()) {
        const std::string& key = parsed.get_ref<const std::string&>();
        if (!seen.insert(key).second) duplicate = key;
      }
      return true;
    };
    json header;
    try {
      header = json::parse(begin, end, on_event);
    } catch (const json::exception& e) {
      std::string_view what = e.what();  // "[json.exception.parse_error.101] parse error at ..."
      if (size_t close = what.find("] "); close != std::string_view::npos) what.remove_prefix(close + 2);
      fault("header is not valid JSON: {}", printable(what, true));
    }
    if (!duplicate.empty()) fault("header names '{}' twice", printable(duplicate));
    if (!header.is_object()) fault("header is a JSON {}, expected an object", header.type_name());
    return header;
  }

  void parse_metadata(const json& value, std::map<std::string, std::string>& metadata) const {
    if (!value.is_object()) fault("__metadata__ is a JSON {}, expected an object of strings", value.type_name());
    for (const auto& [key, item] : value.items()) {
      if (!item.is_string())
        fault("__metadata__ entry '{}' is a JSON {}, expected a string", printable(key), item.type_name());
      metadata[key] = item.get<std::string>();
    }
  }

  SafetensorsEntry parse_entry(const std::string& name, const json& value) const {
    const std::string shown = printable(name);
    if (!value.is_object()) fault("tensor '{}' is a JSON {}, expected an object", shown, value.type_name());
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!value.contains(field)) fault("tensor '{}' has no '{}'", shown, field);

    SafetensorsEntry entry;
    entry.name = name;
    const json& dtype = value["dtype"];
    if (!dtype.is_string()) fault("tensor '{}' dtype {} is not a string", shown, describe(dtype));
    entry.dtype_name = dtype.get<std::string>();
    const DTypeInfo* info = find_dtype(entry.dtype_name);
    if (!info) fault("tensor '{}' has unknown dtype '{}'", shown, printable(entry.dtype_name));
    entry.dtype = info->engine_dtype;

    const json& shape = value["shape"];
    if (!shape.is_array()) fault("tensor '{}' shape {} is not an array", shown, describe(shape));
    for (const json& dim : shape) {
      if (!dim.is_number_integer()) fault("tensor '{}' shape {} has a non-integer dim", shown, describe(shape));
      if (dim.is_number_unsigned() ? dim.get<uint64_t>() > uint64_t(INT64_MAX) : dim.get<int64_t>() < 0)
        fault("tensor '{}' shape {} has a dim outside [0, 2^63)", shown, describe(shape));
      entry.shape.push_back(dim.get<int64_t>());
    }
    // Strides multiply every dim (zeros count as one), so that product must
    // fit in int64 even when a zero dim makes numel small.
    int64_t extent = 1;
    for (int64_t dim : entry.shape)
      if (__builtin_mul_overflow(extent, std::max<int64_t>(dim, 1), &extent))
        fault("tensor '{}' shape {} is too large: its dims multiply past 2^63", shown, describe(shape));
    const uint64_t count = uint64_t(numel(entry.shape));

    const json& offsets = value["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned())
      fault("tensor '{}' data_offsets {} is not a pair of non-negative integers", shown, describe(offsets));
    const uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
    if (begin > end) fault("tensor '{}' data_offsets [{}, {}] begin after they end", shown, begin, end);
    if (end > data_size_)
      fault("tensor '{}' data_offsets [{}, {}] run past the {}-byte data section", shown, begin, end, data_size_);

    uint64_t bits = 0;
    if (__builtin_mul_overflow(count, info->bits, &bits))
      fault("tensor '{}' shape {} of {} is too large: its size overflows 64 bits", shown, shape_str(entry.shape),
            info->name);
    if (bits % 8 != 0)
      fault("tensor '{}' shape {} of {} is not a whole number of bytes", shown, shape_str(entry.shape), info->name);
    if (end - begin != bits / 8)
      fault("tensor '{}' data_offsets [{}, {}] do not match shape {} of {} ({} bytes)", shown, begin, end,
            shape_str(entry.shape), info->name, bits / 8);
    entry.begin = size_t(begin);
    entry.end = size_t(end);
    return entry;
  }

  // The spec asks that the data section be covered exactly, with no holes
  // (so a file cannot hide a second payload); the Rust crate enforces it too.
  void check_layout(const std::map<std::string, SafetensorsEntry>& entries) const {
    std::vector<const SafetensorsEntry*> order;
    for (const auto& [name, entry] : entries) order.push_back(&entry);
    std::sort(order.begin(), order.end(), [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
      return std::tie(a->begin, a->end) < std::tie(b->begin, b->end);
    });
    size_t covered = 0;
    const SafetensorsEntry* last = nullptr;
    for (const SafetensorsEntry* entry : order) {
      if (entry->begin < covered)
        fault("tensors '{}' [{}, {}] and '{}' [{}, {}] overlap", printable(last->name), last->begin, last->end,
              printable(entry->name), entry->begin, entry->end);
      if (entry->begin > covered)
        fault("bytes [{}, {}) of the data section belong to no tensor", covered, entry->begin);
      if (entry->end > covered || !last) last = entry;
      covered = std::max(covered, entry->end);
    }
    if (covered != data_size_) fault("data section has {} bytes but its tensors cover only {}", data_size_, covered);
  }

 private:
  const std::string& path_;
  size_t data_size_;
};

// ---- memory mapping ----

class Mapping {
 public:
  Mapping(void* address, size_t size) : address_(address), size_(size) {}
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { ::munmap(address_, size_); }

 private:
  void* address_;
  size_t size_;
};

// Call right after the failing system call, while errno still describes it.
std::string os_error(const std::string& path, std::string_view action) {
  const int error = errno;
  return fmt::format("{}: cannot {}: {}", printable_path(path), action, std::strerror(error));
}

// Closes the descriptor on every path out, including exceptions.
struct FileDescriptor {
  int fd;
  explicit FileDescriptor(int descriptor) : fd(descriptor) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

// ---- reader ----

SafetensorsFile SafetensorsFile::from_bytes(std::shared_ptr<void> keepalive, const std::byte* data, size_t size,
                                            std::string path) {
  HeaderParser early(path, 0);
  if (size < 8) early.fault("file is {} bytes, too short for the 8-byte header length", size);
  uint64_t header_bytes;
  std::memcpy(&header_bytes, data, 8);
  if (header_bytes > kMaxHeaderBytes)
    early.fault("header length {} exceeds the {}-byte limit", header_bytes, kMaxHeaderBytes);
  if (header_bytes > size - 8)
    early.fault("header length {} runs past the end of the {}-byte file", header_bytes, size);

  SafetensorsFile file;
  const size_t data_size = size - 8 - size_t(header_bytes);
  HeaderParser parser(path, data_size);
  const char* header_begin = reinterpret_cast<const char*>(data + 8);
  json header = parser.parse_json(header_begin, header_begin + header_bytes);
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__")
      parser.parse_metadata(value, file.metadata_);
    else
      file.entries_.emplace(name, parser.parse_entry(name, value));
  }
  parser.check_layout(file.entries_);

  file.path_ = std::move(path);
  file.keepalive_ = std::move(keepalive);
  // from_blob wants a mutable pointer; open() maps copy-on-write memory, and
  // parse() documents that its views alias the caller's buffer.
  file.data_section_ = const_cast<std::byte*>(data) + 8 + header_bytes;
  return file;
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  FileDescriptor file{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (file.fd < 0) throw Error(os_error(path, "open"));
  struct stat info {};
  if (::fstat(file.fd, &info) != 0) throw Error(os_error(path, "stat"));
  if (!S_ISREG(info.st_mode)) fail("{}: not a regular file", printable_path(path));
  const auto size = size_t(info.st_size);
  if (size < 8) fail("{}: file is {} bytes, too short for the 8-byte header length", printable_path(path), size);
  // Private and writable: an in-place update of a loaded weight then copies
  // the page instead of faulting, and never reaches the file on disk.
  void* address = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, file.fd, 0);
  if (address == MAP_FAILED) throw Error(os_error(path, "map"));
  auto mapping = std::make_shared<Mapping>(address, size);
  const auto* bytes = static_cast<const std::byte*>(address);
  return from_bytes(std::move(mapping), bytes, size, path);
}

SafetensorsFile SafetensorsFile::parse(std::shared_ptr<const std::vector<std::byte>> bytes, std::string name) {
  check(bytes != nullptr, "{}: no bytes to parse", printable_path(name));
  const std::byte* data = bytes->data();
  const size_t size = bytes->size();
  return from_bytes(std::const_pointer_cast<std::vector<std::byte>>(std::move(bytes)), data, size, std::move(name));
}

std::vector<std::string> SafetensorsFile::keys() const {
  std::vector<std::string> names;
  names.reserve(entries_.size());
  for (const auto& [name, entry] : entries_) names.push_back(name);
  return names;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& key) const {
  auto found = entries_.find(key);
  if (found == entries_.end())
    fail("{}: no tensor '{}' (the file holds {} tensors)", printable_path(path_), printable(key), entries_.size());
  return found->second;
}

Tensor SafetensorsFile::tensor(const std::string& key) const {
  const SafetensorsEntry& e = entry(key);
  if (!e.dtype)
    fail("{}: tensor '{}' has unsupported dtype {} (the engine loads F32, F64, F16, BF16, I32, I64)",
         printable_path(path_), printable(key), e.dtype_name);
  const DType dtype = *e.dtype;
  std::byte* address = data_section_ + e.begin;
  // Writers need not align tensors; reading a float through a misaligned
  // pointer is undefined, so such tensors are copied instead of viewed.
  if (reinterpret_cast<uintptr_t>(address) % dtype_size(dtype) == 0)
    return Tensor::from_blob(address, e.shape, dtype, keepalive_);
  Tensor copy = Tensor::empty(e.shape, dtype);
  if (e.end > e.begin) std::memcpy(copy.data_ptr(), address, e.end - e.begin);
  return copy;
}

Tensor SafetensorsFile::load(const std::string& key, DType as) const {
  NoGradGuard no_grad;
  Tensor stored = tensor(key);
  // A clone even when no conversion is needed: the result must not pin the mapping.
  return stored.dtype() == as ? stored.clone() : stored.to(as);
}

// ---- writer ----

namespace {

void write_all(int fd, const void* data, size_t size, const std::string& tmp_path) {
  const auto* bytes = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t written = ::write(fd, bytes, size);
    if (written < 0 && errno == EINTR) continue;
    if (written <= 0) throw Error(os_error(tmp_path, "write"));
    bytes += written;
    size -= size_t(written);
  }
}

}  // namespace

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  NoGradGuard no_grad;
  const std::string shown = printable_path(path);

  // Largest elements first, then by name: with the data section starting on
  // an 8-byte boundary, every tensor then starts aligned for its type.
  std::vector<std::pair<std::string, Tensor>> order;
  order.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    check(t.defined(), "{}: tensor '{}' is undefined", shown, printable(name));
    check(name != "__metadata__", "{}: '__metadata__' is reserved and cannot name a tensor", shown);
    order.emplace_back(name, t.to(Device::cpu()).contiguous());
  }
  std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    size_t sa = dtype_size(a.second.dtype()), sb = dtype_size(b.second.dtype());
    return sa != sb ? sa > sb : a.first < b.first;
  });
  std::vector<std::string> names;
  for (const auto& item : order) names.push_back(item.first);
  std::sort(names.begin(), names.end());
  if (auto repeated = std::adjacent_find(names.begin(), names.end()); repeated != names.end())
    fail("{}: tensor name '{}' given twice", shown, printable(*repeated));

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  for (const auto& [name, t] : order) {
    const size_t nbytes = size_t(t.numel()) * dtype_size(t.dtype());
    header[name] = {
        {"dtype", safetensors_name(t.dtype())}, {"shape", t.shape()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    fail("{}: cannot write the header (names and metadata must be UTF-8): {}", shown, printable(e.what(), true));
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps the data section 8-byte aligned
  const uint64_t header_bytes = text.size();

  // Written beside the target and renamed over it, so a crash or a full
  // disk never leaves a half-written checkpoint under the real name.
  const std::string tmp_path = path + ".tmp." + std::to_string(::getpid());
  FileDescriptor file{::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)};
  if (file.fd < 0) throw Error(os_error(tmp_path, "create"));
  try {
    write_all(file.fd, &header_bytes, 8, tmp_path);
    write_all(file.fd, text.data(), text.size(), tmp_path);
    for (const auto& [name, t] : order)
      write_all(file.fd, t.data_ptr(), size_t(t.numel()) * dtype_size(t.dtype()), tmp_path);
    if (::fsync(file.fd) != 0) throw Error(os_error(tmp_path, "fsync"));
    const int fd = file.fd;
    file.fd = -1;
    if (::close(fd) != 0) throw Error(os_error(tmp_path, "close"));
    if (::rename(tmp_path.c_str(), path.c_str()) != 0) throw Error(os_error(path, "rename the temporary file onto it"));
  } catch (...) {
    ::unlink(tmp_path.c_str());
    throw;
  }
  // The rename itself is durable only once its directory is synced; the
  // checkpoint is already complete, so a failure here is not an error.
  std::string directory = std::filesystem::path(path).parent_path().string();
  FileDescriptor dir{::open(directory.empty() ? "." : directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  if (dir.fd >= 0) ::fsync(dir.fd);
}

}  // namespace engine::io
