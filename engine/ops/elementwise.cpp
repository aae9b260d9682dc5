// Elementwise ops with NumPy broadcasting and torch's promotion of mixed
// floating dtypes. The backward of a broadcast input sums the gradient back to
// the input's shape (sum_to).
#include "engine/ops/common.h"

#include <optional>

namespace engine {

namespace detail {

void check_same_device(const Tensor& a, const Tensor& b, const char* op) {
  if (a.device() != b.device())
    fail("{}: operands on different devices ({} and {})", op, a.device().str(), b.device().str());
}

void check_compatible(const Tensor& a, const Tensor& b, const char* op) {
  check_same_device(a, b, op);
  check(a.dtype() == b.dtype(), "{}: operands of different dtypes ({} and {})", op, dtype_name(a.dtype()),
        dtype_name(b.dtype()));
}

void check_floating(const Tensor& a, const char* op) {
  check(is_floating(a.dtype()), "{}: needs a floating tensor, got {}", op, dtype_name(a.dtype()));
}

View broadcast_view(const Tensor& t, const Shape& shape) {
  View v = view_of(t);
  size_t lead = shape.size() - t.shape().size();
  v.shape = shape;
  v.strides.assign(shape.size(), 0);
  for (size_t d = 0; d < t.shape().size(); ++d)
    v.strides[lead + d] = t.shape()[d] == shape[lead + d] ? t.strides()[d] : 0;
  return v;
}

Tensor make_view(const Tensor& t, const Shape& shape, const Shape& strides, int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = t.impl().storage;
  impl->shape = shape;
  impl->strides = strides;
  impl->offset = offset;
  impl->dtype = t.dtype();
  return Tensor(std::move(impl));
}

Tensor empty_with_room(const Shape& shape, DType dtype, Device device, int64_t room) {
  if (room == 0) return Tensor::empty(shape, dtype, device);
  check(room > 0 && !shape.empty(), "room: {} columns after rows of shape {}", room, shape_str(shape));
  Shape wide = shape;
  wide.back() += room;
  const Tensor rows = Tensor::empty(wide, dtype, device);
  Tensor t = make_view(rows, shape, rows.strides(), 0);
  t.impl().room = room;
  return t;
}

}  // namespace detail

using detail::backend_of;
using detail::broadcast_view;

namespace {

// Floating operands of two dtypes meet in the wider one, as torch promotes
// them (a bf16 product under autocast plus an f32 residual is f32); bf16 with
// f16 meet in f32. The backends read the narrower operand as it is, and each
// gradient goes back in its input's dtype (grad_for). Nothing when the dtypes
// agree (or are not both floating: check_compatible then names them).
std::optional<DType> promotion(const Tensor& a, const Tensor& b) {
  const DType x = a.dtype(), y = b.dtype();
  if (x == y || !is_floating(x) || !is_floating(y)) return std::nullopt;
  if (x == DType::F64 || y == DType::F64) return DType::F64;
  return DType::F32;
}

Tensor binary_forward(BinaryOp op, const Tensor& a, const Tensor& b, const char* name) {
  const std::optional<DType> wide = promotion(a, b);
  if (wide) detail::check_same_device(a, b, name);
  else detail::check_compatible(a, b, name);
  detail::check_floating(a, name);
  Shape shape = broadcast_shapes(a.shape(), b.shape());
  Tensor out = Tensor::empty(shape, wide.value_or(a.dtype()), a.device());
  backend_of(a).binary(op, view_of(out), broadcast_view(a, shape), broadcast_view(b, shape));
  return out;
}

Tensor unary_forward(UnaryOp op, const Tensor& a, double scalar, const char* name) {
  detail::check_floating(a, name);
  Tensor out = Tensor::empty(a.shape(), a.dtype(), a.device());
  backend_of(a).unary(op, view_of(out), view_of(a), scalar);
  return out;
}

// The gradient of input i: summed back over its broadcast dims, in its dtype.
Tensor grad_for(const Node& node, size_t i, const Tensor& grad) {
  return node.needs_grad(i) ? sum_to(grad, node.inputs[i].shape()).to(node.inputs[i].dtype()) : Tensor();
}

}  // namespace

// ---- binary ----

Tensor add(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward(BinaryOp::Add, a, b, "add");
  record(out, "add", {edge_only(a), edge_only(b)}, [](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    return {grad_for(n, 0, g), grad_for(n, 1, g)};
  });
  return out;
}

Tensor sub(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward(BinaryOp::Sub, a, b, "sub");
  record(out, "sub", {edge_only(a), edge_only(b)}, [](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    return {grad_for(n, 0, g), n.needs_grad(1) ? grad_for(n, 1, neg(g)) : Tensor()};
  });
  return out;
}

Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward(BinaryOp::Mul, a, b, "mul");
  record(out, "mul", {a, b}, [](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    const Tensor &a = n.inputs[0], &b = n.inputs[1];
    return {n.needs_grad(0) ? grad_for(n, 0, mul(g, b)) : Tensor(),
            n.needs_grad(1) ? grad_for(n, 1, mul(g, a)) : Tensor()};
  });
  return out;
}

Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward(BinaryOp::Div, a, b, "div");
  record(out, "div", {a, b}, [y = out.detach()](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    const Tensor& b = n.inputs[1];
    Tensor g_over_b = div(g, b);
    return {grad_for(n, 0, g_over_b), n.needs_grad(1) ? grad_for(n, 1, neg(mul(g_over_b, y))) : Tensor()};
  });
  return out;
}

Tensor maximum(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward(BinaryOp::Maximum, a, b, "maximum");
  record(out, "maximum", {a, b}, [](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    // Ties send the gradient to `a`, matching the forward's choice.
    Tensor b_wins = binary_forward(BinaryOp::Greater, n.inputs[1], n.inputs[0], "maximum");
    return {n.needs_grad(0) ? grad_for(n, 0, mul(g, add(neg(b_wins), 1.0))) : Tensor(),
            n.needs_grad(1) ? grad_for(n, 1, mul(g, b_wins)) : Tensor()};
  });
  return out;
}

// ---- scalar and unary ----

Tensor add(const Tensor& a, double s) {
  Tensor out = unary_forward(UnaryOp::AddScalar, a, s, "add");
  record(out, "add_scalar", {a}, [](const Tensor& g, const Node&) -> std::vector<Tensor> { return {g}; });
  return out;
}

Tensor mul(const Tensor& a, double s) {
  Tensor out = unary_forward(UnaryOp::MulScalar, a, s, "mul");
  record(out, "mul_scalar", {a}, [s](const Tensor& g, const Node&) -> std::vector<Tensor> { return {mul(g, s)}; });
  return out;
}

Tensor neg(const Tensor& a) {
  Tensor out = unary_forward(UnaryOp::Neg, a, 0, "neg");
  record(out, "neg", {a}, [](const Tensor& g, const Node&) -> std::vector<Tensor> { return {neg(g)}; });
  return out;
}

Tensor exp(const Tensor& a) {
  Tensor out = unary_forward(UnaryOp::Exp, a, 0, "exp");
  record(out, "exp", {a}, [y = out.detach()](const Tensor& g, const Node&) -> std::vector<Tensor> {
    return {mul(g, y)};
  });
  return out;
}

Tensor log(const Tensor& a) {
  Tensor out = unary_forward(UnaryOp::Log, a, 0, "log");
  record(out, "log", {a}, [](const Tensor& g, const Node& n) -> std::vector<Tensor> { return {div(g, n.inputs[0])}; });
  return out;
}

Tensor sqrt(const Tensor& a) {
  Tensor out = unary_forward(UnaryOp::Sqrt, a, 0, "sqrt");
  record(out, "sqrt", {a}, [y = out.detach()](const Tensor& g, const Node&) -> std::vector<Tensor> {
    return {div(mul(g, 0.5), y)};
  });
  return out;
}

Tensor tanh(const Tensor& a) {
  Tensor out = unary_forward(UnaryOp::Tanh, a, 0, "tanh");
  record(out, "tanh", {a}, [y = out.detach()](const Tensor& g, const Node&) -> std::vector<Tensor> {
    return {mul(g, add(neg(square(y)), 1.0))};  // 1 - tanh^2
  });
  return out;
}

Tensor pow(const Tensor& a, double exponent) {
  Tensor out = unary_forward(UnaryOp::Pow, a, exponent, "pow");
  record(out, "pow", {a}, [exponent](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    return {mul(g, mul(pow(n.inputs[0], exponent - 1), exponent))};
  });
  return out;
}

Tensor square(const Tensor& a) {
  Tensor out = unary_forward(UnaryOp::Square, a, 0, "square");
  record(out, "square", {a}, [](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    return {mul(mul(g, n.inputs[0]), 2.0)};
  });
  return out;
}

// ---- selection ----

Tensor where(const Tensor& condition, const Tensor& a, const Tensor& b) {
  if (const auto wide = promotion(a, b)) return where(condition, a.to(*wide), b.to(*wide));
  detail::check_compatible(a, b, "where");
  detail::check_floating(a, "where");
  if (condition.device() != a.device())
    fail("where: condition on {}, values on {}", condition.device().str(), a.device().str());
  Shape shape = broadcast_shapes(broadcast_shapes(condition.shape(), a.shape()), b.shape());
  Tensor out = Tensor::empty(shape, a.dtype(), a.device());
  backend_of(a).where(view_of(out), broadcast_view(condition, shape), broadcast_view(a, shape),
                      broadcast_view(b, shape));
  record(out, "where", {a, b}, [condition = condition.detach()](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    Tensor zero = Tensor::zeros({}, g.dtype(), g.device());
    return {n.needs_grad(0) ? grad_for(n, 0, where(condition, g, zero)) : Tensor(),
            n.needs_grad(1) ? grad_for(n, 1, where(condition, zero, g)) : Tensor()};
  });
  return out;
}

Tensor masked_fill(const Tensor& a, const Tensor& mask, double value) {
  return where(mask, Tensor::full({}, value, a.dtype(), a.device()), a);
}

}  // namespace engine
