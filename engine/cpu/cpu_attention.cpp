// Causal attention with a key-padding mask on the CPU, flash-attention style:
// scores are made one tile of queries x keys at a time and folded into the
// output with an online softmax, so no B x H x Tq x Tk matrix ever exists. The
// backward recomputes each probability tile from q, k and the saved lse.
//
// q is [B, H, Tq, D], k and v [B, H, Tk, D], the mask [B, Tk]. Query i sees
// key j when mask[b, j] != 0 and, if causal, j <= i + (Tk - Tq): the queries
// are the last Tq positions, as in a KV-cache step (Tq = Tk is plain causal).
// Dropout on the probabilities regenerates its keep mask from Philox in the
// backward (engine/backend.h, AttentionArgs).
#include "engine/cpu/cpu_backend.h"
#include "engine/cpu/parallel.h"
#include "engine/profiler.h"
#include "engine/rng.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace engine {

namespace {

// A tile of 32 queries x 32 keys keeps the score tile (4 KiB in f32) and the
// key and value tiles (8 KiB each at D = 64) in L1 while they are reused.
// Square tiles waste least on the tiles the causal diagonal cuts in two.
constexpr int64_t kQueryTile = 32;
constexpr int64_t kKeyTile = 32;

// One call's geometry. key_mask is [B, Tk] i32 (nonzero = attend) or null.
struct Problem {
  int64_t B, H, Tq, Tk, D;
  bool causal;
  const int32_t* key_mask;
  double dropout_p = 0;  // AttentionArgs' dropout of the probabilities
  uint64_t dropout_seed = 0, dropout_offset = 0;

  int64_t causal_shift() const { return Tk - Tq; }  // query i sits at key position i + Tk - Tq
  // The mask row of the batch element that (batch, head) index bh belongs to.
  const int32_t* mask_row(int64_t bh) const { return key_mask ? key_mask + (bh / H) * Tk : nullptr; }
  bool allowed(const int32_t* mask, int64_t query, int64_t key) const {
    return (!mask || mask[key] != 0) && (!causal || key <= query + causal_shift());
  }
};

// One [B, H, T, D] operand through its strides over B, H and T (D is
// contiguous): GPT-2's q, k and v are views of one [B, T, 3, H, D] tensor,
// and the output is laid out [B, T, H, D]. Row r of (batch, head) bh starts
// at rows(bh) + r * ld.
template <typename T>
struct Heads {
  T* data = nullptr;
  int64_t batch = 0, head = 0, ld = 0, H = 1;
  T* rows(int64_t bh) const { return data ? data + (bh / H) * batch + (bh % H) * head : nullptr; }
};

template <typename T>
Heads<T> heads_of(const View& v) {
  if (!v.data) return {};
  return {v.ptr<T>(), v.strides[0], v.strides[1], v.strides[2], v.shape[1]};
}

// Dropout's factors for keys key0 .. key0+n-1 of one query row: 1 / (1 - p)
// where the probability is kept, else 0. Element e = (bh * Tq + query) * Tk + key
// of the 16-bit stream (engine/rng.h's philox_uniform16) decides: block
// offset + e / 8 serves eight keys.
template <typename T>
void dropout_factors(T* factor, const Problem& p, int64_t bh, int64_t query, int64_t key0, int64_t n) {
  const uint64_t first = uint64_t(bh * p.Tq + query) * uint64_t(p.Tk) + uint64_t(key0);
  const T keep = T(1.0 / (1.0 - p.dropout_p));
  for (int64_t j = 0; j < n;) {
    const uint64_t e = first + uint64_t(j);
    const Philox4 block = philox4x32_10(p.dropout_seed, p.dropout_offset + e / 8);
    for (uint64_t k = e % 8; k < 8 && j < n; ++k, ++j) {
      const float uniform = philox_half_to_uniform(philox_half(block.v[k / 2], unsigned(k % 2)));
      factor[j] = uniform >= p.dropout_p ? keep : T(0);
    }
  }
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

// dst [D, n] = src [n, D] (row stride ld) transposed, so that products with
// K^T and V^T read a row-major operand.
template <typename T>
void transpose_rows(T* dst, const T* src, int64_t n, int64_t D, int64_t ld) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) dst[d * n + j] = src[j * ld + d];
}

// C [m, n] (+)= A [m, k] B [k, n], the small GEMM behind every product of the
// algorithm. B and C are row-major with row strides ldb and ldc; A's element
// (i, p) is a[i * a_row + p * a_col], so a transposed A (P^T, dS^T) costs no
// copy. Each pair of C rows is built kLanes columns at a time in local arrays
// the compiler keeps in vector registers, so the inner loop loads B once for
// two rows and never stores until the k loop ends.
template <typename T>
void gemm_tile(bool accumulate, T* c, int64_t ldc, const T* a, int64_t a_row, int64_t a_col, const T* b,
               int64_t ldb, int64_t m, int64_t n, int64_t k) {
  constexpr int64_t kLanes = 64 / sizeof(T);  // one cache line of a C row
  int64_t i = 0;
  for (; i + 2 <= m; i += 2) {
    T* c0 = c + i * ldc;
    T* c1 = c0 + ldc;
    const T* a0 = a + i * a_row;
    const T* a1 = a0 + a_row;
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      T acc0[kLanes], acc1[kLanes];
      for (int64_t w = 0; w < kLanes; ++w) {
        acc0[w] = accumulate ? c0[j + w] : T(0);
        acc1[w] = accumulate ? c1[j + w] : T(0);
      }
      for (int64_t p = 0; p < k; ++p) {
        const T x0 = a0[p * a_col], x1 = a1[p * a_col];
        const T* bp = b + p * ldb + j;
        // Without this GCC vectorises the k loop instead, gathering A and B.
#pragma omp simd
        for (int64_t w = 0; w < kLanes; ++w) {
          acc0[w] += x0 * bp[w];
          acc1[w] += x1 * bp[w];
        }
      }
      for (int64_t w = 0; w < kLanes; ++w) {
        c0[j + w] = acc0[w];
        c1[j + w] = acc1[w];
      }
    }
    for (; j < n; ++j) {  // the columns left over (odd D, a short last key tile)
      T sum0 = accumulate ? c0[j] : T(0), sum1 = accumulate ? c1[j] : T(0);
      for (int64_t p = 0; p < k; ++p) {
        sum0 += a0[p * a_col] * b[p * ldb + j];
        sum1 += a1[p * a_col] * b[p * ldb + j];
      }
      c0[j] = sum0;
      c1[j] = sum1;
    }
  }
  for (; i < m; ++i) {  // an odd last row
    T* ci = c + i * ldc;
    const T* ai = a + i * a_row;
    if (!accumulate) std::fill(ci, ci + n, T(0));
    for (int64_t p = 0; p < k; ++p) {
      const T x = ai[p * a_col];
      const T* bp = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) ci[j] += x * bp[j];
    }
  }
}

// x[j] = exp(x[j] - shift) over a row of scores, exactly 0 for a masked key
// (-inf). libm's expf is one call per score (a tenth of the forward's time),
// so f32 uses exp's textbook form, which the compiler vectorises: e^y = 2^k e^r
// with k = round(y / ln 2), |r| <= ln(2) / 2 and a degree-6 Taylor polynomial
// for e^r, within 2.5e-7 relative of std::exp. Every select is on integers:
// GCC will not vectorise a float compare-and-select under its default
// -ftrapping-math. f64 (gradient checks) keeps std::exp.
template <typename T>
void exp_shifted(T* x, int64_t n, T shift) {
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j] - shift);
  } else {
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits
    for (int64_t j = 0; j < n; ++j) {
      const float y = x[j] - shift;
      const float t = y * 1.44269504f + kRound;
      const int32_t t_bits = std::bit_cast<int32_t>(t);
      const int32_t k = (t_bits & 0x7fffff) - 0x400000;
      const float kf = t - kRound;
      const float r = (y - kf * 0.693359375f) + kf * 2.12194440e-4f;  // y - k ln 2, ln 2 split in two (Cody-Waite)
      const float poly =
          1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
      const float e = poly * std::bit_cast<float>((std::max(std::min(k, 127), -126) + 127) << 23);
      // e^y is 0 in f32 when k < -126, or when t left [2^23, 2^24) because y is
      // below about -3e6 or -inf. A NaN score stays NaN.
      const bool is_nan = (std::bit_cast<int32_t>(y) & 0x7fffffff) > 0x7f800000;
      const bool underflow = (((t_bits >> 23) != 150) | (k < -126)) & !is_nan;
      x[j] = std::bit_cast<float>(std::bit_cast<int32_t>(e) & (underflow ? 0 : -1));
    }
  }
}

// ---- forward ----

// One (batch*head, query tile) task: the online softmax keeps, per query row,
// the running max m, the running sum l of exp(s - m), and the output
// accumulated under the same max; a new tile with a larger max rescales them.
// Accumulates in T (float for f32, as PyTorch's CPU flash attention does).
template <typename T>
void attention_forward_tile(const Problem& p, T scale, int64_t bh, int64_t i0, const Heads<T>& out, float* lse,
                            const Heads<const T>& q, const Heads<const T>& k, const Heads<const T>& v) {
  const int64_t D = p.D;
  const int64_t nq = std::min(kQueryTile, p.Tq - i0);
  const int32_t* mask = p.mask_row(bh);
  const T *qb = q.rows(bh), *kb = k.rows(bh), *vb = v.rows(bh);
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();

  std::vector<T> s(size_t(kQueryTile * kKeyTile)), kt(size_t(D * kKeyTile)), factor(kKeyTile);
  std::vector<T> acc(size_t(nq * D), T(0));
  std::vector<T> m(size_t(nq), kNegInf), l(size_t(nq), T(0));
  std::vector<char> saw_key(size_t(nq), false);  // decided by the mask alone, so NaN scores cannot hide as "no key"

  const KeyRange keys = key_range(mask, p.Tk);
  // Keys from i0 + nq + shift on are in the future of every row of this tile.
  const int64_t key_end = p.causal ? std::min(keys.hi, i0 + nq + p.causal_shift()) : keys.hi;
  for (int64_t j0 = keys.lo; j0 < key_end; j0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, key_end - j0);
    transpose_rows(kt.data(), kb + j0 * k.ld, nk, D, k.ld);
    gemm_tile(false, s.data(), kKeyTile, qb + i0 * q.ld, q.ld, int64_t(1), kt.data(), nk, nq, nk, D);  // S = Q K^T
    for (int64_t i = 0; i < nq; ++i) {
      T* row = s.data() + i * kKeyTile;
      bool any_key = false;
      T tile_max = kNegInf;
      for (int64_t j = 0; j < nk; ++j) {
        const bool visible = p.allowed(mask, i0 + i, j0 + j);
        any_key |= visible;
        row[j] = visible ? row[j] * scale : kNegInf;
        tile_max = std::max(tile_max, row[j]);
      }
      if (!any_key) {  // this row sees no key of this tile: it adds nothing to P V
        std::fill(row, row + nk, T(0));
        continue;
      }
      saw_key[size_t(i)] = true;
      T& row_max = m[size_t(i)];
      if (tile_max > row_max) {
        const T rescale = std::exp(row_max - tile_max);  // 0 on the row's first keys (m = -inf)
        l[size_t(i)] *= rescale;
        for (T* x = acc.data() + i * D; x != acc.data() + (i + 1) * D; ++x) *x *= rescale;
        row_max = tile_max;
      }
      exp_shifted(row, nk, row_max);  // a NaN score makes the row NaN, as it should
      T row_sum = 0;
      for (int64_t j = 0; j < nk; ++j) row_sum += row[j];
      l[size_t(i)] += row_sum;  // the normaliser counts every probability, dropped or not
      if (p.dropout_p > 0) {
        dropout_factors(factor.data(), p, bh, i0 + i, j0, nk);
        for (int64_t j = 0; j < nk; ++j) row[j] *= factor[size_t(j)];
      }
    }
    gemm_tile(true, acc.data(), D, s.data(), kKeyTile, int64_t(1), vb + j0 * v.ld, v.ld, nq, D, nk);  // acc += P V
  }

  // A row that saw no key outputs zeros and lse = -inf; the backward then
  // finds every key of that row masked and gives it zero gradient.
  for (int64_t i = 0; i < nq; ++i) {
    T* out_i = out.rows(bh) + (i0 + i) * out.ld;
    const T* acc_i = acc.data() + i * D;
    const bool seen = saw_key[size_t(i)];
    const T inv = seen ? T(1) / l[size_t(i)] : T(0);
    for (int64_t d = 0; d < D; ++d) out_i[d] = acc_i[d] * inv;
    lse[bh * p.Tq + i0 + i] =
        seen ? float(m[size_t(i)] + std::log(l[size_t(i)])) : -std::numeric_limits<float>::infinity();
  }
}

// ---- backward ----
//
// With P = exp(S - lse) recomputed tile by tile, and F the dropout factors
// (all 1 without dropout) so that the forward used P * F:
//   dV = (P * F)^T dO,  dP = dO V^T * F,  dS = P * (dP - rowsum(dO * O)),
//   dQ = scale * dS K,  dK = scale * dS^T Q.
// rowsum(dO * O) = rowsum(P * dP) holds with dropout too, since O = (P * F) V.
// dK and dV sum over queries, so one task owns a whole (batch, head): it walks
// key tiles in the outer loop (their dK/dV rows stay hot) and query tiles in
// the inner one, and nothing is shared between threads.
template <typename T>
void attention_backward_head(const Problem& p, T scale, int64_t bh, const Heads<T>& dq, const Heads<T>& dk,
                             const Heads<T>& dv, const Heads<const T>& dout, const Heads<const T>& q,
                             const Heads<const T>& k, const Heads<const T>& v, const Heads<const T>& out,
                             const float* lse) {
  const int64_t D = p.D;
  const int32_t* mask = p.mask_row(bh);
  const T *qb = q.rows(bh), *dob = dout.rows(bh), *ob = out.rows(bh), *kb = k.rows(bh), *vb = v.rows(bh);
  const float* lse_b = lse + bh * p.Tq;
  T *dqb = dq.rows(bh), *dkb = dk.rows(bh), *dvb = dv.rows(bh);
  for (int64_t i = 0; dqb && i < p.Tq; ++i) std::fill(dqb + i * dq.ld, dqb + i * dq.ld + D, T(0));
  for (int64_t j = 0; j < p.Tk; ++j) {
    if (dkb) std::fill(dkb + j * dk.ld, dkb + j * dk.ld + D, T(0));
    if (dvb) std::fill(dvb + j * dv.ld, dvb + j * dv.ld + D, T(0));
  }
  const bool need_ds = dqb || dkb;  // dv alone needs only P
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();

  // delta_i = <dO_i, O_i> = rowsum(P * dP), the softmax backward's correction term.
  std::vector<T> delta(size_t(p.Tq), T(0));
  if (need_ds)
    for (int64_t i = 0; i < p.Tq; ++i) {
      T sum = 0;
      for (int64_t d = 0; d < D; ++d) sum += dob[i * dout.ld + d] * ob[i * out.ld + d];
      delta[size_t(i)] = sum;
    }

  std::vector<T> prob(size_t(kQueryTile * kKeyTile)), ds(size_t(kQueryTile * kKeyTile));
  const bool dropout = p.dropout_p > 0;
  std::vector<T> factor(dropout ? size_t(kQueryTile * kKeyTile) : 0), dropped(factor.size());
  std::vector<T> kt(size_t(D * kKeyTile)), vt(size_t(D * kKeyTile));
  const KeyRange keys = key_range(mask, p.Tk);
  for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, keys.hi - j0);
    const T *k_tile = kb + j0 * k.ld, *v_tile = vb + j0 * v.ld;
    transpose_rows(kt.data(), k_tile, nk, D, k.ld);
    if (need_ds) transpose_rows(vt.data(), v_tile, nk, D, v.ld);
    // Under causal masking, queries before j0 - shift see none of these keys.
    for (int64_t i0 = p.causal ? std::max<int64_t>(0, j0 - p.causal_shift()) : 0; i0 < p.Tq; i0 += kQueryTile) {
      const int64_t nq = std::min(kQueryTile, p.Tq - i0);
      const T *q_tile = qb + i0 * q.ld, *do_tile = dob + i0 * dout.ld;
      gemm_tile(false, prob.data(), kKeyTile, q_tile, q.ld, int64_t(1), kt.data(), nk, nq, nk, D);  // S = Q K^T
      for (int64_t i = 0; i < nq; ++i) {
        T* row = prob.data() + i * kKeyTile;
        const T row_lse = T(lse_b[i0 + i]);
        if (row_lse == kNegInf) {  // a row that sees no key at all
          std::fill(row, row + nk, T(0));
          continue;
        }
        for (int64_t j = 0; j < nk; ++j) row[j] = p.allowed(mask, i0 + i, j0 + j) ? row[j] * scale : kNegInf;
        exp_shifted(row, nk, row_lse);
      }
      const T* used = prob.data();  // the probabilities the forward multiplied V by
      if (dropout) {
        for (int64_t i = 0; i < nq; ++i) {
          T* f_i = factor.data() + i * kKeyTile;
          const T* p_i = prob.data() + i * kKeyTile;
          dropout_factors(f_i, p, bh, i0 + i, j0, nk);
          for (int64_t j = 0; j < nk; ++j) dropped[size_t(i * kKeyTile + j)] = p_i[j] * f_i[j];
        }
        used = dropped.data();
      }
      if (dvb)  // dV += (P * F)^T dO
        gemm_tile(true, dvb + j0 * dv.ld, dv.ld, used, int64_t(1), kKeyTile, do_tile, dout.ld, nk, D, nq);
      if (!need_ds) continue;
      gemm_tile(false, ds.data(), kKeyTile, do_tile, dout.ld, int64_t(1), vt.data(), nk, nq, nk, D);  // dO V^T
      for (int64_t i = 0; i < nq; ++i) {
        T* ds_i = ds.data() + i * kKeyTile;  // dS overwrites dO V^T, pre-multiplied by scale
        const T* p_i = prob.data() + i * kKeyTile;
        const T delta_i = delta[size_t(i0 + i)];
        if (dropout) {
          const T* f_i = factor.data() + i * kKeyTile;
          for (int64_t j = 0; j < nk; ++j) ds_i[j] = scale * p_i[j] * (ds_i[j] * f_i[j] - delta_i);
        } else {
          for (int64_t j = 0; j < nk; ++j) ds_i[j] = scale * p_i[j] * (ds_i[j] - delta_i);
        }
      }
      if (dqb)  // dQ += dS K
        gemm_tile(true, dqb + i0 * dq.ld, dq.ld, ds.data(), kKeyTile, int64_t(1), k_tile, k.ld, nq, D, nk);
      if (dkb)  // dK += dS^T Q
        gemm_tile(true, dkb + j0 * dk.ld, dk.ld, ds.data(), int64_t(1), kKeyTile, q_tile, q.ld, nk, D, nq);
    }
  }
}

Problem problem_of(const View& q, const View& k, const View& key_mask, const AttentionArgs& args) {
  Problem p{q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], args.causal,
            key_mask.data ? key_mask.ptr<const int32_t>() : nullptr};
  p.dropout_p = args.dropout_p;
  p.dropout_seed = args.dropout_seed;
  p.dropout_offset = args.dropout_offset;
  return p;
}

// Multiply-adds of the Tq x Tk x D products, halved under causal masking.
double product_flops(const Problem& p) {
  return 2.0 * double(p.B * p.H) * double(p.Tq) * double(p.Tk) * double(p.D) * (p.causal ? 0.5 : 1.0);
}

// The kernels compute in f32 (f64 for f64 inputs), reading every operand
// through its strides with D contiguous. Anything else is converted around
// them (KernelOperands): bf16 inputs widen to f32 exactly, so the f32 kernels
// then multiply exactly those values, and a bf16 output is rounded once.
DType compute_dtype(const View& q) { return q.dtype == DType::F64 ? DType::F64 : DType::F32; }

bool fit(std::initializer_list<const View*> views, DType dtype) {
  return std::all_of(views.begin(), views.end(), [&](const View* v) {
    return !v->data || (v->dtype == dtype && (v->shape[3] == 1 || v->strides[3] == 1));
  });
}

}  // namespace

void CpuBackend::attention_forward(const View& out, const View& lse, const View& q, const View& k, const View& v,
                                   const View& key_mask, const AttentionArgs& args) {
  const DType t = compute_dtype(q);
  if (!fit({&out, &q, &k, &v}, t)) {
    KernelOperands ops(*this);
    attention_forward(ops.out(out, t), lse, ops.in(q, t), ops.in(k, t), ops.in(v, t), key_mask, args);
    return ops.finish();
  }
  const Problem p = problem_of(q, k, key_mask, args);
  ProfileScope profile("attention_forward", 2 * product_flops(p));  // S = Q K^T and P V
  const int64_t query_tiles = (p.Tq + kQueryTile - 1) / kQueryTile;
  cpu::dispatch_floating(q.dtype, "attention_forward", [&](auto zero) {
    using T = decltype(zero);
    cpu::parallel_for(p.B * p.H * query_tiles, kQueryTile * p.Tk * p.D, [&](int64_t task) {
      attention_forward_tile<T>(p, T(args.scale), task / query_tiles, (task % query_tiles) * kQueryTile,
                                heads_of<T>(out), lse.ptr<float>(), heads_of<const T>(q), heads_of<const T>(k),
                                heads_of<const T>(v));
    });
  });
}

void CpuBackend::attention_backward(const View& dq, const View& dk, const View& dv, const View& dout, const View& q,
                                    const View& k, const View& v, const View& out, const View& lse,
                                    const View& key_mask, const AttentionArgs& args) {
  const DType t = compute_dtype(q);
  if (!fit({&dq, &dk, &dv, &dout, &q, &k, &v, &out}, t)) {
    KernelOperands ops(*this);
    attention_backward(ops.out(dq, t), ops.out(dk, t), ops.out(dv, t), ops.in(dout, t), ops.in(q, t), ops.in(k, t),
                       ops.in(v, t), ops.in(out, t), lse, key_mask, args);
    return ops.finish();
  }
  const Problem p = problem_of(q, k, key_mask, args);
  ProfileScope profile("attention_backward", 5 * product_flops(p));  // S, dV, dP, dQ and dK
  cpu::dispatch_floating(q.dtype, "attention_backward", [&](auto zero) {
    using T = decltype(zero);
    cpu::parallel_for(p.B * p.H, p.Tq * p.Tk * p.D, [&](int64_t bh) {
      attention_backward_head<T>(p, T(args.scale), bh, heads_of<T>(dq), heads_of<T>(dk), heads_of<T>(dv),
                                 heads_of<const T>(dout), heads_of<const T>(q), heads_of<const T>(k),
                                 heads_of<const T>(v), heads_of<const T>(out), lse.ptr<const float>());
    });
  });
}

}  // namespace engine
