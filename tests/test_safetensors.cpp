// Safetensors reader and writer: round trips for every loadable dtype, known
// f16/bf16 bit patterns, one test per malformed-file fault, and a seeded
// mutation test that any input either parses or throws engine::Error.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "engine/io/safetensors.h"
#include "tests/test_data.h"

using namespace engine;
using engine::io::SafetensorsFile;
using engine::io::save_safetensors;
using Bytes = std::vector<std::byte>;

namespace {

namespace fs = std::filesystem;

// A fresh directory per test, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("test_safetensors." + std::to_string(::getpid()) + "." + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

// Length prefix + header text + data, with an optional wrong length prefix.
Bytes make_file(const std::string& header, const std::vector<uint8_t>& data = {}, int64_t length = -1) {
  uint64_t n = length < 0 ? header.size() : uint64_t(length);
  Bytes out(8);
  for (int i = 0; i < 8; ++i) out[size_t(i)] = std::byte(uint8_t(n >> (8 * i)));
  for (char c : header) out.push_back(std::byte(uint8_t(c)));
  for (uint8_t b : data) out.push_back(std::byte(b));
  return out;
}

std::shared_ptr<const Bytes> share(Bytes bytes) { return std::make_shared<const Bytes>(std::move(bytes)); }

Bytes read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Bytes out(chars.size());
  std::memcpy(out.data(), chars.data(), chars.size());
  return out;
}

void write_bytes(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

// The message of the engine::Error that parsing `bytes` throws. Every such
// message must be one line that starts with the file's name.
std::string parse_error(const Bytes& bytes) {
  try {
    SafetensorsFile::parse(share(bytes), "bad.safetensors");
  } catch (const Error& e) {
    std::string message = e.what();
    CHECK(message.rfind("bad.safetensors: ", 0) == 0);
    CHECK(message.find('\n') == std::string::npos);
    return message;
  }
  FAIL("parse accepted a malformed file");
  return "";
}

std::vector<uint8_t> zeros(size_t n) { return std::vector<uint8_t>(n, 0); }

}  // namespace

// ---- round trips ----

TEST_CASE("safetensors round-trips every loadable dtype, scalars, empties and views", "[safetensors]") {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  Tensor f32 = Tensor::from_vector<float>({1.5f, -2.f, 3.25f, 0.f, 7.f, -1e-3f}, {2, 3});
  Tensor f64 = Tensor::from_vector<double>({1e300, -0.5, 3.0}, {3});
  Tensor f16s = Tensor::from_vector<f16>({float_to_f16(1.f), float_to_f16(-0.5f)}, {1, 2});
  Tensor bf16s = Tensor::from_vector<bf16>({float_to_bf16(2.f), float_to_bf16(-4.f), float_to_bf16(8.f)}, {3});
  Tensor i32 = Tensor::from_vector<int32_t>({-7, 2147483647, 0, 5}, {2, 2});
  Tensor i64 = Tensor::from_vector<int64_t>({int64_t(1) << 40, -3}, {2});
  Tensor scalar = Tensor::from_vector<float>({42.f}, {});
  Tensor empty = Tensor::empty({2, 0, 3}, DType::F32);
  Tensor transposed = Tensor::from_vector<float>({0, 1, 2, 3, 4, 5}, {2, 3}).transpose(0, 1);
  REQUIRE_FALSE(transposed.is_contiguous());

  save_safetensors(path,
                   {{"f32", f32},
                    {"f64", f64},
                    {"f16", f16s},
                    {"bf16", bf16s},
                    {"i32", i32},
                    {"i64", i64},
                    {"scalar", scalar},
                    {"empty", empty},
                    {"transposed", transposed}},
                   {{"format", "pt"}, {"note", "round trip"}});
  SafetensorsFile file = SafetensorsFile::open(path);

  CHECK(file.path() == path);
  CHECK(file.metadata() == std::map<std::string, std::string>{{"format", "pt"}, {"note", "round trip"}});
  CHECK(file.keys() ==
        std::vector<std::string>{"bf16", "empty", "f16", "f32", "f64", "i32", "i64", "scalar", "transposed"});
  CHECK(file.contains("f32"));
  CHECK_FALSE(file.contains("nope"));

  auto same = [&](const std::string& key, const Tensor& expected) {
    Tensor got = file.tensor(key);
    CHECK(got.dtype() == expected.dtype());
    CHECK(got.shape() == expected.shape());
    CHECK(got.to_vector<double>() == expected.to_vector<double>());
  };
  same("f32", f32);
  same("f64", f64);
  same("f16", f16s);
  same("bf16", bf16s);
  same("i32", i32);
  same("i64", i64);
  same("scalar", scalar);
  same("empty", empty);
  same("transposed", transposed);
  CHECK(file.tensor("transposed").to_vector<float>() == std::vector<float>{0, 3, 1, 4, 2, 5});
  CHECK(file.entry("f32").dtype_name == "F32");
  CHECK(file.entry("scalar").shape.empty());
  CHECK(file.entry("empty").begin == file.entry("empty").end);

  // Aligned data is viewed, not copied; load() converts and owns its copy.
  CHECK(file.tensor("f32").data_ptr() == file.tensor("f32").data_ptr());
  Tensor widened = file.load("bf16", DType::F32);
  CHECK(widened.dtype() == DType::F32);
  CHECK(widened.to_vector<float>() == std::vector<float>{2.f, -4.f, 8.f});
  CHECK(file.load("f32", DType::F32).data_ptr() != file.tensor("f32").data_ptr());

  // No temporary file is left beside the checkpoint.
  CHECK(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);
}

TEST_CASE("safetensors writer lays out a header the spec's readers expect", "[safetensors]") {
  TempDir dir;
  const std::string path = dir.file("layout.safetensors");
  save_safetensors(path, {{"b16", Tensor::zeros({3}, DType::F16)},
                          {"a32", Tensor::ones({1}, DType::F32)},
                          {"c64", Tensor::ones({1}, DType::F64)}});
  Bytes bytes = read_bytes(path);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  CHECK(n % 8 == 0);
  CHECK(bytes.size() == 8 + n + 8 + 4 + 6);
  std::string header(reinterpret_cast<const char*>(bytes.data()) + 8, n);
  CHECK(header.find("__metadata__") == std::string::npos);  // only written when non-empty
  // Widest elements first, then by name.
  SafetensorsFile file = SafetensorsFile::open(path);
  CHECK(file.entry("c64").begin == 0);
  CHECK(file.entry("a32").begin == 8);
  CHECK(file.entry("b16").begin == 12);
  CHECK(header.back() == ' ');
}

TEST_CASE("safetensors writer overwrites, detaches and rejects bad names", "[safetensors]") {
  TempDir dir;
  const std::string path = dir.file("w.safetensors");
  Tensor weight = Tensor::ones({2}, DType::F32);
  weight.set_requires_grad(true);
  save_safetensors(path, {{"w", Tensor::zeros({4})}});
  save_safetensors(path, {{"w", weight}});
  CHECK(SafetensorsFile::open(path).tensor("w").to_vector<float>() == std::vector<float>{1, 1});

  CHECK_THROWS_WITH(save_safetensors(path, {{"w", weight}, {"v", weight}, {"w", Tensor::zeros({1}, DType::I64)}}),
                    Catch::Contains("tensor name 'w' given twice"));
  CHECK_THROWS_WITH(save_safetensors(path, {{"__metadata__", weight}}), Catch::Contains("reserved"));
  CHECK_THROWS_WITH(save_safetensors(dir.file("missing/dir/x.safetensors"), {{"w", weight}}),
                    Catch::Contains("cannot create"));
  CHECK(SafetensorsFile::open(path).keys() == std::vector<std::string>{"w"});  // failed saves left it alone
}

TEST_CASE("safetensors views outlive the file object and stay private", "[safetensors]") {
  TempDir dir;
  const std::string path = dir.file("v.safetensors");
  save_safetensors(path, {{"x", Tensor::from_vector<float>({1, 2, 3}, {3})}});
  Tensor view;
  {
    SafetensorsFile file = SafetensorsFile::open(path);
    view = file.tensor("x");
  }
  CHECK(view.to_vector<float>() == std::vector<float>{1, 2, 3});
  view.fill_(9.0);  // copy-on-write mapping: allowed, and never reaches the disk
  CHECK(view.to_vector<float>() == std::vector<float>{9, 9, 9});
  CHECK(SafetensorsFile::open(path).tensor("x").to_vector<float>() == std::vector<float>{1, 2, 3});
}

// ---- dtype conversion against hand-written IEEE bit patterns ----

TEST_CASE("safetensors converts F16 and BF16 to F32 exactly", "[safetensors]") {
  // binary16: 1.0 = 0 01111 0000000000; -2.5 = 1 10000 0100000000; 65504 is the
  // largest finite; 0x0001 the smallest subnormal (2^-24); 0x03ff the largest.
  const std::vector<uint16_t> half = {0x3c00, 0xc100, 0x7bff, 0x0001, 0x03ff, 0x8000};
  const std::vector<float> half_values = {1.0f, -2.5f, 65504.0f, 0x1p-24f, 1023 * 0x1p-24f, -0.0f};
  // bfloat16 is the top half of binary32: 1.0 = 0x3f80, -2.5 = 0xc020, 0x7f7f
  // the largest finite ((2 - 2^-7) * 2^127), 0x0001 the smallest subnormal (2^-133).
  const std::vector<uint16_t> brain = {0x3f80, 0xc020, 0x7f7f, 0x0001, 0x4049, 0x8000};
  const std::vector<float> brain_values = {1.0f, -2.5f, 255 * 0x1p120f, 0x1p-133f, 3.140625f, -0.0f};

  std::vector<uint8_t> data;
  for (const auto* bits : {&half, &brain})
    for (uint16_t b : *bits) {
      data.push_back(uint8_t(b & 0xff));
      data.push_back(uint8_t(b >> 8));
    }
  Bytes bytes = make_file(R"({"h":{"dtype":"F16","shape":[6],"data_offsets":[0,12]},)"
                          R"("b":{"dtype":"BF16","shape":[2,3],"data_offsets":[12,24]}})",
                          data);
  SafetensorsFile file = SafetensorsFile::parse(share(bytes), "conv.safetensors");

  std::vector<float> got_half = file.load("h", DType::F32).to_vector<float>();
  std::vector<float> got_brain = file.load("b", DType::F32).to_vector<float>();
  for (size_t i = 0; i < half_values.size(); ++i) {
    CHECK(std::memcmp(&got_half[i], &half_values[i], 4) == 0);  // bitwise: keeps the sign of -0
    CHECK(std::memcmp(&got_brain[i], &brain_values[i], 4) == 0);
  }
  CHECK(file.load("h", DType::F64).to_vector<double>()[2] == 65504.0);
}

TEST_CASE("safetensors copies tensors whose bytes are misaligned", "[safetensors]") {
  // A 9-byte header (valid, though our writer pads to 8) puts the F32 data at
  // byte 17 of an aligned buffer.
  std::vector<uint8_t> data(8);
  float values[2] = {1.25f, -3.0f};
  std::memcpy(data.data(), values, 8);
  Bytes misaligned = make_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", data);
  const std::string header = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  REQUIRE((8 + header.size()) % 4 != 0);
  auto shared = share(misaligned);
  REQUIRE(reinterpret_cast<uintptr_t>(shared->data()) % 8 == 0);
  SafetensorsFile file = SafetensorsFile::parse(shared, "m.safetensors");
  Tensor x = file.tensor("x");
  CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0);
  CHECK(x.to_vector<float>() == std::vector<float>{1.25f, -3.0f});

  // Padded to 8, the same data is viewed in place.
  std::string padded = header + std::string((8 - header.size() % 8) % 8, ' ');
  auto aligned = share(make_file(padded, data));
  Tensor y = SafetensorsFile::parse(aligned, "a.safetensors").tensor("x");
  CHECK(static_cast<const std::byte*>(y.data_ptr()) == aligned->data() + 8 + padded.size());
}

// ---- malformed files ----

TEST_CASE("safetensors rejects truncated files and bad header lengths", "[safetensors]") {
  CHECK_THAT(parse_error(Bytes(3)), Catch::Contains("file is 3 bytes, too short for the 8-byte header length"));
  CHECK_THAT(parse_error(make_file("{}", {}, 100)), Catch::Contains("header length 100 runs past the end of the 10"));
  CHECK_THAT(parse_error(make_file("{}", {}, int64_t(1) << 40)),
             Catch::Contains("header length 1099511627776 exceeds the 100000000-byte limit"));
  // Data cut short: the header promises 16 bytes, the file holds 8.
  CHECK_THAT(parse_error(make_file(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", zeros(8))),
             Catch::Contains("tensor 'w' data_offsets [0, 16] run past the 8-byte data section"));
}

TEST_CASE("safetensors rejects headers that are not a JSON object", "[safetensors]") {
  CHECK_THAT(parse_error(make_file("{not json")), Catch::Contains("header is not valid JSON"));
  CHECK_THAT(parse_error(make_file("[1, 2]")), Catch::Contains("header is a JSON array, expected an object"));
  CHECK_THAT(parse_error(make_file("")), Catch::Contains("header is not valid JSON"));
  // Invalid UTF-8 in a string: rejected, and the message stays printable.
  std::string message = parse_error(make_file("{\"\xff\xfe\":1}"));
  CHECK_THAT(message, Catch::Contains("header is not valid JSON"));
  for (char c : message) CHECK(static_cast<unsigned char>(c) < 0x80);
  CHECK_THAT(parse_error(make_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
                                   R"("a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}})")),
             Catch::Contains("header names 'a' twice"));
}

TEST_CASE("safetensors rejects malformed tensor entries", "[safetensors]") {
  auto entry = [](const std::string& body, size_t data = 8) {
    return parse_error(make_file(R"({"t":)" + body + "}", zeros(data)));
  };
  CHECK_THAT(entry("5"), Catch::Contains("tensor 't' is a JSON number, expected an object"));
  CHECK_THAT(entry(R"({"shape":[2],"data_offsets":[0,8]})"), Catch::Contains("tensor 't' has no 'dtype'"));
  CHECK_THAT(entry(R"({"dtype":"F32","data_offsets":[0,8]})"), Catch::Contains("tensor 't' has no 'shape'"));
  CHECK_THAT(entry(R"({"dtype":"F32","shape":[2]})"), Catch::Contains("tensor 't' has no 'data_offsets'"));
  CHECK_THAT(entry(R"({"dtype":32,"shape":[2],"data_offsets":[0,8]})"), Catch::Contains("dtype 32 is not a string"));
  CHECK_THAT(entry(R"({"dtype":"F33","shape":[2],"data_offsets":[0,8]})"),
             Catch::Contains("tensor 't' has unknown dtype 'F33'"));
  CHECK_THAT(entry(R"({"dtype":"F32","shape":[-2],"data_offsets":[0,8]})"),
             Catch::Contains("shape [-2] has a dim outside [0, 2^63)"));
  CHECK_THAT(entry(R"({"dtype":"F32","shape":[1.5],"data_offsets":[0,8]})"),
             Catch::Contains("shape [1.5] has a non-integer dim"));
  CHECK_THAT(entry(R"({"dtype":"F32","shape":["2"],"data_offsets":[0,8]})"), Catch::Contains("non-integer dim"));
  CHECK_THAT(entry(R"({"dtype":"F32","shape":2,"data_offsets":[0,8]})"), Catch::Contains("is not an array"));
  CHECK_THAT(entry(R"({"dtype":"F32","shape":[2],"data_offsets":[0]})"),
             Catch::Contains("data_offsets [0] is not a pair of non-negative integers"));
  CHECK_THAT(entry(R"({"dtype":"F32","shape":[2],"data_offsets":[-1,7]})"),
             Catch::Contains("not a pair of non-negative integers"));
  CHECK_THAT(entry(R"({"dtype":"F32","shape":[2],"data_offsets":[0,1000]})"),
             Catch::Contains("data_offsets [0, 1000] run past the 8-byte data section"));
  CHECK_THAT(entry(R"({"dtype":"F32","shape":[2],"data_offsets":[8,4]})"),
             Catch::Contains("data_offsets [8, 4] begin after they end"));
  CHECK_THAT(entry(R"({"dtype":"F16","shape":[320,960],"data_offsets":[0,100]})", 100),
             Catch::Contains("tensor 't' data_offsets [0, 100] do not match shape [320, 960] of F16 (614400 bytes)"));
  CHECK_THAT(entry(R"({"dtype":"F4","shape":[3],"data_offsets":[0,2]})", 2),
             Catch::Contains("is not a whole number of bytes"));
}

TEST_CASE("safetensors keeps errors short for deep or long header values", "[safetensors]") {
  // 100k nested arrays (deeper than a recursive walk survives) must neither
  // overflow the stack nor flood the message.
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  std::string message = parse_error(make_file(R"({"t":{"dtype":"F32","shape":)" + deep + R"(,"data_offsets":[0,0]}})"));
  CHECK_THAT(message, Catch::Contains("shape [[...]] has a non-integer dim"));
  CHECK_THAT(parse_error(make_file(deep)), Catch::Contains("header is a JSON array"));
  const std::string long_name(100000, 'x');
  message = parse_error(make_file(R"({")" + long_name + R"(":{"dtype":"F33","shape":[],"data_offsets":[0,0]}})"));
  CHECK_THAT(message, Catch::Contains("xxx...' has unknown dtype 'F33'"));
  CHECK(message.size() < 400);
}

TEST_CASE("safetensors rejects shapes whose size overflows", "[safetensors]") {
  auto entry = [](const std::string& shape) {
    return parse_error(make_file(R"({"t":{"dtype":"F64","shape":)" + shape + R"(,"data_offsets":[0,8]}})", zeros(8)));
  };
  CHECK_THAT(entry("[4294967296, 4294967296]"), Catch::Contains("its dims multiply past 2^63"));
  // numel is 0, but strides would still overflow.
  CHECK_THAT(entry("[0, 4294967296, 4294967296]"), Catch::Contains("its dims multiply past 2^63"));
  // numel fits in int64, its byte size does not.
  CHECK_THAT(entry("[4611686018427387904]"), Catch::Contains("its size overflows 64 bits"));
  CHECK_THAT(entry("[18446744073709551615]"), Catch::Contains("has a dim outside [0, 2^63)"));
  CHECK_THAT(entry("[1e30]"), Catch::Contains("non-integer dim"));
}

TEST_CASE("safetensors rejects overlapping ranges, holes and stray bytes", "[safetensors]") {
  const std::string a = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  CHECK_THAT(parse_error(make_file("{" + a + R"(,"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", zeros(12))),
             Catch::Contains("tensors 'a' [0, 8] and 'b' [4, 12] overlap"));
  CHECK_THAT(parse_error(make_file("{" + a + R"(,"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})", zeros(16))),
             Catch::Contains("bytes [8, 12) of the data section belong to no tensor"));
  CHECK_THAT(parse_error(make_file("{" + a + "}", zeros(10))),
             Catch::Contains("data section has 10 bytes but its tensors cover only 8"));
  // Empty tensors take no bytes and may sit anywhere in range.
  auto ok = make_file("{" + a + R"(,"e":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}})", zeros(8));
  CHECK(SafetensorsFile::parse(share(ok), "ok").keys().size() == 2);
}

TEST_CASE("safetensors metadata must map strings to strings", "[safetensors]") {
  CHECK_THAT(parse_error(make_file(R"({"__metadata__":{"format":1}})")),
             Catch::Contains("__metadata__ entry 'format' is a JSON number, expected a string"));
  CHECK_THAT(parse_error(make_file(R"({"__metadata__":"pt"})")), Catch::Contains("__metadata__ is a JSON string"));
  auto ok = share(make_file(R"({"__metadata__":{"format":"pt"}})"));
  CHECK(SafetensorsFile::parse(ok, "ok").metadata().at("format") == "pt");
}

TEST_CASE("safetensors names the file and key for lookups and unsupported dtypes", "[safetensors]") {
  auto bytes = share(make_file(R"({"mask":{"dtype":"U8","shape":[2,2],"data_offsets":[0,4]},)"
                               R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                               {1, 0, 0, 1, 0, 0, 128, 63}));
  SafetensorsFile file = SafetensorsFile::parse(bytes, "model.safetensors");
  CHECK(file.entry("mask").dtype_name == "U8");
  CHECK_FALSE(file.entry("mask").dtype.has_value());
  CHECK_THROWS_WITH(file.tensor("mask"), Catch::Contains("model.safetensors: tensor 'mask' has unsupported dtype U8"));
  CHECK_THROWS_WITH(file.entry("nope"), Catch::Contains("model.safetensors: no tensor 'nope'"));
  CHECK_THROWS_WITH(file.load("nope", DType::F32), Catch::Contains("no tensor 'nope'"));
  CHECK(file.tensor("w").to_vector<float>() == std::vector<float>{1.0f});

  // A name with a newline is escaped so the error stays on one line.
  std::string message = parse_error(make_file("{\"a\\nb\":{\"dtype\":\"F33\",\"shape\":[],\"data_offsets\":[0,0]}}"));
  CHECK_THAT(message, Catch::Contains("tensor 'a\\x0ab' has unknown dtype 'F33'"));
}

TEST_CASE("safetensors open reports file system faults with the path", "[safetensors]") {
  TempDir dir;
  CHECK_THROWS_WITH(SafetensorsFile::open(dir.file("absent.safetensors")),
                    Catch::Contains(dir.file("absent.safetensors") + ": cannot open: "));
  CHECK_THROWS_WITH(SafetensorsFile::open(dir.path.string()), Catch::Contains(": not a regular file"));
  write_bytes(dir.file("short.safetensors"), Bytes(5));
  CHECK_THROWS_WITH(SafetensorsFile::open(dir.file("short.safetensors")), Catch::Contains("file is 5 bytes"));
  write_bytes(dir.file("empty.safetensors"), {});
  CHECK_THROWS_WITH(SafetensorsFile::open(dir.file("empty.safetensors")), Catch::Contains("file is 0 bytes"));
}

// ---- a real Hugging Face checkpoint, when ../shared/data is present ----

TEST_CASE("safetensors reads a checkpoint written by Hugging Face", "[safetensors]") {
  const std::string path = test_data_dir() + "/gpt2-mini-wiki/model.safetensors";
  if (!fs::exists(path)) {
    WARN("skipped: " << path << " not found");
    return;
  }
  SafetensorsFile file = SafetensorsFile::open(path);
  CHECK(file.keys().size() == 100);
  CHECK(file.metadata().at("format") == "pt");
  const auto& e = file.entry("transformer.h.0.attn.c_attn.weight");
  CHECK(e.dtype == DType::F16);
  CHECK(e.shape == Shape{320, 960});
  CHECK((e.begin == 1920 && e.end == 616320));
  // First values, decoded independently with Python's struct '<e'.
  std::vector<float> w = file.load("transformer.h.0.attn.c_attn.weight", DType::F32).to_vector<float>();
  CHECK(w[0] == 0.05767822265625f);
  CHECK(w[1] == 0.037353515625f);
  CHECK(w[3] == -0.0129547119140625f);
  std::vector<float> ln = file.load("transformer.ln_f.weight", DType::F32).to_vector<float>();
  CHECK(ln[0] == 2.115234375f);
  CHECK(ln[3] == 1.87890625f);
  CHECK(file.tensor("transformer.wte.weight").shape() == Shape{50257, 320});
}

// ---- mutations: any input either parses fully or throws engine::Error ----

TEST_CASE("safetensors survives seeded random mutations", "[safetensors]") {
  TempDir dir;
  const std::string path = dir.file("seed.safetensors");
  save_safetensors(path,
                   {{"w", Tensor::from_vector<float>({1, 2, 3, 4, 5, 6}, {2, 3})},
                    {"h", Tensor::from_vector<f16>({float_to_f16(1.f), float_to_f16(2.f), float_to_f16(3.f)}, {3})},
                    {"b", Tensor::from_vector<bf16>({float_to_bf16(-1.f), float_to_bf16(0.5f)}, {2})},
                    {"ids", Tensor::from_vector<int64_t>({7, 8}, {2})},
                    {"n", Tensor::from_vector<int32_t>({3}, {})},
                    {"d", Tensor::empty({0, 2}, DType::F64)}},
                   {{"format", "pt"}});
  const Bytes original = read_bytes(path);
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, original.data(), 8);
  const size_t header_end = 8 + size_t(header_bytes);

  std::mt19937_64 rng(20240817);  // raw engine output is the same on every platform
  auto below = [&](size_t n) { return n ? size_t(rng() % n) : 0; };
  const std::string json_chars = "0123456789[]{},:\"-.eE ";
  int parsed = 0, rejected = 0, unexpected = 0;
  std::string first_unexpected;

  for (int round = 0; round < 4000; ++round) {
    Bytes bytes = original;
    switch (round % 6) {
      case 0:  // random bytes anywhere
        for (size_t k = 1 + below(4); k-- > 0;) bytes[below(bytes.size())] = std::byte(uint8_t(rng()));
        break;
      case 1:  // JSON-ish characters inside the header
        for (size_t k = 1 + below(2); k-- > 0;)
          bytes[8 + below(header_bytes)] = std::byte(uint8_t(json_chars[below(json_chars.size())]));
        break;
      case 2: {  // one digit of the header changed: mostly still JSON, often inconsistent
        std::vector<size_t> digits;
        for (size_t i = 8; i < header_end; ++i)
          if (std::isdigit(static_cast<unsigned char>(bytes[i]))) digits.push_back(i);
        bytes[digits[below(digits.size())]] = std::byte(uint8_t('0' + below(10)));
        break;
      }
      case 3:  // truncation
        bytes.resize(below(bytes.size()));
        break;
      case 4: {  // header length edits, near the true value or anywhere
        uint64_t n = (rng() & 1) ? header_bytes + below(33) - 16 : rng() >> below(64);
        std::memcpy(bytes.data(), &n, 8);
        break;
      }
      case 5:  // bytes appended
        for (size_t k = 1 + below(16); k-- > 0;) bytes.push_back(std::byte(uint8_t(rng())));
        break;
    }
    try {
      SafetensorsFile file = SafetensorsFile::parse(share(std::move(bytes)), "mutant");
      for (const std::string& key : file.keys()) {
        if (!file.entry(key).dtype) continue;  // unsupported dtypes only fail on request
        std::vector<double> values = file.tensor(key).to_vector<double>();
        (void)file.load(key, DType::F32);
        (void)values;
      }
      ++parsed;
    } catch (const Error& e) {
      ++rejected;
      if (std::string(e.what()).find('\n') != std::string::npos) ++unexpected;
    } catch (const std::exception& e) {
      if (unexpected++ == 0) first_unexpected = e.what();
    }
  }
  INFO("first non-engine exception: " << first_unexpected);
  CHECK(unexpected == 0);
  CHECK(parsed > 100);  // data-byte flips leave the file valid
  CHECK(rejected > 1000);
}
