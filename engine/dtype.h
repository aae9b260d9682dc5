// Element types a tensor can hold, with their sizes and names, plus the
// bf16/f16 <-> f32 conversions used for storage, casts and checkpoint loading.
// Conversions round to nearest even, like PyTorch and CUDA's intrinsics.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace engine {

enum class DType : uint8_t { F32, F64, BF16, F16, I32, I64 };

size_t dtype_size(DType dtype);
std::string_view dtype_name(DType dtype);  // "f32", "bf16", ...
bool is_floating(DType dtype);
// bf16 and f16: kernels read and write them but compute in f32.
inline bool is_storage_only(DType dtype) { return dtype == DType::BF16 || dtype == DType::F16; }

// Raw 16-bit storage types. They are plain data: arithmetic goes through f32.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline float bf16_to_float(bf16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40)};  // keep NaN a NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return bf16{uint16_t(u >> 16)};
}

float f16_to_float(f16 x);
f16 float_to_f16(float f);

// Maps a C++ type to its DType, for typed accessors and kernels.
template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<bf16>() { return DType::BF16; }
template <> constexpr DType dtype_of<f16>() { return DType::F16; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::I64; }

}  // namespace engine
