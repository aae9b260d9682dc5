// See attention_plan.h.
#include "engine/cuda/attention_plan.h"

#include "engine/error.h"

#include <optional>

namespace engine::cuda {

namespace {

bool unit_d(const View& v) { return !v.data || v.shape[3] == 1 || v.strides[3] == 1; }

// A [B, H, T, D] view's strides over B, H and T: 0 over a dim of size 1,
// where any stride is as good; none for an operand that plays no part.
HeadStrides head_strides(const View& v) {
  if (!v.data) return {};
  auto stride = [&](size_t d) { return v.shape[d] == 1 ? 0 : v.strides[d]; };
  return {stride(0), stride(1), stride(2)};
}

}  // namespace

bool tensor_core_fits(const AttentionViews& a) {
  bool fits = a.q.dtype == DType::BF16 && a.q.shape[3] <= 128 &&
              (a.out.dtype == DType::F32 || a.out.dtype == DType::BF16) && unit_d(a.out);
  for (const View* v : {&a.q, &a.k, &a.v, &a.dout})
    fits = fits && (!v->data || v->dtype == DType::BF16) && unit_d(*v);
  std::optional<DType> grad_dtype;
  for (const View* g : {&a.dq, &a.dk, &a.dv}) {
    if (!g->data) continue;
    fits = fits && (g->dtype == DType::F32 || g->dtype == DType::BF16) && grad_dtype.value_or(g->dtype) == g->dtype &&
           unit_d(*g);
    grad_dtype = g->dtype;
  }
  return fits;
}

AttentionShape attention_shape(const AttentionViews& a, const View& key_mask, const AttentionArgs& args) {
  AttentionShape s;
  s.B = a.q.shape[0], s.H = a.q.shape[1], s.Tq = a.q.shape[2], s.Tk = a.k.shape[2], s.D = a.q.shape[3];
  s.key_mask = key_mask.data ? key_mask.ptr<const int32_t>() : nullptr;
  s.causal = args.causal;
  s.scale = args.scale;
  s.dropout_p = args.dropout_p;
  s.dropout_seed = args.dropout_seed;
  s.dropout_offset = args.dropout_offset;
  s.strides = {head_strides(a.q),    head_strides(a.k),  head_strides(a.v),  head_strides(a.out),
               head_strides(a.dout), head_strides(a.dq), head_strides(a.dk), head_strides(a.dv)};
  s.out_bf16 = a.out.dtype == DType::BF16;
  for (const View* g : {&a.dq, &a.dk, &a.dv})
    if (g->data) s.grads_bf16 = g->dtype == DType::BF16;
  return s;
}

double attention_flops(const AttentionShape& s, double per_product) {
  return per_product * double(s.B * s.H) * double(s.Tq) * double(s.Tk) * double(s.D) * (s.causal ? 0.5 : 1.0);
}

void check_attention_dtypes(const View& q, const View& out, const char* op) {
  const bool mixed = q.dtype == DType::BF16 && (out.dtype == DType::F32 || out.dtype == DType::BF16);
  check(mixed || ((q.dtype == DType::F32 || q.dtype == DType::F64) && out.dtype == q.dtype),
        "{} on CUDA: needs f32 or f64 inputs and outputs, or bf16 inputs with f32 or bf16 outputs; got {} and {}", op,
        dtype_name(q.dtype), dtype_name(out.dtype));
}

}  // namespace engine::cuda
