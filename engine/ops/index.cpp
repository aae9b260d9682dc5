// Row gathers: index_select along any dim, and embedding lookup. The backward
// of a gather is a scatter-add into zeros, so repeated indices accumulate.
// Indices may live on the host for a GPU source (detail::checked_indices).
#include "engine/ops/common.h"

namespace engine {

using detail::backend_of;

namespace {

void check_index(const Tensor& index, const Tensor& source, const char* op) {
  check(index.dtype() == DType::I32 || index.dtype() == DType::I64, "{}: indices must be i32 or i64, got {}", op,
        dtype_name(index.dtype()));
  if (index.device() != source.device() && !index.device().is_cpu())
    fail("{}: indices on {}, source on {}", op, index.device().str(), source.device().str());
}

// A contiguous tensor as the [rows, cols] table the gather kernels expect.
View as_rows(const Tensor& t, int64_t rows, int64_t cols) {
  View v = view_of(t);
  v.shape = {rows, cols};
  v.strides = {cols, 1};
  return v;
}

}  // namespace

Tensor index_select(const Tensor& a, int64_t dim, const Tensor& index) {
  check(a.dim() >= 1, "index_select: needs a tensor of rank >= 1, got shape {}", shape_str(a.shape()));
  dim = wrap_dim(dim, a.dim(), "index_select");
  check_index(index, a, "index_select");
  check(index.dim() == 1, "index_select: index must be 1-D, got shape {}", shape_str(index.shape()));
  // The kernel gathers rows of a [size, rest] table, so the chosen dim goes first.
  const Tensor moved = a.detach().transpose(0, dim).contiguous();
  const Shape moved_shape = moved.shape();
  const int64_t size = moved_shape[0];
  const detail::CheckedIndices checked =
      detail::checked_indices(index, a.device(), [&](Backend& backend, const View& ids) {
        backend.check_indices(ids, size, "index_select");
      });
  const Tensor& ids = checked.ids;
  const int64_t count = ids.numel();
  const int64_t rest = numel(Shape(moved_shape.begin() + 1, moved_shape.end()));

  Shape gathered_shape = moved_shape;
  gathered_shape[0] = count;
  Tensor gathered = Tensor::empty(gathered_shape, a.dtype(), a.device());
  backend_of(a).index_select_rows(as_rows(gathered, count, rest), as_rows(moved, size, rest), view_of(ids));
  Tensor out = dim == 0 ? gathered : gathered.transpose(0, dim).contiguous();

  auto backward = [dim, ids, copied = checked.copied, moved_shape, rest](const Tensor& g, const Node&) {
    if (!copied) backend_of(ids).check_indices(view_of(ids), moved_shape[0], "index_add");  // they may have been edited
    const Tensor g_rows = g.transpose(0, dim).contiguous();
    Tensor grad = Tensor::zeros(moved_shape, g.dtype(), g.device());
    backend_of(g).index_add_rows(as_rows(grad, moved_shape[0], rest), view_of(ids),
                                 as_rows(g_rows, ids.numel(), rest));
    return std::vector<Tensor>{dim == 0 ? grad : grad.transpose(0, dim).contiguous()};
  };
  record(out, "index_select", {a}, backward);
  return out;
}

Tensor embedding(const Tensor& weight, const Tensor& ids) {
  check(weight.dim() == 2, "embedding: weight must be [V, C], got shape {}", shape_str(weight.shape()));
  check_index(ids, weight, "embedding");
  Shape out_shape = ids.shape();
  out_shape.push_back(weight.size(1));
  return index_select(weight, 0, ids.reshape({-1})).view(out_shape);
}

}  // namespace engine
