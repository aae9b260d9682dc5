// CPU kernels of the fused neural-network ops: row gather and scatter-add
// (embedding, index_select), layer norm, gelu_new, softmax, cross-entropy and
// dropout. Each works on contiguous [rows, cols] data, one row per task.
#include "engine/cpu/cpu_backend.h"

#include "engine/cpu/parallel.h"
#include "engine/rng.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace engine {

namespace {

// A contiguous view read as [rows, cols] over its last dim.
struct RowShape {
  int64_t rows, cols;
};

RowShape rows_of(const View& v) {
  const int64_t cols = v.shape.empty() ? 1 : v.shape.back();
  return {cols == 0 ? 0 : v.numel() / cols, cols};
}

// Calls body(begin, end) over [0, n) in chunks, in parallel when n is large.
// Chunks are a multiple of 4 so that dropout draws each Philox block once.
template <typename Body>
void for_chunks(int64_t n, Body&& body) {
  constexpr int64_t kChunk = 4096;
  cpu::parallel_for((n + kChunk - 1) / kChunk, kChunk,
                    [&](int64_t c) { body(c * kChunk, std::min(n, (c + 1) * kChunk)); });
}

}  // namespace

// ---- indexing ----

// Serial, and before any parallel loop reads the indices: an exception must never escape an
// OpenMP region.
void CpuBackend::check_indices(const View& index, int64_t rows, const char* op) {
  for (int64_t i = 0; i < index.numel(); ++i) {
    const int64_t id = cpu::read_index(index.data, index.dtype, i);
    check(id >= 0 && id < rows, "{}: index {} (at position {}) is out of range for {} rows", op, id, i, rows);
  }
}

void CpuBackend::check_targets(const View& targets, int64_t classes, int64_t ignore_index, const char* op) {
  for (int64_t i = 0; i < targets.numel(); ++i) {
    const int64_t t = cpu::read_index(targets.data, targets.dtype, i);
    check(t == ignore_index || (t >= 0 && t < classes),
          "{}: target {} (row {}) is out of range for {} classes (ignore_index {})", op, t, i, classes, ignore_index);
  }
}

void CpuBackend::index_select_rows(const View& out, const View& table, const View& index) {
  const int64_t n = index.numel();
  if (n == 0 || out.numel() == 0) return;
  // Rows are copied as bytes, so any dtype can be gathered (token ids too).
  const int64_t row_elements = out.numel() / n;
  const size_t row_bytes = size_t(row_elements) * dtype_size(out.dtype);
  const char* src = static_cast<const char*>(table.data);
  char* dst = static_cast<char*>(out.data);
  cpu::parallel_for(n, row_elements, [&](int64_t i) {
    const int64_t id = cpu::read_index(index.data, index.dtype, i);
    std::memcpy(dst + size_t(i) * row_bytes, src + size_t(id) * row_bytes, row_bytes);
  });
}

void CpuBackend::index_add_rows(const View& grad_table, const View& index, const View& grad_out) {
  const int64_t n = index.numel();
  if (n == 0 || grad_out.numel() == 0) return;
  const int64_t cols = grad_out.numel() / n;
  // Repeated indices add into the same table row, so threads split the
  // columns rather than the indices: each thread owns one column block of
  // every row, and no two threads ever write the same element.
  const int64_t per_thread = (cols + num_threads() - 1) / num_threads();
  const int64_t block = std::max<int64_t>(16, (per_thread + 15) / 16 * 16);  // whole cache lines of f32
  const int64_t blocks = (cols + block - 1) / block;
  cpu::dispatch_floating(grad_table.dtype, "index_add", [&](auto zero) {
    using T = decltype(zero);
    T* table = grad_table.ptr<T>();
    const T* g = grad_out.ptr<T>();
    cpu::parallel_for(blocks, n * block, [&](int64_t b) {
      const int64_t begin = b * block, end = std::min(cols, begin + block);
      for (int64_t i = 0; i < n; ++i) {
        T* dst = table + cpu::read_index(index.data, index.dtype, i) * cols;
        const T* src = g + i * cols;
        for (int64_t c = begin; c < end; ++c) dst[c] += src[c];
      }
    });
  });
}

// ---- layer norm ----
// Statistics (mean, rstd) are kept in the input's type T: f32 as the backend
// interface specifies, f64 for f64 inputs so gradient checks stay exact.
// Sums accumulate in T like PyTorch's CPU kernel; the variance is taken about
// the mean in a second pass (the row is in L1 by then), which avoids the
// cancellation of E[x^2] - E[x]^2 for rows with a large mean.

void CpuBackend::layer_norm_forward(const View& y, const View& mean, const View& rstd, const View& x,
                                    const View& weight, const View& bias, double eps) {
  if (y.dtype != x.dtype) {  // a bf16 output: computed in x's dtype, then rounded once
    KernelOperands wide(*this);
    layer_norm_forward(wide.out(y, x.dtype), mean, rstd, x, weight, bias, eps);
    wide.finish();
    return;
  }
  const RowShape shape = rows_of(x);
  const int64_t rows = shape.rows, cols = shape.cols, y_ld = y.row_stride();  // plain locals: lambdas capture them
  cpu::dispatch_floating(x.dtype, "layer_norm", [&](auto zero) {
    using T = decltype(zero);
    const T *px = x.ptr<T>(), *w = weight.ptr<T>(), *b = bias.ptr<T>();
    T *py = y.ptr<T>(), *pmean = mean.ptr<T>(), *prstd = rstd.ptr<T>();
    cpu::parallel_for(rows, cols, [&](int64_t r) {
      const T* xr = px + r * cols;
      T* yr = py + r * y_ld;
      // The mean is summed in f64: an f32 running sum of a row with a large
      // mean loses digits at every step unless the loop happens to vectorise.
      double sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < cols; ++c) sum += double(xr[c]);
      const T mu = T(sum / double(cols));
      T squares = 0;
#pragma omp simd reduction(+ : squares)
      for (int64_t c = 0; c < cols; ++c) squares += (xr[c] - mu) * (xr[c] - mu);
      const T rs = T(1) / std::sqrt(squares / T(cols) + T(eps));  // biased variance, as torch
      for (int64_t c = 0; c < cols; ++c) yr[c] = (xr[c] - mu) * rs * w[c] + b[c];
      pmean[r] = mu;
      prstd[r] = rs;
    });
  });
}

// With g = dy * weight and xhat = (x - mean) * rstd:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
//   dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy.
// The weight and bias sums run over rows, which are split among threads, so
// each fixed chunk of rows sums into its own partial row and the partials are
// added at the end: race-free, and the same result for any thread count.
void CpuBackend::layer_norm_backward(const View& dx, const View& dweight, const View& dbias, const View& dy,
                                     const View& x, const View& weight, const View& mean, const View& rstd,
                                     const View& residual) {
  if (dy.dtype != x.dtype) {  // the gradient of a bf16 output, widened
    KernelOperands wide(*this);
    layer_norm_backward(dx, dweight, dbias, wide.in(dy, x.dtype), x, weight, mean, rstd, residual);
    return;
  }
  const RowShape shape = rows_of(x);
  const int64_t rows = shape.rows, cols = shape.cols;  // plain locals: lambdas capture them
  const bool want_dweight = dweight.data != nullptr, want_dbias = dbias.data != nullptr;
  constexpr int64_t kChunks = 64;
  const int64_t chunks = std::max<int64_t>(1, std::min(rows, kChunks));
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  cpu::dispatch_floating(x.dtype, "layer_norm_backward", [&](auto zero) {
    using T = decltype(zero);
    const T *px = x.ptr<T>(), *pdy = dy.ptr<T>(), *w = weight.ptr<T>();
    const T *pmean = mean.ptr<T>(), *prstd = rstd.ptr<T>();
    T* pdx = dx.ptr<T>();
    const T* pres = residual.data ? residual.ptr<T>() : nullptr;
    // Frozen weight and bias: no partial sums at all.
    std::vector<T> dweight_parts(want_dweight ? size_t(chunks * cols) : 0);
    std::vector<T> dbias_parts(want_dbias ? size_t(chunks * cols) : 0);
    cpu::parallel_for(chunks, rows_per_chunk * cols, [&](int64_t chunk) {
      T* dw = want_dweight ? dweight_parts.data() + chunk * cols : nullptr;
      T* db = want_dbias ? dbias_parts.data() + chunk * cols : nullptr;
      const int64_t end = std::min(rows, (chunk + 1) * rows_per_chunk);
      for (int64_t r = chunk * rows_per_chunk; r < end; ++r) {
        const T *xr = px + r * cols, *dyr = pdy + r * cols;
        T* dxr = pdx + r * cols;
        const T* resr = pres ? pres + r * cols : nullptr;
        const T mu = pmean[r], rs = prstd[r];
        T sum_g = 0, sum_g_xhat = 0;
#pragma omp simd reduction(+ : sum_g, sum_g_xhat)
        for (int64_t c = 0; c < cols; ++c) {
          const T g = dyr[c] * w[c];
          sum_g += g;
          sum_g_xhat += g * (xr[c] - mu) * rs;
        }
        const T mean_g = sum_g / T(cols), mean_g_xhat = sum_g_xhat / T(cols);
        for (int64_t c = 0; c < cols; ++c) {
          const T d = rs * (dyr[c] * w[c] - mean_g - (xr[c] - mu) * rs * mean_g_xhat);
          dxr[c] = resr ? resr[c] + d : d;
        }
        if (dw)
          for (int64_t c = 0; c < cols; ++c) dw[c] += dyr[c] * (xr[c] - mu) * rs;
        if (db)
          for (int64_t c = 0; c < cols; ++c) db[c] += dyr[c];
      }
    });
    // Add the partials chunk by chunk, in a fixed order.
    auto reduce_parts = [&](const std::vector<T>& parts, const View& out) {
      T* o = out.ptr<T>();
      std::fill(o, o + cols, T(0));
      for (int64_t chunk = 0; chunk < chunks; ++chunk)
        for (int64_t c = 0; c < cols; ++c) o[c] += parts[size_t(chunk * cols + c)];
    };
    if (want_dweight) reduce_parts(dweight_parts, dweight);
    if (want_dbias) reduce_parts(dbias_parts, dbias);
  });
}

// ---- gelu_new ----
// gelu_new(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).
// Since 0.5 (1 + tanh(u)) = sigmoid(2u), it is computed as x * sigmoid(2u):
// one exp instead of a tanh (about 5x faster with glibc) and no cancellation.
// Its derivative is s + x s (1 - s) 2u', with s = sigmoid(2u) and
// u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2).

namespace {
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kGeluCubic = 0.044715;
}  // namespace

void CpuBackend::gelu_forward(const View& y, const View& x) {
  if (x.dtype == DType::BF16) {  // stored, not computed in: on f32 copies, rounded once
    KernelOperands f32(*this);
    gelu_forward(f32.out(y, DType::F32), f32.in(x, DType::F32));
    return f32.finish();
  }
  cpu::dispatch_floating(x.dtype, "gelu", [&](auto zero) {
    using T = decltype(zero);
    const T* px = x.ptr<T>();
    T* py = y.ptr<T>();
    for_chunks(x.numel(), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T v = px[i];
        const T two_u = T(2 * kSqrt2OverPi) * (v + T(kGeluCubic) * v * v * v);
        py[i] = v / (T(1) + std::exp(-two_u));
      }
    });
  });
}

void CpuBackend::gelu_backward(const View& dx, const View& dy, const View& x) {
  if (x.dtype == DType::BF16) {
    KernelOperands f32(*this);
    gelu_backward(f32.out(dx, DType::F32), f32.in(dy, DType::F32), f32.in(x, DType::F32));
    return f32.finish();
  }
  cpu::dispatch_floating(x.dtype, "gelu_backward", [&](auto zero) {
    using T = decltype(zero);
    const T *px = x.ptr<T>(), *pdy = dy.ptr<T>();
    T* pdx = dx.ptr<T>();
    for_chunks(x.numel(), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T v = px[i];
        const T two_u = T(2 * kSqrt2OverPi) * (v + T(kGeluCubic) * v * v * v);
        const T two_du = T(2 * kSqrt2OverPi) * (T(1) + T(3 * kGeluCubic) * v * v);
        const T s = T(1) / (T(1) + std::exp(-two_u));
        pdx[i] = pdy[i] * (s + v * s * (T(1) - s) * two_du);
      }
    });
  });
}

// ---- softmax and log-softmax over the last dim ----
// Stable: the row max is subtracted before exp. Sums of exponentials
// accumulate in double, which costs nothing next to the exp and keeps
// 50k-wide vocabulary rows accurate in f32.

void CpuBackend::softmax_forward(const View& y, const View& x, bool log) {
  const RowShape shape = rows_of(x);
  const int64_t rows = shape.rows, cols = shape.cols;  // plain locals: lambdas capture them
  cpu::dispatch_floating(x.dtype, "softmax", [&](auto zero) {
    using T = decltype(zero);
    const T* px = x.ptr<T>();
    T* py = y.ptr<T>();
    cpu::parallel_for(rows, cols, [&](int64_t r) {
      const T* xr = px + r * cols;
      T* yr = py + r * cols;
      T row_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : row_max)
      for (int64_t c = 0; c < cols; ++c) row_max = std::max(row_max, xr[c]);
      double sum = 0;
      for (int64_t c = 0; c < cols; ++c) {
        yr[c] = std::exp(xr[c] - row_max);
        sum += double(yr[c]);
      }
      if (log) {
        // (x - max) - log(sum), not x - (max + log(sum)): for logits in the
        // thousands the latter rounds away the small log(sum) term.
        const T log_sum = T(std::log(sum));
        for (int64_t c = 0; c < cols; ++c) yr[c] = (xr[c] - row_max) - log_sum;
      } else {
        const T inverse = T(1.0 / sum);
        for (int64_t c = 0; c < cols; ++c) yr[c] *= inverse;
      }
    });
  });
}

// softmax:     dx = y * (dy - sum(dy * y))
// log_softmax: dx = dy - exp(y) * sum(dy)
void CpuBackend::softmax_backward(const View& dx, const View& dy, const View& y, bool log) {
  const RowShape shape = rows_of(y);
  const int64_t rows = shape.rows, cols = shape.cols;  // plain locals: lambdas capture them
  cpu::dispatch_floating(y.dtype, "softmax_backward", [&](auto zero) {
    using T = decltype(zero);
    const T *py = y.ptr<T>(), *pdy = dy.ptr<T>();
    T* pdx = dx.ptr<T>();
    cpu::parallel_for(rows, cols, [&](int64_t r) {
      const T *yr = py + r * cols, *dyr = pdy + r * cols;
      T* dxr = pdx + r * cols;
      T dot = 0;
      if (log) {
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < cols; ++c) dot += dyr[c];
        for (int64_t c = 0; c < cols; ++c) dxr[c] = dyr[c] - std::exp(yr[c]) * dot;
      } else {
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < cols; ++c) dot += dyr[c] * yr[c];
        for (int64_t c = 0; c < cols; ++c) dxr[c] = yr[c] * (dyr[c] - dot);
      }
    });
  });
}

// ---- cross-entropy, fused with log-softmax ----
// loss[i] = lse(logits[i]) - logits[i, target[i]], 0 where the target is
// ignore_index. lse is saved (in T, as layer norm's statistics), so the
// backward rebuilds softmax = exp(logits - lse) without another pass for the max.

void CpuBackend::cross_entropy_forward(const View& loss, const View& lse, const View& logits, const View& targets,
                                       int64_t ignore_index) {
  const RowShape shape = rows_of(logits);
  const int64_t rows = shape.rows, cols = shape.cols;  // plain locals: lambdas capture them
  cpu::dispatch_floating(logits.dtype, "cross_entropy", [&](auto zero) {
    using T = decltype(zero);
    const T* px = logits.ptr<T>();
    T *ploss = loss.ptr<T>(), *plse = lse.ptr<T>();
    cpu::parallel_for(rows, cols, [&](int64_t r) {
      const T* xr = px + r * cols;
      T row_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : row_max)
      for (int64_t c = 0; c < cols; ++c) row_max = std::max(row_max, xr[c]);
      double sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += double(std::exp(xr[c] - row_max));
      const T log_sum = T(std::log(sum));
      const int64_t target = cpu::read_index(targets.data, targets.dtype, r);
      plse[r] = row_max + log_sum;
      ploss[r] = target == ignore_index ? T(0) : (row_max - xr[target]) + log_sum;  // as in log_softmax
    });
  });
}

// dlogits[i] = dloss[i] * (softmax(logits[i]) - onehot(target[i])); ignored rows get 0.
void CpuBackend::cross_entropy_backward(const View& dlogits, const View& dloss, const View& logits, const View& lse,
                                        const View& targets, int64_t ignore_index) {
  const RowShape shape = rows_of(logits);
  const int64_t rows = shape.rows, cols = shape.cols;  // plain locals: lambdas capture them
  cpu::dispatch_floating(logits.dtype, "cross_entropy_backward", [&](auto zero) {
    using T = decltype(zero);
    const T *px = logits.ptr<T>(), *pdloss = dloss.ptr<T>(), *plse = lse.ptr<T>();
    T* pd = dlogits.ptr<T>();
    cpu::parallel_for(rows, cols, [&](int64_t r) {
      const T* xr = px + r * cols;
      T* dr = pd + r * cols;
      const int64_t target = cpu::read_index(targets.data, targets.dtype, r);
      if (target == ignore_index) {
        std::fill(dr, dr + cols, T(0));
        return;
      }
      const T scale = pdloss[r], row_lse = plse[r];
      for (int64_t c = 0; c < cols; ++c) dr[c] = scale * std::exp(xr[c] - row_lse);
      dr[target] -= scale;
    });
  });
}

// ---- dropout (and dropout_add's sum) ----
// Element i is kept iff philox_uniform(seed, offset, i) >= p. One Philox call
// yields the four uniforms of elements 4k..4k+3, so it is made once per block
// of four (a quarter of the cost of calling philox_uniform per element); the
// tests compare the two element by element.

void CpuBackend::dropout(const View& out, const View& in, double p, uint64_t seed, uint64_t offset,
                         const View& residual) {
  if (in.dtype == DType::BF16 || out.dtype == DType::BF16) {  // stored, not computed in: on f32 copies, rounded once
    KernelOperands f32(*this);
    dropout(f32.out(out, DType::F32), f32.in(in, DType::F32), p, seed, offset, f32.in(residual, DType::F32));
    return f32.finish();
  }
  cpu::dispatch_floating(in.dtype, "dropout", [&](auto zero) {
    using T = decltype(zero);
    const T *px = in.ptr<T>(), *pr = residual.data ? residual.ptr<T>() : nullptr;
    T* py = out.ptr<T>();
    const T scale = T(1.0 / (1.0 - p));
    for_chunks(in.numel(), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; i += 4) {  // begin is a multiple of 4
        const Philox4 block = philox4x32_10(seed, offset + uint64_t(i) / 4);
        for (int64_t k = 0; k < 4 && i + k < end; ++k) {
          const T dropped = philox_word_to_uniform(block.v[k]) >= p ? px[i + k] * scale : T(0);
          py[i + k] = pr ? pr[i + k] + dropped : dropped;
        }
      }
    });
  });
}

}  // namespace engine
