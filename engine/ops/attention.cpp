// scaled_dot_product_attention: softmax(scale * q k^T, masked) v as one fused
// op. The kernel saves only the per-row log-sum-exp (lse), never the Tq x Tk
// probabilities; the backward recomputes them from q, k and lse.
//
// Shapes: q [B, H, Tq, D], k and v [B, H, Tk, D], key_padding_mask [B, Tk].
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

#include <cmath>

namespace engine {

namespace {

constexpr const char* kOp = "scaled_dot_product_attention";

// The mask as contiguous i32 0/1 whatever its dtype: where() treats any
// nonzero as true, so a float mask of 0.5 keeps its key rather than truncating to 0.
Tensor keep_mask_i32(const Tensor& mask) {
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
  check(mask.device() == q.device(), "{}: key_padding_mask on {}, q on {}", kOp, mask.device().str(),
        q.device().str());
}

}  // namespace

Tensor scaled_dot_product_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& key_padding_mask,
                                    bool causal, std::optional<double> scale, double dropout_p, Generator* generator) {
  check_arguments(q, k, v, key_padding_mask);
  check(dropout_p >= 0 && dropout_p < 1, "{}: dropout_p must be in [0, 1), got {}", kOp, dropout_p);
  check(dropout_p == 0 || generator, "{}: dropout_p = {} needs a generator", kOp, dropout_p);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  AttentionArgs args;
  args.causal = causal;
  args.scale = scale.value_or(D > 0 ? 1.0 / std::sqrt(double(D)) : 1.0);
  if (dropout_p > 0) {  // one uniform per probability, B * H * Tq * Tk of them
    args.dropout_p = dropout_p;
    args.dropout_seed = generator->seed();
    args.dropout_offset = generator->reserve(uint64_t(B * H * Tq * Tk));
  }

  // GPT-2's q, k, v are permuted views of one c_attn output: copy them
  // contiguous once here, since the kernel walks rows of D. Under autocast
  // the same copy rounds them to bf16; out and the gradients stay f32.
  const std::optional<DType> compute = autocast_dtype();
  const DType in_dtype = compute ? *compute : q.dtype(), out_dtype = compute ? DType::F32 : q.dtype();
  auto kernel_input = [in_dtype](const Tensor& t) { return t.detach().to(in_dtype).contiguous(); };
  Tensor qc = kernel_input(q), kc = kernel_input(k), vc = kernel_input(v);
  Tensor mask = key_padding_mask.defined() ? keep_mask_i32(key_padding_mask) : Tensor();
  Tensor out = Tensor::empty(q.shape(), out_dtype, q.device());
  Tensor lse = Tensor::empty({B, H, Tq}, DType::F32, q.device());
  // No query, no key or D = 0: nothing to launch, and every output row is empty (zeros).
  const bool empty = q.numel() == 0 || k.numel() == 0;
  if (empty)
    out.zero_();
  else
    detail::backend_of(q).attention_forward(view_of(out), view_of(lse), view_of(qc), view_of(kc), view_of(vc),
                                            view_or_null(mask), args);

  // The backward keeps the inputs as given (in node.inputs) rather than their
  // contiguous copies: re-copying costs little time, keeping copies costs a
  // second q, k, v per layer of activation memory.
  record(out, kOp, {q, k, v},
         [mask, lse, y = out.detach(), empty, args, kernel_input](const Tensor& grad,
                                                                  const Node& node) -> std::vector<Tensor> {
           const bool want_q = node.needs_grad(0), want_k = node.needs_grad(1), want_v = node.needs_grad(2);
           const Tensor &q = node.inputs[0], &k = node.inputs[1];
           auto grad_buffer = [&](bool wanted, const Tensor& like) {  // in the kernel's output dtype
             return wanted ? Tensor::empty(like.shape(), y.dtype(), like.device()) : Tensor();
           };
           Tensor dq = grad_buffer(want_q, q), dk = grad_buffer(want_k, k), dv = grad_buffer(want_v, k);
           if (empty) {
             for (Tensor* g : {&dq, &dk, &dv})
               if (g->defined()) g->zero_();
           } else {
             Tensor qc = kernel_input(q), kc = kernel_input(k), vc = kernel_input(node.inputs[2]);
             Tensor dout = kernel_input(grad);
             detail::backend_of(q).attention_backward(view_or_null(dq), view_or_null(dk), view_or_null(dv),
                                                      view_of(dout), view_of(qc), view_of(kc), view_of(vc), view_of(y),
                                                      view_of(lse), view_or_null(mask), args);
           }
           // Each gradient in its input's dtype (they differ only under autocast with bf16 inputs).
           std::vector<Tensor> grads{dq, dk, dv};
           for (size_t i = 0; i < grads.size(); ++i)
             if (grads[i].defined()) grads[i] = grads[i].to(node.inputs[i].dtype());
           return grads;
         });
  return out;
}

}  // namespace engine
