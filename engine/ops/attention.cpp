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

#include <array>
#include <cmath>

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
  if (dropout_p > 0) {  // one uniform per probability, B * H * Tq * Tk of them
    call.args.dropout_p = dropout_p;
    call.args.dropout_seed = generator->seed();
    call.args.dropout_offset = generator->reserve(uint64_t(B * H * Tq * Tk));
  }
  if (key_padding_mask.defined()) call.mask = keep_mask_i32(key_padding_mask);
  return call;
}

// What the kernels read: contiguous, and under autocast rounded to bf16 by
// the same copy; their outputs and gradients are f32 then.
DType kernel_dtype(const Tensor& t) { return autocast_dtype().value_or(t.dtype()); }
DType output_dtype(const Tensor& t) { return autocast_dtype() ? DType::F32 : t.dtype(); }
Tensor kernel_input(const Tensor& t, DType dtype) { return t.detach().to(dtype).contiguous(); }

// The forward on kernel inputs: out [B, H, Tq, D] and lse [B, H, Tq].
std::pair<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, const Call& call,
                                  DType out_dtype) {
  Tensor out = Tensor::empty(q.shape(), out_dtype, q.device());
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
  // GPT-2's q, k, v are permuted views of one c_attn output: kernel_input
  // copies them contiguous once here, since the kernel walks rows of D.
  const DType in = kernel_dtype(q), out_dtype = output_dtype(q);
  auto [out, lse] = forward(kernel_input(q, in), kernel_input(k, in), kernel_input(v, in), call, out_dtype);

  // The backward keeps the inputs as given (in node.inputs) rather than their
  // contiguous copies: re-copying costs little time, keeping copies costs a
  // second q, k, v per layer of activation memory.
  record(out, kOp, {q, k, v},
         [call, lse, y = out.detach(), in](const Tensor& grad, const Node& node) -> std::vector<Tensor> {
           auto buffer = [&](size_t i) {  // in the kernel's output dtype
             return node.needs_grad(i) ? Tensor::empty(node.inputs[i].shape(), y.dtype(), y.device()) : Tensor();
           };
           std::vector<Tensor> grads{buffer(0), buffer(1), buffer(2)};
           backward(grads[0], grads[1], grads[2], kernel_input(grad, in), kernel_input(node.inputs[0], in),
                    kernel_input(node.inputs[1], in), kernel_input(node.inputs[2], in), y, lse, call);
           // Each gradient in its input's dtype (they differ only under autocast with bf16 inputs).
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
  // One copy (and under autocast one rounding) of all three, which the
  // backward keeps instead of the input: as large in f32, half in bf16, and
  // no second copy to make.
  const DType in = kernel_dtype(qkv);
  auto parts = [](const Tensor& packed) {
    return std::array{packed.select(0, 0), packed.select(0, 1), packed.select(0, 2)};
  };
  const Tensor packed = kernel_input(qkv, in);
  const auto [qc, kc, vc] = parts(packed);
  auto [out, lse] = forward(qc, kc, vc, call, output_dtype(qkv));

  record(out, kOp, {edge_only(qkv)},
         [call, lse, y = out.detach(), packed, parts](const Tensor& grad, const Node& node) -> std::vector<Tensor> {
           const Tensor& qkv = node.inputs[0];
           // The three gradients land in one buffer: the input's whole gradient, as it is.
           Tensor dqkv = Tensor::empty(qkv.shape(), y.dtype(), y.device());
           const auto [dq, dk, dv] = parts(dqkv);
           const auto [q, k, v] = parts(packed);
           backward(dq, dk, dv, kernel_input(grad, packed.dtype()), q, k, v, y, lse, call);
           return {dqkv.to(qkv.dtype())};
         });
  return out;
}

}  // namespace engine
