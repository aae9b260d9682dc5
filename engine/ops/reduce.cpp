// Reductions over dims (sum, mean, max) and sum_to, the inverse of
// broadcasting that every broadcasting op's backward needs.
#include "engine/ops/common.h"

#include <algorithm>

namespace engine {

using detail::backend_of;

namespace {

// Sorted, unique, wrapped dims; empty means all.
std::vector<int64_t> normalize_dims(const std::vector<int64_t>& dims, int64_t rank, const char* op) {
  std::vector<int64_t> out;
  if (dims.empty()) {
    for (int64_t d = 0; d < rank; ++d) out.push_back(d);
    return out;
  }
  for (int64_t d : dims) out.push_back(wrap_dim(d, rank, op));
  std::sort(out.begin(), out.end());
  check(std::adjacent_find(out.begin(), out.end()) == out.end(), "{}: a dim is repeated", op);
  return out;
}

Shape keepdim_shape(const Shape& shape, const std::vector<int64_t>& dims) {
  Shape out = shape;
  for (int64_t d : dims) out[size_t(d)] = 1;
  return out;
}

Shape squeezed_shape(const Shape& shape, const std::vector<int64_t>& dims) {
  Shape out;
  for (size_t d = 0; d < shape.size(); ++d)
    if (!std::binary_search(dims.begin(), dims.end(), int64_t(d))) out.push_back(shape[d]);
  return out;
}

Tensor reduce_forward(ReduceOp op, const Tensor& a, const std::vector<int64_t>& dims, const char* name) {
  detail::check_floating(a, name);
  Tensor out = Tensor::empty(keepdim_shape(a.shape(), dims), a.dtype(), a.device());
  if (a.numel() == 0) return out.fill_(0.0);
  backend_of(a).reduce(op, view_of(out), view_of(a));
  return out;
}

}  // namespace

Tensor sum(const Tensor& a, const std::vector<int64_t>& dims_in, bool keepdim) {
  std::vector<int64_t> dims = normalize_dims(dims_in, a.dim(), "sum");
  Tensor out = reduce_forward(ReduceOp::Sum, a, dims, "sum");
  Shape kept = out.shape();
  if (!keepdim) out = out.reshape(squeezed_shape(a.shape(), dims));
  record(out, "sum", {a}, [kept](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    return {g.reshape(kept).expand(n.inputs[0].shape()).contiguous()};
  });
  return out;
}

Tensor mean(const Tensor& a, const std::vector<int64_t>& dims_in, bool keepdim) {
  std::vector<int64_t> dims = normalize_dims(dims_in, a.dim(), "mean");
  int64_t count = 1;
  for (int64_t d : dims) count *= a.shape()[size_t(d)];
  return mul(sum(a, dims, keepdim), 1.0 / double(std::max<int64_t>(count, 1)));
}

Tensor max(const Tensor& a, int64_t dim, bool keepdim) {
  std::vector<int64_t> dims{wrap_dim(dim, a.dim(), "max")};
  check(a.shape()[size_t(dims[0])] > 0, "max: reducing an empty dim of shape {}", shape_str(a.shape()));
  Tensor values = reduce_forward(ReduceOp::Max, a, dims, "max");
  Tensor out = keepdim ? values.detach() : values.reshape(squeezed_shape(a.shape(), dims));
  // Ties share the gradient equally, as torch.amax does.
  record(out, "max", {a}, [values, dims](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    const Tensor& a = n.inputs[0];
    Tensor zero = Tensor::zeros({}, a.dtype(), a.device()), one = Tensor::ones({}, a.dtype(), a.device());
    Tensor is_max = where(sub(a, values), zero, one);
    Tensor share = div(is_max, sum(is_max, dims, true));
    return {mul(share, g.reshape(values.shape()))};
  });
  return out;
}

Tensor argmax(const Tensor& a, int64_t dim) {
  int64_t d = wrap_dim(dim, a.dim(), "argmax");
  check(a.shape()[size_t(d)] > 0, "argmax: empty dim in shape {}", shape_str(a.shape()));
  // Move `dim` last (keeping the others in order), then one argmax per row.
  std::vector<int64_t> perm;
  for (int64_t i = 0; i < a.dim(); ++i)
    if (i != d) perm.push_back(i);
  perm.push_back(d);
  Tensor rows = a.detach().permute(perm).contiguous();
  Shape out_shape = rows.shape();
  out_shape.pop_back();
  Tensor out = Tensor::empty(out_shape, DType::I64, a.device());
  backend_of(a).argmax_last(view_of(out), view_of(rows));
  return out;
}

Tensor sum_to(const Tensor& grad, const Shape& shape) {
  if (grad.shape() == shape) return grad;
  size_t lead = grad.shape().size() - shape.size();
  std::vector<int64_t> dims;
  for (size_t d = 0; d < grad.shape().size(); ++d)
    if (d < lead || (shape[d - lead] == 1 && grad.shape()[d] != 1)) dims.push_back(int64_t(d));
  return sum(grad, dims, true).reshape(shape);
}

}  // namespace engine
