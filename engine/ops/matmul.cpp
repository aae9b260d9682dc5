// Matrix multiply and Linear. Transposed views reach the GEMM as flags, so
// x @ W.T costs no copy; a 2-D weight shared across a batch is folded into
// one large GEMM; a Linear's bias (and linear_gelu's GELU) ride in the GEMM's
// epilogue, and addmm's addend in its beta; concat_linear's extra inputs
// join x's columns in one GEMM where they fit. The backward skips dW entirely
// when W is frozen. Under autocast (engine/precision.h) the GEMMs multiply
// and return bf16; each gradient comes back in its input's dtype.
#include "engine/ops/common.h"
#include "engine/precision.h"

#include <optional>

namespace engine {

namespace {

// The last two dims of a tensor as a row-major GEMM operand: plain (unit
// column stride) or transposed (unit row stride), with one batch stride.
struct Operand {
  const void* data;
  bool transposed;
  int64_t ld;
  int64_t batch_stride;
};

std::optional<Operand> as_operand(const Tensor& t) {
  const int64_t r = t.dim();
  const int64_t rows = t.shape()[size_t(r - 2)], cols = t.shape()[size_t(r - 1)];
  const int64_t row_stride = t.strides()[size_t(r - 2)], col_stride = t.strides()[size_t(r - 1)];
  Operand op{t.data_ptr(), false, 0, 0};
  if (col_stride == 1 || cols <= 1) {  // row-major as stored
    op.ld = rows <= 1 ? std::max<int64_t>(cols, 1) : row_stride;
    if (op.ld < std::max<int64_t>(cols, 1)) return std::nullopt;  // rows overlap (an expanded view)
  } else if (row_stride == 1 || rows <= 1) {  // the transpose of a row-major matrix
    op.transposed = true;
    op.ld = cols <= 1 ? std::max<int64_t>(rows, 1) : col_stride;
    if (op.ld < std::max<int64_t>(rows, 1)) return std::nullopt;
  } else {
    return std::nullopt;
  }
  // All batch dims must collapse into one stride.
  int64_t expected = -1;
  for (int64_t d = r - 3; d >= 0; --d) {
    if (t.shape()[size_t(d)] == 1) continue;
    if (expected >= 0 && t.strides()[size_t(d)] != expected) return std::nullopt;
    if (expected < 0) op.batch_stride = t.strides()[size_t(d)];
    expected = t.strides()[size_t(d)] * t.shape()[size_t(d)];
  }
  return op;
}

Operand operand(Tensor& t) {
  if (auto op = as_operand(t)) return *op;
  t = t.contiguous();
  return *as_operand(t);
}

// What is applied to a product after the GEMM (engine/backend.h, GemmArgs).
struct Epilogue {
  Tensor bias;      // [N], out's dtype, contiguous: added to every row
  Tensor pre_gelu;  // out's shape, contiguous: receives out before the GELU (defined: apply one)
  Tensor gelu_grad_of;  // out's shape, contiguous: a GELU's input; out = product * gelu'(it) (defined: apply)
  // Out's shape and dtype, added to the product (GEMM beta 1); no GELU with it. Its rows may lie further
  // apart than out's (View::even_row_stride) where the GEMM is not batched; otherwise it is copied.
  Tensor addend;
};

// out [batch..., M, N] = a [batch..., M, K] @ b [batch..., K, N]; b_shared: b is 2-D.
// a and b share a dtype; out has it too, or is f32 for bf16 inputs.
void gemm_into(const Tensor& out, Tensor a, Tensor b, int64_t batch, bool b_shared, const Epilogue& epilogue) {
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
  Operand A = operand(a), B = operand(b);
  GemmArgs g;
  g.dtype = a.dtype();
  g.c_dtype = out.dtype();
  g.m = M, g.n = N, g.k = K;
  g.a = A.data, g.trans_a = A.transposed, g.lda = A.ld, g.stride_a = A.batch_stride;
  g.b = B.data, g.trans_b = B.transposed, g.ldb = B.ld, g.stride_b = b_shared ? 0 : B.batch_stride;
  g.c = out.data_ptr(), g.ldc = N, g.stride_c = M * N;
  g.batch = batch;
  g.bias = epilogue.bias.defined() ? epilogue.bias.data_ptr() : nullptr;
  g.gelu = epilogue.pre_gelu.defined();
  g.gelu_grad = epilogue.gelu_grad_of.defined();
  g.pre_gelu = g.gelu ? epilogue.pre_gelu.data_ptr() : g.gelu_grad ? epilogue.gelu_grad_of.data_ptr() : nullptr;
  // One GEMM reads the addend's rows any even distance apart; a batch reads it laid out as C.
  Tensor addend = epilogue.addend;
  if (addend.defined()) {
    std::optional<int64_t> ld = batch == 1 ? view_of(addend).even_row_stride() : std::nullopt;
    if (!ld || *ld < N) addend = addend.contiguous(), ld = N;
    g.addend = addend.data_ptr(), g.ld_addend = *ld, g.beta = 1;
  }
  if (out.numel() == 0) return;
  if (K == 0) {  // an empty sum: C is the addend plus the bias, either, or zeros (linear_gelu does not fuse K = 0)
    const Tensor& bias = epilogue.bias;
    if (addend.defined()) Tensor(out).copy_(bias.defined() ? add(addend, bias) : addend);
    else if (bias.defined()) Tensor(out).copy_(bias.expand(out.shape()));
    else Tensor(out).fill_(0.0);
    return;
  }
  backend_for(out.device()).gemm(g);
}

// Whether a's batch dims fold into its rows as a view: every row one row
// stride after the last, across the batch (contiguous, or a layer norm's
// output with room after its rows).
bool rows_fold(const Tensor& a) { return a.is_contiguous() || (a.size(-2) > 1 && view_of(a).even_row_stride()); }

// a @ b, then the epilogue, computed in `compute` (the operands converted to
// it outside autograd; Tensor::to leaves a tensor already in it as it is) and
// written in `out_dtype`. Shapes are matmul's, already checked.
Tensor product(const Tensor& a, const Tensor& b, DType compute, DType out_dtype, const Epilogue& epilogue = {}) {
  const bool b_shared = b.dim() == 2;
  Shape out_shape(a.shape().begin(), a.shape().end() - 2);
  int64_t batch = numel(out_shape);
  out_shape.push_back(a.size(-2));
  out_shape.push_back(b.size(-1));
  Tensor out = Tensor::empty(out_shape, out_dtype, a.device());
  Tensor a_in = a.detach().to(compute);
  if (b_shared && a.dim() > 2 && rows_fold(a_in)) {
    // Fold the batch into M: one [batch*M, K] @ [K, N] GEMM is faster than many.
    a_in = a_in.view({-1, a.size(-1)});
    batch = 1;
  }
  gemm_into(out, a_in, b.detach().to(compute), batch, b_shared, epilogue);
  return out;
}

// Whether a bias can ride in the epilogue of a product in `dtype` on x's
// device: it has that dtype, or under autocast is rounded to it, as torch's
// autocast rounds it. `op` names the caller in the shape check.
bool bias_fits(const Tensor& bias, int64_t outputs, DType dtype, const Tensor& x, const char* op) {
  check(bias.dim() == 1 && bias.size(0) == outputs, "{}: bias shape {} for {} outputs", op, shape_str(bias.shape()),
        outputs);
  const bool dtype_fits = bias.dtype() == dtype || (autocast_dtype() == dtype && bias.dtype() == DType::F32);
  return dtype_fits && bias.device() == x.device();
}

// What a composed layer adds its bias as: rounded as the fused epilogue's is.
Tensor bias_for(const Tensor& y, const Tensor& bias) {
  return autocast_dtype() == y.dtype() ? bias.to(y.dtype()) : bias;
}

// The dtype one matmul multiplies in and returns. Under autocast, f32 and
// bf16 operands meet in bf16 (engine/precision.h); otherwise both operands
// must have it.
DType product_dtype(const Tensor& a, const Tensor& b) {
  const std::optional<DType> autocast = autocast_dtype_for(a.dtype());
  if (autocast && autocast_dtype_for(b.dtype())) {
    if (a.device() != b.device())
      fail("matmul: operands on {} and {}", a.device().str(), b.device().str());
    return *autocast;
  }
  detail::check_compatible(a, b, "matmul");
  return a.dtype();
}

void check_chain(const Tensor& a, const Tensor& b) {
  detail::check_floating(a, "matmul");
  detail::check_floating(b, "matmul");
  check(a.dim() >= 2 && b.dim() >= 2, "matmul: needs rank >= 2, got shapes {} and {}", shape_str(a.shape()),
        shape_str(b.shape()));
  check(a.size(-1) == b.size(-2), "matmul: shapes {} and {} do not chain (K {} vs {})", shape_str(a.shape()),
        shape_str(b.shape()), a.size(-1), b.size(-2));
  if (b.dim() > 2) {
    const Shape a_batch(a.shape().begin(), a.shape().end() - 2), b_batch(b.shape().begin(), b.shape().end() - 2);
    check(b_batch == a_batch, "matmul: batch dims differ, shapes {} and {}", shape_str(a.shape()),
          shape_str(b.shape()));
  }
}

// What the backward of a @ b keeps: dA = g B^T reads B and dB = A^T g reads A,
// so an operand is kept only when the other one wants a gradient. A frozen
// weight's input activation, the largest tensor of most layers, is then freed
// after the forward.
std::vector<Tensor> saved_operands(const Tensor& a, const Tensor& b) {
  return {b.requires_grad() ? a : edge_only(a), a.requires_grad() ? b : edge_only(b)};
}

// The weight gradient of out = a @ b, dB = a^T g: one GEMM over every row of
// the batch for a shared 2-D b, else a batched one.
Tensor weight_gradient(const Tensor& a, const Tensor& b, const Tensor& g, DType compute) {
  if (b.dim() == 2 && a.dim() > 2)
    return product(a.reshape({-1, a.size(-1)}).transpose(0, 1), g.reshape({-1, g.size(-1)}), compute, b.dtype());
  return product(a.transpose(-1, -2), g, compute, b.dtype());
}

// The gradients of a0 and a1 in out = a0 @ b0 + a1 @ b1, [da0 | da1] = g [b0; b1]^T,
// as one GEMM that reads g once, given joint_b = [b0; b1] (one buffer; it may go
// on, as concat_linear's bias row does): da0 and da1 are then views of its
// output, rows as far apart as joint_b has rows. Only where both want a
// gradient in the product's dtype and neither has received one so far (that
// would be added to its own columns alone); otherwise nothing is filled in.
void joint_gradients(const Tensor& g, const Node& n, const Tensor& joint_b, DType compute, std::vector<Tensor>& grads) {
  const Tensor &a0 = n.inputs[0], &a1 = n.inputs[2];
  if (!n.needs_grad(0) || !n.needs_grad(2) || a0.dtype() != compute || a1.dtype() != compute ||
      n.has_gradient_so_far(0) || n.has_gradient_so_far(2))
    return;
  const Tensor both = product(g, joint_b.transpose(0, 1), compute, compute);
  grads[0] = detail::make_view(both, a0.shape(), both.strides(), both.offset());
  grads[2] = detail::make_view(both, a1.shape(), both.strides(), both.offset() + a0.size(-1));
}

// The backward of out = a @ b, or of a sum of `products` such products with
// inputs a0, b0, a1, b1, ... (+ addend and bias, the inputs after them, whose
// gradients are g summed to their shapes): each gradient in its input's
// dtype, multiplied at the forward's precision. An a's gradient adds what it
// has received so far in the GEMM's epilogue, rounded once (it may be another
// product's joint gradient, rows apart). With joint_b, a0's and a1's
// gradients may come from one GEMM (joint_gradients).
Node::BackwardFn product_backward(DType compute, size_t products = 1, Tensor joint_b = {}) {
  return [compute, products, joint_b](const Tensor& g, const Node& n) {
    std::vector<Tensor> grads(n.inputs.size());
    if (joint_b.defined()) joint_gradients(g, n, joint_b, compute, grads);
    for (size_t i = 0; i < 2 * products; i += 2) {
      const Tensor &a = n.inputs[i], &b = n.inputs[i + 1];
      if (n.needs_grad(i) && !grads[i].defined()) {  // a's gradient so far rides in as the GEMM's addend
        Epilogue sum;
        sum.addend = n.take_gradient_so_far(i, a.dtype(), true);
        grads[i] = product(g, b.transpose(-1, -2), compute, a.dtype(), sum);
      }
      if (n.needs_grad(i + 1)) grads[i + 1] = weight_gradient(a, b, g, compute);  // skipped for frozen weights
    }
    for (size_t i = 2 * products; i < n.inputs.size(); ++i)
      if (n.needs_grad(i)) grads[i] = sum_to(g.to(n.inputs[i].dtype()), n.inputs[i].shape());
    return grads;
  };
}

}  // namespace

Tensor matmul(const Tensor& a, const Tensor& b) {
  check_chain(a, b);
  const DType dtype = product_dtype(a, b);
  Tensor out = product(a, b, dtype, dtype);
  record(out, "matmul", saved_operands(a, b), product_backward(dtype));
  return out;
}

Tensor addmm(const Tensor& c, const Tensor& a, const Tensor& b, const Tensor& bias) {
  check_chain(a, b);
  const DType dtype = product_dtype(a, b);
  Shape out_shape = a.shape();
  out_shape.back() = b.size(-1);
  const bool with_bias = bias.defined(), fits = !with_bias || bias_fits(bias, b.size(-1), dtype, a, "addmm");
  // One GEMM where c can be its addend as it is; otherwise composed (add broadcasts and promotes).
  if (b.dim() != 2 || c.shape() != out_shape || c.dtype() != dtype || c.device() != a.device() || !fits) {
    const Tensor sum = add(c, matmul(a, b));
    return with_bias ? add(sum, bias_for(sum, bias)) : sum;
  }
  Epilogue epilogue;
  epilogue.addend = c.detach().contiguous();
  if (with_bias) epilogue.bias = bias.detach().to(dtype).contiguous();
  Tensor out = product(a, b, dtype, dtype, epilogue);
  std::vector<Tensor> inputs = saved_operands(a, b);
  inputs.push_back(edge_only(c));  // its gradient is g itself
  if (with_bias) inputs.push_back(edge_only(bias));  // a sum of g
  record(out, "addmm", std::move(inputs), product_backward(dtype));
  return out;
}

namespace {

// A Linear's product x @ w with its bias in the GEMM's epilogue, where the
// sum is not empty and the bias fits (bias_fits). Otherwise `fused` is false
// and the layer is composed of separate ops.
struct LinearPlan {
  Tensor w;  // [in, out]
  DType dtype;
  bool fused;
};

LinearPlan plan_linear(const Tensor& x, const Tensor& weight, const Tensor& bias, WeightLayout layout, const char* op) {
  check(weight.dim() == 2, "{}: weight must be 2-D, got shape {}", op, shape_str(weight.shape()));
  LinearPlan plan{layout == WeightLayout::InOut ? weight : weight.transpose(0, 1), DType::F32, false};
  check_chain(x, plan.w);
  plan.dtype = product_dtype(x, plan.w);
  plan.fused = bias.defined() && bias_fits(bias, plan.w.size(1), plan.dtype, x, op) && plan.w.size(0) > 0;
  return plan;
}

// x @ w + bias as one GEMM, and the GELU after it when pre_gelu (x @ w + bias's
// shape and dtype) is given to receive its input. Not recorded.
Tensor fused_product(const Tensor& x, const LinearPlan& plan, const Tensor& bias, const Tensor& pre_gelu = {}) {
  Epilogue epilogue;
  epilogue.bias = bias.detach().to(plan.dtype).contiguous();
  epilogue.pre_gelu = pre_gelu;
  return product(x, plan.w, plan.dtype, plan.dtype, epilogue);
}

std::vector<Tensor> linear_inputs(const Tensor& x, const LinearPlan& plan, const Tensor& bias) {
  std::vector<Tensor> inputs = saved_operands(x, plan.w);
  inputs.push_back(edge_only(bias));  // its gradient is a sum of g
  return inputs;
}

Tensor empty_output(const Tensor& x, const LinearPlan& plan) {
  Shape shape = x.shape();
  shape.back() = plan.w.size(1);
  return Tensor::empty(shape, plan.dtype, x.device());
}

// Records h = gelu(pre), pre = x @ w + bias, as linear_gelu: the backward goes
// through the GELU first, from the saved pre-activation.
void record_linear_gelu(Tensor& h, const Tensor& pre, const Tensor& x, const LinearPlan& plan, const Tensor& bias) {
  record(h, "linear_gelu", linear_inputs(x, plan, bias),
         [backward = product_backward(plan.dtype), pre](const Tensor& g, const Node& n) {
           Tensor dpre = Tensor::empty(pre.shape(), pre.dtype(), pre.device()), gc = g.to(pre.dtype()).contiguous();
           detail::backend_of(pre).gelu_backward(view_of(dpre), view_of(gc), view_of(pre));
           return backward(dpre, n);
         });
}

}  // namespace

Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias, WeightLayout layout) {
  const LinearPlan plan = plan_linear(x, weight, bias, layout, "linear");
  if (!plan.fused) {
    const Tensor y = matmul(x, plan.w);
    return bias.defined() ? add(y, bias_for(y, bias)) : y;
  }
  Tensor out = fused_product(x, plan, bias);
  record(out, "linear", linear_inputs(x, plan, bias), product_backward(plan.dtype));
  return out;
}

Tensor linear_gelu(const Tensor& x, const Tensor& weight, const Tensor& bias, WeightLayout layout) {
  const LinearPlan plan = plan_linear(x, weight, bias, layout, "linear_gelu");
  if (!plan.fused) return gelu_new(linear(x, weight, bias, layout));
  const Tensor pre = empty_output(x, plan);
  Tensor h = fused_product(x, plan, bias, pre);
  record_linear_gelu(h, pre, x, plan, bias);
  return h;
}

Tensor linear_gelu_linear(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                          WeightLayout layout) {
  const LinearPlan fc = plan_linear(x, w1, b1, layout, "linear_gelu_linear");
  if (!fc.fused) return linear(linear_gelu(x, w1, b1, layout), w2, b2, layout);
  const Tensor pre = empty_output(x, fc);
  Tensor h = fused_product(x, fc, b1, pre);
  const LinearPlan proj = plan_linear(h, w2, b2, layout, "linear_gelu_linear");
  if (!proj.fused) {
    record_linear_gelu(h, pre, x, fc, b1);
    return linear(h, w2, b2, layout);
  }
  // Two nodes: pre = x @ w1 + b1, a plain linear's; and out = gelu(pre) @ w2 +
  // b2, whose backward hands pre its gradient straight from the GEMM.
  Tensor pre_node = pre;
  record(pre_node, "linear", linear_inputs(x, fc, b1), product_backward(fc.dtype));
  Tensor out = fused_product(h, proj, b2);
  const Tensor h_kept = w2.requires_grad() ? h : Tensor();  // only dW2 reads it
  std::vector<Tensor> inputs = {pre_node, proj.w, edge_only(b2)};
  record(out, "linear_gelu_linear", std::move(inputs),
         [compute = proj.dtype, h_kept](const Tensor& g, const Node& n) {
           const Tensor &pre = n.inputs[0], &w = n.inputs[1];
           std::vector<Tensor> grads(3);
           if (n.needs_grad(0)) {  // dpre = (g w^T) * gelu'(pre), in the GEMM's epilogue
             Epilogue through_gelu;
             through_gelu.gelu_grad_of = pre;
             grads[0] = product(g, w.transpose(0, 1), compute, pre.dtype(), through_gelu);
           }
           if (n.needs_grad(1)) grads[1] = weight_gradient(h_kept, w, g, compute);
           if (n.needs_grad(2)) grads[2] = sum_to(g.to(n.inputs[2].dtype()), n.inputs[2].shape());
           return grads;
         });
  return out;
}

namespace {

// x with extra written into its room: the [..., K1 + K2] input of concat_linear's
// one GEMM; with bias_row, also a column of ones and zeros up to `rows` columns
// (the bias row's factor, and the zero rows' after it). Undefined where x has
// no such room.
Tensor joint_input(const Tensor& x, const Tensor& extra, int64_t rows, bool bias_row, DType dtype) {
  const int64_t k1 = x.size(-1), k2 = extra.size(-1);
  if (x.dtype() != dtype || x.impl().room < rows - k1 || x.strides().back() != 1 || x.numel() == 0) return Tensor();
  auto columns = [&](int64_t first, int64_t count) {
    Shape shape = x.shape();
    shape.back() = count;
    return detail::make_view(x, shape, x.strides(), x.offset() + first);
  };
  columns(k1, k2).copy_(extra.detach());
  if (bias_row) {
    columns(k1 + k2, 1).fill_(1.0);
    if (rows > k1 + k2 + 1) columns(k1 + k2 + 1, rows - k1 - k2 - 1).fill_(0.0);
  }
  return columns(0, rows);
}

// [w; w_extra] as one [K1 + K2, N] matrix where w_extra's rows follow w's in
// one buffer, row-major, in `dtype`; with bias_row, [w; w_extra; bias; 0] of
// joint_rows(K1, K2) rows. Undefined where the buffer does not hold them.
Tensor joint_weight(const Tensor& w, const Tensor& w_extra, const Tensor& bias, bool bias_row, DType dtype) {
  const int64_t n = w.size(1);
  const int64_t rows = bias_row ? joint_rows(w.size(0), w_extra.size(0)) : w.size(0) + w_extra.size(0);
  const size_t bytes = size_t(w.offset() + rows * n) * dtype_size(dtype);
  const bool stacked = w.dtype() == dtype && w_extra.dtype() == dtype && stacked_after(w_extra, w) &&
                       (!bias_row || (bias.dtype() == dtype && stacked_after(bias, w_extra)));
  if (!stacked || w.impl().storage->nbytes < bytes) return Tensor();
  return detail::make_view(w, {rows, n}, {n, 1}, w.offset());
}

}  // namespace

int64_t joint_rows(int64_t k1, int64_t k2) { return (k1 + k2 + 1 + 7) / 8 * 8; }

bool stacked_after(const Tensor& next, const Tensor& t) {
  return next.defined() && t.defined() && t.is_contiguous() && next.is_contiguous() &&
         t.impl().storage == next.impl().storage && next.offset() == t.offset() + t.numel();
}

Tensor concat_linear(const Tensor& x, const Tensor& extra, const Tensor& w, const Tensor& w_extra,
                     const Tensor& bias) {
  check(w.dim() == 2 && w_extra.dim() == 2 && w.size(1) == w_extra.size(1),
        "concat_linear: weights of shapes {} and {} do not stack", shape_str(w.shape()), shape_str(w_extra.shape()));
  Shape lead = x.shape(), extra_lead = extra.shape();
  lead.back() = extra_lead.back() = 0;
  check(x.dim() >= 1 && lead == extra_lead, "concat_linear: inputs of shapes {} and {} do not sit side by side",
        shape_str(x.shape()), shape_str(extra.shape()));
  check_chain(x, w);
  check_chain(extra, w_extra);
  const DType dtype = product_dtype(x, w);
  const bool with_bias = bias.defined();
  const bool fits = (!with_bias || bias_fits(bias, w.size(1), dtype, x, "concat_linear")) &&
                    product_dtype(extra, w_extra) == dtype;
  Tensor joint_w, joint_x;
  auto one_gemm = [&](bool bias_row) {
    joint_w = joint_weight(w, w_extra, bias, bias_row, dtype);
    joint_x = joint_w.defined() ? joint_input(x, extra, joint_w.size(0), bias_row, dtype) : Tensor();
    return joint_x.defined();
  };
  // The bias as a row of the stacked weight where it is one and x has room for its column, else in the
  // GEMM's epilogue; else two GEMMs.
  const bool bias_row = fits && with_bias && one_gemm(true);
  if (!bias_row && !(fits && one_gemm(false))) {
    // Under autocast the bias rides in the second GEMM, which passes over the output anyway: cuBLASLt's
    // bias epilogue costs the large one more (gpt2-large's c_attn: 4.85 against 4.5 ms a step).
    const bool bias_last = autocast_dtype_for(x.dtype()).has_value();
    const Tensor y = linear(x, w, bias_last ? Tensor() : bias, WeightLayout::InOut);
    return addmm(y, extra, w_extra, bias_last ? bias : Tensor());
  }
  Epilogue epilogue;
  if (with_bias && !bias_row) epilogue.bias = bias.detach().to(dtype).contiguous();
  Tensor out = product(joint_x, joint_w, dtype, dtype, epilogue);
  std::vector<Tensor> inputs = saved_operands(x, w);
  for (const Tensor& t : saved_operands(extra, w_extra)) inputs.push_back(t);
  if (with_bias) inputs.push_back(edge_only(bias));  // a sum of g
  record(out, "concat_linear", std::move(inputs), product_backward(dtype, 2, joint_w));
  return out;
}

}  // namespace engine
