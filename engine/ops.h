// The differentiable operations on tensors. Each checks its arguments once,
// dispatches to the device's backend, and records its backward. Files in
// engine/ops/ hold one family each, forward and backward side by side.
#pragma once

#include "engine/tensor.h"

#include <optional>
#include <utility>
#include <vector>

namespace engine {

// ---- elementwise, NumPy broadcasting (ops/elementwise.cpp) ----
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor maximum(const Tensor& a, const Tensor& b);
Tensor add(const Tensor& a, double s);
Tensor mul(const Tensor& a, double s);
Tensor neg(const Tensor& a);
Tensor exp(const Tensor& a);
Tensor log(const Tensor& a);
Tensor sqrt(const Tensor& a);
Tensor tanh(const Tensor& a);
Tensor pow(const Tensor& a, double exponent);
Tensor square(const Tensor& a);
Tensor where(const Tensor& condition, const Tensor& a, const Tensor& b);  // condition: any dtype, != 0 is true
Tensor masked_fill(const Tensor& a, const Tensor& mask, double value);   // a where mask == 0, value elsewhere

inline Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
inline Tensor operator-(const Tensor& a) { return neg(a); }
inline Tensor operator+(const Tensor& a, double s) { return add(a, s); }
inline Tensor operator-(const Tensor& a, double s) { return add(a, -s); }
inline Tensor operator*(const Tensor& a, double s) { return mul(a, s); }
inline Tensor operator/(const Tensor& a, double s) { return mul(a, 1.0 / s); }
inline Tensor operator*(double s, const Tensor& a) { return mul(a, s); }

// ---- reductions (ops/reduce.cpp); empty dims means all dims ----
Tensor sum(const Tensor& a, const std::vector<int64_t>& dims = {}, bool keepdim = false);
Tensor mean(const Tensor& a, const std::vector<int64_t>& dims = {}, bool keepdim = false);
Tensor max(const Tensor& a, int64_t dim, bool keepdim = false);  // values; gradient to the first max
Tensor argmax(const Tensor& a, int64_t dim = -1);                 // i64, not differentiable
// Sums `grad` down to `shape` (the inverse of broadcasting), for backward functions.
Tensor sum_to(const Tensor& grad, const Shape& shape);

// ---- shape (ops/shape.cpp; most are Tensor methods) ----
Tensor cat(const std::vector<Tensor>& tensors, int64_t dim);
std::vector<Tensor> split(const Tensor& a, int64_t split_size, int64_t dim);
std::vector<Tensor> split(const Tensor& a, const std::vector<int64_t>& sizes, int64_t dim);

// ---- matrix multiply (ops/matmul.cpp) ----
// a [..., M, K] @ b [K, N], or batched a [B..., M, K] @ b [B..., K, N] with equal
// batch dims. Transposed views are passed to the GEMM as flags, not copied.
Tensor matmul(const Tensor& a, const Tensor& b);
// c + a @ b as one GEMM that reads c as its addend, for a 2-D b (a weight) and
// c of the product's shape and dtype; otherwise add(c, matmul(a, b)). Under
// autocast the sum is rounded to bf16 once, where add(c, matmul(a, b)) would
// round the product first.
// With a bias [N] as well, c + a @ b + bias, the bias in the same epilogue.
Tensor addmm(const Tensor& c, const Tensor& a, const Tensor& b, const Tensor& bias = {});
// How a Linear stores its weight: torch.nn.Linear [out, in] or HF Conv1D [in, out].
enum class WeightLayout { OutIn, InOut };
// y = x W^T + b (OutIn) or x W + b (InOut); bias may be undefined.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias, WeightLayout layout);
// gelu_new(linear(x, weight, bias)), with the bias and GELU in the GEMM's epilogue.
// Under autocast the result is bf16: it feeds the next GEMM (engine/precision.h).
Tensor linear_gelu(const Tensor& x, const Tensor& weight, const Tensor& bias, WeightLayout layout);
// linear(linear_gelu(x, w1, b1), w2, b2): a GPT-2 MLP. Its backward also takes
// the GELU inside a GEMM: the dX GEMM of the second layer hands back the
// gradient of the GELU's input (rounded once), with no pass of its own.
Tensor linear_gelu_linear(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                          WeightLayout layout);
// cat(x, extra, -1) @ cat(w, w_extra, 0) + bias, i.e. x w + extra w_extra + bias,
// for w [K1, N] and w_extra [K2, N]: a layer with K2 more inputs (a low-rank
// adapter's update is one). One GEMM over K1 + K2 when nothing needs a copy:
// x has K2 columns of room (layer_norm's room), which extra is written into,
// and w_extra's rows follow w's in memory, all in the product's dtype. The sum
// is then rounded once. Where the bias's row follows w_extra's too, and the
// buffer goes on to joint_rows(K1, K2) rows with zeros, and x has room for as
// many columns, the bias is one more row of that GEMM, against a column of
// ones written into the room: cuBLASLt's bias epilogue costs gpt2-large's
// c_attn more (128 against 117 us). Otherwise addmm(x @ w, extra, w_extra)
// with the bias in one of the two GEMMs; the values agree up to rounding.
Tensor concat_linear(const Tensor& x, const Tensor& extra, const Tensor& w, const Tensor& w_extra,
                     const Tensor& bias = {});
// K1 + K2 + 1 rounded up to a multiple of 8: the rows of [w; w_extra; bias; 0]
// for concat_linear (cuBLASLt takes a slow path for other K: 740 us at 1289).
int64_t joint_rows(int64_t k1, int64_t k2);
// Whether next's elements start where t's end, both contiguous, in one buffer:
// how concat_linear's stacked operands must lie.
bool stacked_after(const Tensor& next, const Tensor& t);

// ---- indexing (ops/index.cpp) ----
// Indices (and cross_entropy's targets) may be on the host for a GPU source: they are checked on
// the host and copied over, which spares the wait a check on the device costs.
Tensor index_select(const Tensor& a, int64_t dim, const Tensor& index);  // index: i32/i64 1-D
Tensor embedding(const Tensor& weight, const Tensor& ids);                // weight [V, C], ids any shape

// ---- neural-network ops (ops/nn.cpp, ops/attention.cpp, ops/loss.cpp) ----
// Over the last dim, in x's dtype (f32 for bf16 x, as torch's autocast). `out`
// bf16 rounds the result once in the kernel: for an output that only feeds
// linear layers under autocast, which would round it anyway, a cast pass saved.
// room > 0 leaves that many spare columns after each row of the result (its
// rows lie C + room apart), marked for a consumer that appends columns to its
// input (concat_linear): the values are the same either way.
Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps = 1e-5,
                  std::optional<DType> out = {}, int64_t room = 0);
Tensor gelu_new(const Tensor& x);  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
Tensor softmax(const Tensor& x, int64_t dim = -1);
Tensor log_softmax(const Tensor& x, int64_t dim = -1);
enum class Reduction { None, Mean, Sum };
// logits [N, K], targets i32/i64 [N]. Mean divides by the count of non-ignored targets.
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index = -100,
                     Reduction reduction = Reduction::Mean);
// q [B, H, Tq, D], k and v [B, H, Tk, D]; key_padding_mask [B, Tk] (nonzero =
// attend) or undefined. If causal, query i sees key j <= i + Tk - Tq (so a
// KV-cache step needs no extra mask). A row that sees no key gives zeros and
// zero gradient. Scale defaults to 1/sqrt(D). With dropout_p > 0 the
// probabilities are dropped (inverted dropout, as torch's dropout_p) with a
// mask drawn from `generator`, which must then be given. Returns [B, H, Tq, D],
// laid out [B, Tq, H, D] in memory so that merging the heads is a view; bf16
// under autocast (engine/precision.h). q, k and v may have any strides.
Tensor scaled_dot_product_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& key_padding_mask = Tensor(), bool causal = true,
                                    std::optional<double> scale = std::nullopt, double dropout_p = 0,
                                    Generator* generator = nullptr);
// The same attention for q, k and v stacked in one tensor [3, B, H, T, D]
// (self-attention; GPT-2's c_attn makes all three at once): the backward
// returns one [3, B, H, T, D] gradient rather than three that autograd would
// have to add into zeros of the whole, laid out as the input (GPT-2's view of
// one [B, T, 3, H, D] tensor stays one), and nothing is copied but for
// autocast's one cast.
Tensor scaled_dot_product_attention_packed(const Tensor& qkv, const Tensor& key_padding_mask = Tensor(),
                                           bool causal = true, std::optional<double> scale = std::nullopt,
                                           double dropout_p = 0, Generator* generator = nullptr);
// Inverted dropout; identity when !training or p == 0.
Tensor dropout(const Tensor& x, double p, bool training, Generator& gen);
// residual + dropout(x, ...), the same mask from the same draws, in one pass: a
// residual connection's add. With a bf16 x and an f32 residual the dropped x
// is added unrounded, and x's gradient is dropped straight into bf16.
Tensor dropout_add(const Tensor& residual, const Tensor& x, double p, bool training, Generator& gen);
// {r, layer_norm(r, weight, bias, eps, out, room)} for r = dropout_add(residual, x, ...):
// a transformer's residual stream and the layer norm that reads it, in one pass
// where the backend has a kernel for it. Values and gradients are the two ops'.
std::pair<Tensor, Tensor> dropout_add_layer_norm(const Tensor& residual, const Tensor& x, double p, bool training,
                                                 Generator& gen, const Tensor& weight, const Tensor& bias,
                                                 double eps = 1e-5, std::optional<DType> out = std::nullopt,
                                                 int64_t room = 0);

}  // namespace engine
