// CPU backend: memory, copies and casts between dtypes, fills, random draws,
// and the thread count shared with OpenBLAS.
#include "engine/cpu/cpu_backend.h"

#include "engine/cpu/strided.h"
#include "engine/rng.h"

#include <cblas.h>
#include <omp.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>
#include <new>
#include <type_traits>

namespace engine {

CpuBackend& cpu_backend() {
  static CpuBackend backend;
  return backend;
}

void set_num_threads(int threads) {
  check(threads >= 1, "set_num_threads: need at least one thread, got {}", threads);
  omp_set_num_threads(threads);
  openblas_set_num_threads(threads);
}

int num_threads() { return omp_get_max_threads(); }

// ---- memory ----

namespace {

// Large blocks are cached by size instead of being returned to the system.
// glibc serves them with fresh mmaps, and first touch of a fresh mapping
// faults once per page: measured at 25-45x the cost of a layer_norm kernel
// on its own output. Training repeats the same shapes, so reuse is high.
class HostPool {
 public:
  static constexpr size_t kMinCached = size_t(1) << 16;     // smaller blocks: malloc is fast enough
  static constexpr size_t kMaxCachedBytes = size_t(4) << 30;  // beyond this, blocks go back to the system

  // Rounds up to 64 KiB, and above 1 MiB to a quarter of a power of two, so
  // that slightly different sizes (dynamic padding) share blocks.
  static size_t bucket(size_t nbytes) {
    size_t size = (nbytes + kMinCached - 1) / kMinCached * kMinCached;
    if (size <= (size_t(1) << 20)) return size;
    size_t quarter = (size_t(1) << (63 - __builtin_clzll(size))) / 4;
    return (size + quarter - 1) / quarter * quarter;
  }

  void* get(size_t nbytes) {
    if (nbytes >= kMinCached) {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bucket(nbytes));
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_bytes_ -= it->first;
        return p;
      }
    }
    size_t size = nbytes >= kMinCached ? bucket(nbytes) : (nbytes + 63) / 64 * 64;
    // 64-byte alignment: whole cache lines, and aligned AVX-512 loads.
    void* p = std::aligned_alloc(64, std::max<size_t>(size, 64));
    if (!p) fail("out of host memory allocating {} bytes", nbytes);
    return p;
  }

  void put(void* p, [[maybe_unused]] size_t nbytes) {  // unused under ASan
#if !defined(__SANITIZE_ADDRESS__)  // under ASan, freeing is what finds use-after-free
    if (nbytes >= kMinCached) {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t size = bucket(nbytes);
      if (cached_bytes_ + size <= kMaxCachedBytes) {
        free_[size].push_back(p);
        cached_bytes_ += size;
        return;
      }
    }
#endif
    std::free(p);
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_bytes_ = 0;
};

HostPool& host_pool() {
  static HostPool* pool = new HostPool;  // never destroyed: tensors may outlive static destruction
  return *pool;
}

}  // namespace

void* CpuBackend::allocate(size_t nbytes) { return host_pool().get(nbytes); }
void CpuBackend::deallocate(void* ptr, size_t nbytes) { host_pool().put(ptr, nbytes); }
void CpuBackend::copy_from_host(void* dst, const void* src, size_t nbytes) { std::memcpy(dst, src, nbytes); }
void CpuBackend::copy_to_host(void* dst, const void* src, size_t nbytes) { std::memcpy(dst, src, nbytes); }

// ---- copies and casts ----

namespace {

template <typename T> double to_double(T x) { return double(x); }
template <> double to_double(bf16 x) { return bf16_to_float(x); }
template <> double to_double(f16 x) { return f16_to_float(x); }
template <typename T> T from_double(double x) { return T(x); }
template <> bf16 from_double(double x) { return float_to_bf16(float(x)); }
template <> f16 from_double(double x) { return float_to_f16(float(x)); }

template <typename To, typename From>
To convert(From x) {
  if constexpr (std::is_same_v<To, From>) return x;
  else if constexpr (std::is_same_v<From, float> && std::is_same_v<To, bf16>) return float_to_bf16(x);
  else if constexpr (std::is_same_v<From, bf16> && std::is_same_v<To, float>) return bf16_to_float(x);
  else if constexpr (std::is_same_v<From, f16> && std::is_same_v<To, float>) return f16_to_float(x);
  else if constexpr (std::is_same_v<From, float> && std::is_same_v<To, f16>) return float_to_f16(x);
  else return from_double<To>(to_double(x));
}

template <typename Fn>
void dispatch_any(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::F32: fn(float{}); return;
    case DType::F64: fn(double{}); return;
    case DType::BF16: fn(bf16{}); return;
    case DType::F16: fn(f16{}); return;
    case DType::I32: fn(int32_t{}); return;
    case DType::I64: fn(int64_t{}); return;
  }
}

}  // namespace

void CpuBackend::copy(const View& dst, const View& src) {
  dispatch_any(dst.dtype, [&](auto d) {
    using D = decltype(d);
    dispatch_any(src.dtype, [&](auto s) {
      using S = decltype(s);
      D* out = dst.ptr<D>();
      const S* in = src.ptr<S>();
      cpu::for_each_run<2>(dst.shape, {&dst.strides, &src.strides}, [&](auto off, int64_t n, auto st) {
        D* o = out + off[0];
        const S* x = in + off[1];
        for (int64_t i = 0; i < n; ++i) o[i * st[0]] = convert<D>(x[i * st[1]]);
      });
    });
  });
}

void CpuBackend::fill(const View& dst, double value) {
  dispatch_any(dst.dtype, [&](auto d) {
    using D = decltype(d);
    const D v = from_double<D>(value);
    D* out = dst.ptr<D>();
    cpu::for_each_run<1>(dst.shape, {&dst.strides}, [&](auto off, int64_t n, auto st) {
      for (int64_t i = 0; i < n; ++i) out[off[0] + i * st[0]] = v;
    });
  });
}

// ---- random draws (the element -> Philox word mapping is shared with CUDA) ----

void CpuBackend::fill_uniform(const View& dst, uint64_t seed, uint64_t offset, double low, double high) {
  check(dst.is_contiguous(), "fill_uniform needs a contiguous tensor");
  dispatch_any(dst.dtype, [&](auto d) {
    using D = decltype(d);
    D* out = dst.ptr<D>();
    cpu::parallel_for(dst.numel(), 16, [&](int64_t i) {
      out[i] = from_double<D>(low + (high - low) * double(philox_uniform(seed, offset, uint64_t(i))));
    });
  });
}

void CpuBackend::fill_normal(const View& dst, uint64_t seed, uint64_t offset, double mean, double std) {
  check(dst.is_contiguous(), "fill_normal needs a contiguous tensor");
  // Box-Muller on the pair of uniforms (2j, 2j+1) gives elements 2j and 2j+1.
  dispatch_any(dst.dtype, [&](auto d) {
    using D = decltype(d);
    D* out = dst.ptr<D>();
    const int64_t n = dst.numel();
    cpu::parallel_for((n + 1) / 2, 32, [&](int64_t pair) {
      uint64_t i = uint64_t(2 * pair);
      double u1 = 1.0 - double(philox_uniform(seed, offset, i));  // in (0, 1], so log is finite
      double u2 = double(philox_uniform(seed, offset, i + 1));
      double radius = std::sqrt(-2.0 * std::log(u1));
      out[2 * pair] = from_double<D>(mean + std * radius * std::cos(2 * M_PI * u2));
      if (2 * pair + 1 < n) out[2 * pair + 1] = from_double<D>(mean + std * radius * std::sin(2 * M_PI * u2));
    });
  });
}

}  // namespace engine
