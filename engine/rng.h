// Philox4x32-10, a counter-based random generator (Salmon et al., SC'11): the
// n-th block of four 32-bit words is a pure function of (seed, n), so the CPU
// and CUDA backends draw identical streams, and any element can be recomputed
// (dropout's backward regenerates its mask instead of storing it).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

namespace engine {

// The pure function: four random words for block `counter` under key `seed`.
// Marked for both host and device compilers so CUDA kernels share it.
#if defined(__CUDACC__)
#define ENGINE_HOST_DEVICE __host__ __device__
#else
#define ENGINE_HOST_DEVICE
#endif

struct Philox4 {
  uint32_t v[4];
};

// The high 32 bits of a 32 x 32-bit product. On the GPU, __umulhi: written as
// a 64-bit product, nvcc kept 64-bit multiplies, several instructions each.
ENGINE_HOST_DEVICE inline uint32_t mul_high(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * b) >> 32);
#endif
}

ENGINE_HOST_DEVICE inline Philox4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = uint32_t(counter), c1 = uint32_t(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t n0 = mul_high(0xCD9E8D57u, c2) ^ c1 ^ k0;
    const uint32_t n2 = mul_high(0xD2511F53u, c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c2;
    c3 = 0xD2511F53u * c0;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// A random word as a uniform in [0, 1): its top 24 bits, exact in f32.
ENGINE_HOST_DEVICE inline float philox_word_to_uniform(uint32_t word) {
  return float(word >> 8) * (1.0f / 16777216.0f);
}

// Element i of a stream starting at block `offset` is word i % 4 of block
// offset + i / 4, mapped to [0, 1). Kernels that walk consecutive elements
// make each block once and take its four words instead.
ENGINE_HOST_DEVICE inline float philox_uniform(uint64_t seed, uint64_t offset, uint64_t i) {
  Philox4 block = philox4x32_10(seed, offset + i / 4);
  return philox_word_to_uniform(block.v[i % 4]);
}

// Word w of a block, by selects: a runtime index into v would put the block
// in (slow) local memory on the GPU.
ENGINE_HOST_DEVICE inline uint32_t word_of(const Philox4& block, unsigned w) {
  return w == 0 ? block.v[0] : w == 1 ? block.v[1] : w == 2 ? block.v[2] : block.v[3];
}

// A stream of 16-bit uniforms, eight per block: element i is half i % 2 (the
// low half first) of word i / 2 % 4 of block offset + i / 8, in [0, 1) in steps
// of 2^-16. Attention's dropout draws one per probability, where the
// generator's work is most of the dropout's cost: this halves it, and keeps
// any keep probability exact to 2^-16.
ENGINE_HOST_DEVICE inline uint32_t philox_half(uint32_t word, unsigned high) {
  return high ? word >> 16 : word & 0xFFFFu;
}
ENGINE_HOST_DEVICE inline float philox_half_to_uniform(uint32_t half) { return float(half) * (1.0f / 65536.0f); }
ENGINE_HOST_DEVICE inline float philox_uniform16(uint64_t seed, uint64_t offset, uint64_t i) {
  const Philox4 block = philox4x32_10(seed, offset + i / 8);
  return philox_half_to_uniform(philox_half(word_of(block, unsigned(i / 2 % 4)), unsigned(i % 2)));
}

// The test `uniform >= p` as an integer test on the uniform's `bits`-bit
// integer u (u / 2^bits >= p exactly when u >= ceil(p * 2^bits), and p * 2^bits
// is exact in double): what kernels compare, with no conversion per element.
inline uint32_t uniform_threshold(double p, int bits) { return uint32_t(std::ceil(std::ldexp(p, bits))); }

// A seed plus a running block offset. Each draw reserves the blocks it uses,
// so consecutive draws never overlap and the state is two integers to save.
class Generator {
 public:
  explicit Generator(uint64_t seed = 0) : seed_(seed) {}
  uint64_t seed() const { return seed_; }
  uint64_t offset() const { return offset_; }
  void set_state(uint64_t seed, uint64_t offset) {
    seed_ = seed;
    offset_ = offset;
  }
  // Reserves enough blocks for `elements` values; returns the first block.
  uint64_t reserve(uint64_t elements) {
    uint64_t first = offset_;
    offset_ += (elements + 3) / 4;
    return first;
  }

 private:
  uint64_t seed_;
  uint64_t offset_ = 0;
};

// The process-wide default generator (the one piece of global RNG state).
Generator& default_generator();
void manual_seed(uint64_t seed);

}  // namespace engine
