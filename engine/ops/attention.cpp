// scaled_dot_product_attention: softmax(scale * q k^T, masked) v as one fused
// op. The kernel saves only the per-row log-sum-exp (lse), never the Tq x Tk
// probabilities; the backward recomputes them from q, k and lse.
//
// Shapes: q [B, H, Tq, D], k and v [B, H, Tk, D], key_padding_mask [B, Tk];
// or, packed, all three stacked [3, B, H, T, D].
// Masking: query i attends key j when key_padding_mask[b, j] != 0 and, if
// causal, j <= i + (Tk - Tq): the queries are the last Tq positions, so a
// KV-cache step (new queries against cached plus new keys) needs no mask of
// its own, and Tq = Tk is plain causal attention.
//
// A query row that can attend no key at all (say a padded prefix under causal
// masking) outputs zeros and gets zero gradient. PyTorch's SDPA gives NaN
// there (HF GPT-2 works around it); zeros keep padded positions harmless
// without any workaround in the model.
#include "engine/ops/common.h"
#include "engine/precision.h"
#include "engine/rng.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>

namespace engine {

namespace {

constexpr const char* kOp = "scaled_dot_product_attention";

// The mask as contiguous i32, nonzero to keep, whatever its dtype: where() treats any
// nonzero as true, so a float mask of 0.5 keeps its key rather than truncating to 0.
// An i32 mask (a tokenizer's attention_mask) is already that: no kernels per call.
Tensor keep_mask_i32(const Tensor& mask) {
  if (mask.dtype() == DType::I32) return mask.detach().contiguous();
  Tensor one = Tensor::ones({}, DType::F32, mask.device());
  Tensor zero = Tensor::zeros({}, DType::F32, mask.device());
  return where(mask.detach(), one, zero).to(DType::I32).contiguous();
}

View view_or_null(const Tensor& t) { return t.defined() ? view_of(t) : View{}; }

void check_arguments(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask) {
  check(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "{}: q, k, v must be [B, H, T, D], got shapes {}, {}, {}", kOp,
        shape_str(q.shape()), shape_str(k.shape()), shape_str(v.shape()));
  check(k.shape() == v.shape() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
        "{}: q [B, H, Tq, D] needs k and v [B, H, Tk, D], got shapes {}, {}, {}", kOp, shape_str(q.shape()),
        shape_str(k.shape()), shape_str(v.shape()));
  detail::check_compatible(q, k, kOp);
  detail::check_compatible(q, v, kOp);
  detail::check_floating(q, kOp);
  if (!mask.defined()) return;
  check(mask.dim() == 2 && mask.size(0) == k.size(0) && mask.size(1) == k.size(2),
        "{}: key_padding_mask must be [B, Tk] = [{}, {}], got {}", kOp, k.size(0), k.size(2), shape_str(mask.shape()));
  if (mask.device() != q.device())
    fail("{}: key_padding_mask on {}, q on {}", kOp, mask.device().str(), q.device().str());
}

// One attention call: the kernel arguments and the mask, shared by the
// forward and the backward of both front ends below.
struct Call {
  AttentionArgs args;
  Tensor mask;  // i32 [B, Tk] or undefined
};

Call make_call(const Tensor& q, const Tensor& k, const Tensor& key_padding_mask, bool causal,
               std::optional<double> scale, double dropout_p, Generator* generator) {
  check(dropout_p >= 0 && dropout_p < 1, "{}: dropout_p must be in [0, 1), got {}", kOp, dropout_p);
  check(dropout_p == 0 || generator, "{}: dropout_p = {} needs a generator", kOp, dropout_p);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  Call call;
  call.args.causal = causal;
  call.args.scale = scale.value_or(D > 0 ? 1.0 / std::sqrt(double(D)) : 1.0);
  if (dropout_p > 0) {  // one 16-bit uniform per probability: half a word each
    call.args.dropout_p = dropout_p;
    call.args.dropout_seed = generator->seed();
    call.args.dropout_offset = generator->reserve((uint64_t(B * H * Tq * Tk) + 1) / 2);
  }
  if (key_padding_mask.defined()) call.mask = keep_mask_i32(key_padding_mask);
  return call;
}

// Under autocast the kernels read f32 or bf16 inputs as bf16 (rounded by one
// cast) and write a bf16 output, as torch's autocast does; otherwise
// everything is in the inputs' dtype. Gradients come back in each input's dtype.
DType kernel_dtype(const Tensor& t) { return autocast_dtype_for(t.dtype()).value_or(t.dtype()); }

// The dims of t, outermost in memory first: t.permute(order) is contiguous
// when t is a permutation of a dense tensor, as GPT-2's q, k and v are (views
// of one [B, T, 3, H, D] tensor) and as the gradient of its head merge is.
std::vector<int64_t> memory_order(const Tensor& t) {
  std::vector<int64_t> order(size_t(t.dim()));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return t.strides()[size_t(a)] > t.strides()[size_t(b)]; });
  return order;
}

std::vector<int64_t> inverse(const std::vector<int64_t>& order) {
  std::vector<int64_t> back(order.size());
  for (size_t i = 0; i < order.size(); ++i) back[size_t(order[i])] = int64_t(i);
  return back;
}

// The kernels read any strides: a kernel input is t itself, or t cast to
// `dtype` laid out in memory as t is, so the cast sweeps memory in order.
Tensor kernel_input(const Tensor& t, DType dtype) {
  if (t.dtype() == dtype) return t.detach();
  const std::vector<int64_t> order = memory_order(t);
  const Tensor dense = t.detach().permute(order);
  return dense.is_contiguous() ? dense.to(dtype).permute(inverse(order)) : t.detach().to(dtype);
}

// A new tensor of t's shape, laid out in memory as t is: a gradient the
// next op back (a reshape of t's source) receives as a plain contiguous tensor.
Tensor empty_like_layout(const Tensor& t, DType dtype) {
  const std::vector<int64_t> order = memory_order(t);
  Shape shape;
  for (int64_t d : order) shape.push_back(t.size(d));
  return Tensor::empty(shape, dtype, t.device()).permute(inverse(order));
}

// The forward on kernel inputs: out [B, H, Tq, D] and lse [B, H, Tq]. out is
// laid out [B, Tq, H, D] in memory, so that merging its heads back into
// [B, Tq, H * D] (out.permute(0, 2, 1, 3), then a reshape) moves no data.
std::pair<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, const Call& call,
                                  DType out_dtype) {
  Tensor out =
      Tensor::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, out_dtype, q.device()).permute({0, 2, 1, 3});
  Tensor lse = Tensor::empty({q.size(0), q.size(1), q.size(2)}, DType::F32, q.device());
  if (q.numel() == 0 || k.numel() == 0)  // no query, no key or D = 0: every output row is empty (zeros)
    out.zero_();
  else
    detail::backend_of(q).attention_forward(view_of(out), view_of(lse), view_of(q), view_of(k), view_of(v),
                                            view_or_null(call.mask), call.args);
  return {out, lse};
}

// The backward on kernel inputs, into the given gradient buffers (each may
// be undefined: not wanted).
void backward(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dout, const Tensor& q,
              const Tensor& k, const Tensor& v, const Tensor& y, const Tensor& lse, const Call& call) {
  if (q.numel() == 0 || k.numel() == 0) {
    for (const Tensor* g : {&dq, &dk, &dv})
      if (g->defined()) Tensor(*g).zero_();
    return;
  }
  detail::backend_of(q).attention_backward(view_or_null(dq), view_or_null(dk), view_or_null(dv), view_of(dout),
                                           view_of(q), view_of(k), view_of(v), view_of(y), view_of(lse),
                                           view_or_null(call.mask), call.args);
}

}  // namespace

Tensor scaled_dot_product_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& key_padding_mask,
                                    bool causal, std::optional<double> scale, double dropout_p, Generator* generator) {
  check_arguments(q, k, v, key_padding_mask);
  const Call call = make_call(q, k, key_padding_mask, causal, scale, dropout_p, generator);
  const DType in = kernel_dtype(q);
  auto [out, lse] = forward(kernel_input(q, in), kernel_input(k, in), kernel_input(v, in), call, in);

  // The backward keeps the inputs as given (in node.inputs) rather than their
  // bf16 copies: rounding again costs little time, keeping copies costs a
  // second q, k, v per layer of activation memory.
  record(out, kOp, {q, k, v}, [call, lse, y = out.detach(), in](const Tensor& grad, const Node& node) {
    // The kernels write one dtype for all three gradients: q's, converted after for k or v if theirs differs.
    const DType grad_dtype = node.inputs[0].dtype();
    auto buffer = [&](size_t i) {
      return node.needs_grad(i) ? empty_like_layout(node.inputs[i], grad_dtype) : Tensor();
    };
    std::vector<Tensor> grads{buffer(0), buffer(1), buffer(2)};
    backward(grads[0], grads[1], grads[2], kernel_input(grad, in), kernel_input(node.inputs[0], in),
             kernel_input(node.inputs[1], in), kernel_input(node.inputs[2], in), y, lse, call);
    for (size_t i = 0; i < grads.size(); ++i)
      if (grads[i].defined()) grads[i] = grads[i].to(node.inputs[i].dtype());
    return grads;
  });
  return out;
}

Tensor scaled_dot_product_attention_packed(const Tensor& qkv, const Tensor& key_padding_mask, bool causal,
                                           std::optional<double> scale, double dropout_p, Generator* generator) {
  check(qkv.dim() == 5 && qkv.size(0) == 3, "{}: packed q, k, v must be [3, B, H, T, D], got shape {}", kOp,
        shape_str(qkv.shape()));
  const Tensor q = qkv.detach().select(0, 0), k = qkv.detach().select(0, 1), v = qkv.detach().select(0, 2);
  check_arguments(q, k, v, key_padding_mask);
  const Call call = make_call(q, k, key_padding_mask, causal, scale, dropout_p, generator);
  // One cast of all three (none without autocast), which the backward keeps
  // instead of the input: as large in f32, half in bf16, and no second cast.
  const DType in = kernel_dtype(qkv);
  auto parts = [](const Tensor& packed) {
    return std::array{packed.select(0, 0), packed.select(0, 1), packed.select(0, 2)};
  };
  const Tensor packed = kernel_input(qkv, in);
  const auto [qc, kc, vc] = parts(packed);
  auto [out, lse] = forward(qc, kc, vc, call, in);

  record(out, kOp, {edge_only(qkv)},
         [call, lse, y = out.detach(), packed, parts](const Tensor& grad, const Node& node) -> std::vector<Tensor> {
           const Tensor& qkv = node.inputs[0];
           // The three gradients land in one buffer laid out as the input:
           // the input's whole gradient, as it is.
           Tensor dqkv = empty_like_layout(qkv, qkv.dtype());
           const auto [dq, dk, dv] = parts(dqkv);
           const auto [q, k, v] = parts(packed);
           backward(dq, dk, dv, kernel_input(grad, packed.dtype()), q, k, v, y, lse, call);
           return {dqkv};
         });
  return out;
}

}  // namespace engine
