// Philox4x32-10, a counter-based random generator (Salmon et al., SC'11): the
// n-th block of four 32-bit words is a pure function of (seed, n), so the CPU
// and CUDA backends draw identical streams, and any element can be recomputed
// (dropout's backward regenerates its mask instead of storing it).
#pragma once

#include <array>
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

ENGINE_HOST_DEVICE inline Philox4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = uint32_t(counter), c1 = uint32_t(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
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
