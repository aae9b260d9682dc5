// Matrix multiply and Linear. Transposed views reach the GEMM as flags, so
// x @ W.T costs no copy; a 2-D weight shared across a batch is folded into
// one large GEMM. The backward skips dW entirely when W is frozen.
#include "engine/ops/common.h"

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

// out [batch..., M, N] = a [batch..., M, K] @ b [batch..., K, N]; b_shared: b is 2-D.
void gemm_into(const Tensor& out, Tensor a, Tensor b, int64_t batch, bool b_shared) {
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
  Operand A = operand(a), B = operand(b);
  GemmArgs g;
  g.dtype = out.dtype();
  g.m = M, g.n = N, g.k = K;
  g.a = A.data, g.trans_a = A.transposed, g.lda = A.ld, g.stride_a = A.batch_stride;
  g.b = B.data, g.trans_b = B.transposed, g.ldb = B.ld, g.stride_b = b_shared ? 0 : B.batch_stride;
  g.c = out.data_ptr(), g.ldc = N, g.stride_c = M * N;
  g.batch = batch;
  if (out.numel() == 0) return;
  if (K == 0) {
    Tensor(out).fill_(0.0);
    return;
  }
  backend_for(out.device()).gemm(g);
}

}  // namespace

Tensor matmul(const Tensor& a, const Tensor& b) {
  detail::check_compatible(a, b, "matmul");
  detail::check_floating(a, "matmul");
  check(a.dim() >= 2 && b.dim() >= 2, "matmul: needs rank >= 2, got shapes {} and {}", shape_str(a.shape()),
        shape_str(b.shape()));
  check(a.size(-1) == b.size(-2), "matmul: shapes {} and {} do not chain (K {} vs {})", shape_str(a.shape()),
        shape_str(b.shape()), a.size(-1), b.size(-2));
  const bool b_shared = b.dim() == 2;
  Shape batch_shape(a.shape().begin(), a.shape().end() - 2);
  if (!b_shared) {
    Shape b_batch(b.shape().begin(), b.shape().end() - 2);
    check(b_batch == batch_shape, "matmul: batch dims differ, shapes {} and {}", shape_str(a.shape()),
          shape_str(b.shape()));
  }
  Shape out_shape = batch_shape;
  out_shape.push_back(a.size(-2));
  out_shape.push_back(b.size(-1));
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());

  int64_t batch = numel(batch_shape);
  Tensor a_in = a.detach();
  if (b_shared && a.dim() > 2 && a.is_contiguous()) {
    // Fold the batch into M: one [batch*M, K] @ [K, N] GEMM is faster than many.
    a_in = a_in.view({-1, a.size(-1)});
    batch = 1;
  }
  gemm_into(out, a_in, b.detach(), batch, b_shared);

  record(out, "matmul", {a, b}, [b_shared](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    const Tensor &a = n.inputs[0], &b = n.inputs[1];
    Tensor ga, gb;
    if (n.needs_grad(0)) ga = matmul(g, b.transpose(-1, -2));
    if (n.needs_grad(1)) {  // the weight-gradient GEMM: skipped for frozen weights
      gb = b_shared && a.dim() > 2 ? matmul(a.reshape({-1, a.size(-1)}).transpose(0, 1), g.reshape({-1, g.size(-1)}))
                                   : matmul(a.transpose(-1, -2), g);
    }
    return {ga, gb};
  });
  return out;
}

Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias, WeightLayout layout) {
  check(weight.dim() == 2, "linear: weight must be 2-D, got shape {}", shape_str(weight.shape()));
  Tensor y = matmul(x, layout == WeightLayout::InOut ? weight : weight.transpose(0, 1));
  if (bias.defined()) {
    check(bias.dim() == 1 && bias.size(0) == y.size(-1), "linear: bias shape {} for {} outputs",
          shape_str(bias.shape()), y.size(-1));
    y = add(y, bias);
  }
  return y;
}

}  // namespace engine
