// Causal attention with a key-padding mask on the CPU, flash-attention style:
// scores are made one tile of queries x keys at a time and folded into the
// output with an online softmax, so no B x H x T x T matrix ever exists. The
// backward recomputes each probability tile from q, k and the saved lse.
#include "engine/cpu/cpu_backend.h"
#include "engine/cpu/parallel.h"
#include "engine/profiler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace engine {

namespace {

// A tile of 32 queries x 64 keys keeps the score tile (8 KiB in f32) and the
// key and value tiles (16 KiB each at D = 64) in L1/L2 while they are reused.
constexpr int64_t kQueryTile = 32;
constexpr int64_t kKeyTile = 64;

// One call's geometry. key_mask is [B, T] i32 (nonzero = attend) or null.
struct Problem {
  int64_t B, H, T, D;
  bool causal;
  const int32_t* key_mask;

  // The mask row of the batch element that (batch, head) index bh belongs to.
  const int32_t* mask_row(int64_t bh) const { return key_mask ? key_mask + (bh / H) * T : nullptr; }
};

bool allowed(const int32_t* mask_row, bool causal, int64_t query, int64_t key) {
  return (!mask_row || mask_row[key] != 0) && (!causal || key <= query);
}

// Keys outside [lo, hi) are padding for every query of this batch row, so
// tiles there are skipped: left- and right-padded batches cost no more than
// their real length.
struct KeyRange {
  int64_t lo, hi;
};

KeyRange key_range(const int32_t* mask_row, int64_t T) {
  if (!mask_row) return {0, T};
  int64_t lo = 0, hi = T;
  while (lo < T && mask_row[lo] == 0) ++lo;
  while (hi > lo && mask_row[hi - 1] == 0) --hi;
  return {lo, hi};
}

// dst [D, n] = src [n, D] transposed. With a transposed key tile a score row
// becomes a sum of contiguous axpys over keys, which the compiler vectorises
// without reassociating any dot product.
template <typename T>
void transpose_rows(T* dst, const T* src, int64_t n, int64_t D) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) dst[d * n + j] = src[j * D + d];
}

// s[i, j] = scale * <a_i, b_j> for i < na, j < nb; a is [na, D], bt = b^T is
// [D, nb], s has row stride kKeyTile.
template <typename T>
void tile_products(T* s, const T* a, int64_t na, const T* bt, int64_t nb, int64_t D, T scale) {
  for (int64_t i = 0; i < na; ++i) {
    T* row = s + i * kKeyTile;
    const T* ai = a + i * D;
    std::fill(row, row + nb, T(0));
    for (int64_t d = 0; d < D; ++d) {
      const T a_id = ai[d];
      const T* bt_d = bt + d * nb;
      for (int64_t j = 0; j < nb; ++j) row[j] += a_id * bt_d[j];
    }
    for (int64_t j = 0; j < nb; ++j) row[j] *= scale;
  }
}

// y += alpha * x over D elements.
template <typename T>
void axpy(T* y, T alpha, const T* x, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += alpha * x[d];
}

// ---- forward ----

// One (batch*head, query tile) task: the online softmax keeps, per query row,
// the running max m, the running sum l of exp(s - m), and the output
// accumulated under the same max; a new tile with a larger max rescales them.
// Accumulates in T (float for f32, as PyTorch's CPU flash attention does).
template <typename T>
void attention_forward_tile(const Problem& p, T scale, int64_t bh, int64_t i0, T* out, float* lse, const T* q,
                            const T* k, const T* v) {
  const int64_t T_ = p.T, D = p.D;
  const int64_t nq = std::min(kQueryTile, T_ - i0);
  const int32_t* mask = p.mask_row(bh);
  const T* qb = q + bh * T_ * D;
  const T* kb = k + bh * T_ * D;
  const T* vb = v + bh * T_ * D;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();

  std::vector<T> s(size_t(kQueryTile * kKeyTile)), kt(size_t(D * kKeyTile)), acc(size_t(nq * D), T(0));
  std::vector<T> m(size_t(nq), kNegInf), l(size_t(nq), T(0));

  const KeyRange keys = key_range(mask, T_);
  const int64_t key_end = p.causal ? std::min(keys.hi, i0 + nq) : keys.hi;  // later keys are in every row's future
  for (int64_t j0 = keys.lo; j0 < key_end; j0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, key_end - j0);
    transpose_rows(kt.data(), kb + j0 * D, nk, D);
    tile_products(s.data(), qb + i0 * D, nq, kt.data(), nk, D, scale);
    for (int64_t i = 0; i < nq; ++i) {
      T* row = s.data() + i * kKeyTile;
      T tile_max = kNegInf;
      for (int64_t j = 0; j < nk; ++j) {
        if (allowed(mask, p.causal, i0 + i, j0 + j)) tile_max = std::max(tile_max, row[j]);
        else row[j] = kNegInf;  // exp gives exactly 0 below
      }
      if (tile_max == kNegInf) continue;  // this row sees no key of this tile
      const T new_max = std::max(m[size_t(i)], tile_max);
      T* acc_i = acc.data() + i * D;
      if (new_max != m[size_t(i)]) {
        const T rescale = std::exp(m[size_t(i)] - new_max);  // 0 on the first tile (m = -inf)
        l[size_t(i)] *= rescale;
        for (int64_t d = 0; d < D; ++d) acc_i[d] *= rescale;
        m[size_t(i)] = new_max;
      }
      T row_sum = 0;
      for (int64_t j = 0; j < nk; ++j) {
        const T prob = std::exp(row[j] - new_max);
        row_sum += prob;
        if (prob != T(0)) axpy(acc_i, prob, vb + (j0 + j) * D, D);
      }
      l[size_t(i)] += row_sum;
    }
  }

  // A row that saw no key (l = 0) outputs zeros and lse = -inf; the backward
  // then finds every key of that row masked and gives it zero gradient.
  for (int64_t i = 0; i < nq; ++i) {
    T* out_i = out + (bh * T_ + i0 + i) * D;
    const T* acc_i = acc.data() + i * D;
    const T li = l[size_t(i)];
    const T inv = li > T(0) ? T(1) / li : T(0);
    for (int64_t d = 0; d < D; ++d) out_i[d] = acc_i[d] * inv;
    lse[bh * T_ + i0 + i] =
        li > T(0) ? float(m[size_t(i)] + std::log(li)) : -std::numeric_limits<float>::infinity();
  }
}

// ---- backward ----
//
// With P = exp(S - lse) recomputed tile by tile:
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
//   dQ = scale * dS K,  dK = scale * dS^T Q.
// dK and dV sum over queries, so one task owns a whole (batch, head): it walks
// key tiles in the outer loop (their dK/dV rows stay hot) and query tiles in
// the inner one, and nothing is shared between threads.
template <typename T>
void attention_backward_head(const Problem& p, T scale, int64_t bh, T* dq, T* dk, T* dv, const T* dout,
                             const T* q, const T* k, const T* v, const T* out, const float* lse) {
  const int64_t T_ = p.T, D = p.D, offset = bh * T_ * D;
  const int32_t* mask = p.mask_row(bh);
  const T *qb = q + offset, *kb = k + offset, *vb = v + offset, *dob = dout + offset, *ob = out + offset;
  const float* lse_b = lse + bh * T_;
  T* dqb = dq ? dq + offset : nullptr;
  T* dkb = dk ? dk + offset : nullptr;
  T* dvb = dv ? dv + offset : nullptr;
  for (T* g : {dqb, dkb, dvb})
    if (g) std::fill(g, g + T_ * D, T(0));
  const bool need_ds = dqb || dkb;  // dv alone needs only P

  // delta_i = <dO_i, O_i> = rowsum(P * dP), the softmax backward's correction term.
  std::vector<T> delta(size_t(T_), T(0));
  if (need_ds)
    for (int64_t i = 0; i < T_; ++i) {
      T sum = 0;
      for (int64_t d = 0; d < D; ++d) sum += dob[i * D + d] * ob[i * D + d];
      delta[size_t(i)] = sum;
    }

  std::vector<T> prob(size_t(kQueryTile * kKeyTile)), dprob(size_t(kQueryTile * kKeyTile));
  std::vector<T> kt(size_t(D * kKeyTile)), vt(size_t(D * kKeyTile));
  const KeyRange keys = key_range(mask, T_);
  for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, keys.hi - j0);
    transpose_rows(kt.data(), kb + j0 * D, nk, D);
    if (need_ds) transpose_rows(vt.data(), vb + j0 * D, nk, D);
    // Under causal masking, queries before j0 see none of these keys.
    for (int64_t i0 = p.causal ? j0 : 0; i0 < T_; i0 += kQueryTile) {
      const int64_t nq = std::min(kQueryTile, T_ - i0);
      tile_products(prob.data(), qb + i0 * D, nq, kt.data(), nk, D, scale);
      for (int64_t i = 0; i < nq; ++i) {
        T* row = prob.data() + i * kKeyTile;
        const T row_lse = T(lse_b[i0 + i]);  // finite whenever some key is allowed
        for (int64_t j = 0; j < nk; ++j)
          row[j] = allowed(mask, p.causal, i0 + i, j0 + j) ? std::exp(row[j] - row_lse) : T(0);
      }
      if (dvb)
        for (int64_t i = 0; i < nq; ++i)
          for (int64_t j = 0; j < nk; ++j) {
            const T pij = prob[size_t(i * kKeyTile + j)];
            if (pij != T(0)) axpy(dvb + (j0 + j) * D, pij, dob + (i0 + i) * D, D);
          }
      if (!need_ds) continue;
      tile_products(dprob.data(), dob + i0 * D, nq, vt.data(), nk, D, T(1));
      for (int64_t i = 0; i < nq; ++i) {
        T* ds = dprob.data() + i * kKeyTile;  // dS overwrites dP in place, pre-multiplied by scale
        const T* pi = prob.data() + i * kKeyTile;
        const T di = delta[size_t(i0 + i)];
        for (int64_t j = 0; j < nk; ++j) ds[j] = scale * pi[j] * (ds[j] - di);
      }
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = 0; j < nk; ++j) {
          const T dsij = dprob[size_t(i * kKeyTile + j)];
          if (dsij == T(0)) continue;  // masked (or exactly zero) entries add nothing
          if (dqb) axpy(dqb + (i0 + i) * D, dsij, kb + (j0 + j) * D, D);
          if (dkb) axpy(dkb + (j0 + j) * D, dsij, qb + (i0 + i) * D, D);
        }
    }
  }
}

template <typename T>
T* optional_ptr(const View& view) {
  return view.data ? view.ptr<T>() : nullptr;
}

Problem problem_of(const View& q, const View& key_mask, bool causal) {
  return Problem{q.shape[0], q.shape[1], q.shape[2], q.shape[3], causal,
                 key_mask.data ? key_mask.ptr<const int32_t>() : nullptr};
}

}  // namespace

void CpuBackend::attention_forward(const View& out, const View& lse, const View& q, const View& k, const View& v,
                                   const View& key_mask, bool causal, double scale) {
  const Problem p = problem_of(q, key_mask, causal);
  const double flops = 4.0 * double(p.B * p.H) * double(p.T) * double(p.T) * double(p.D) * (causal ? 0.5 : 1.0);
  ProfileScope profile("attention_forward", flops);
  const int64_t query_tiles = (p.T + kQueryTile - 1) / kQueryTile;
  cpu::dispatch_floating(q.dtype, "attention_forward", [&](auto zero) {
    using T = decltype(zero);
    cpu::parallel_for(p.B * p.H * query_tiles, kQueryTile * p.T * p.D, [&](int64_t task) {
      attention_forward_tile<T>(p, T(scale), task / query_tiles, (task % query_tiles) * kQueryTile, out.ptr<T>(),
                                lse.ptr<float>(), q.ptr<const T>(), k.ptr<const T>(), v.ptr<const T>());
    });
  });
}

void CpuBackend::attention_backward(const View& dq, const View& dk, const View& dv, const View& dout, const View& q,
                                    const View& k, const View& v, const View& out, const View& lse,
                                    const View& key_mask, bool causal, double scale) {
  const Problem p = problem_of(q, key_mask, causal);
  const double flops = 8.0 * double(p.B * p.H) * double(p.T) * double(p.T) * double(p.D) * (causal ? 0.5 : 1.0);
  ProfileScope profile("attention_backward", flops);
  cpu::dispatch_floating(q.dtype, "attention_backward", [&](auto zero) {
    using T = decltype(zero);
    cpu::parallel_for(p.B * p.H, p.T * p.T * p.D, [&](int64_t bh) {
      attention_backward_head<T>(p, T(scale), bh, optional_ptr<T>(dq), optional_ptr<T>(dk), optional_ptr<T>(dv),
                                 dout.ptr<const T>(), q.ptr<const T>(), k.ptr<const T>(), v.ptr<const T>(),
                                 out.ptr<const T>(), lse.ptr<const float>());
    });
  });
}

}  // namespace engine
