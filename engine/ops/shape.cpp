// Views (reshape, transpose, permute, slice, expand, ...) that share storage
// with their input, plus the copying ops contiguous, clone, cat and split.
// Each view's backward maps the gradient back through the inverse view.
#include "engine/ops/common.h"

#include <numeric>
#include <optional>

namespace engine {

using detail::make_view;

namespace {

// Resolves one -1 in a requested shape from the element count.
Shape infer_shape(const Shape& requested, int64_t count, const Shape& from) {
  Shape shape = requested;
  int64_t known = 1, infer = -1;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == -1) {
      check(infer < 0, "reshape {} -> {}: only one dim may be -1", shape_str(from), shape_str(requested));
      infer = int64_t(d);
    } else {
      check(shape[d] >= 0, "reshape {} -> {}: negative dim", shape_str(from), shape_str(requested));
      known *= shape[d];
    }
  }
  if (infer >= 0) {
    check(known > 0 && count % known == 0, "reshape {} -> {}: cannot infer the -1 dim", shape_str(from),
          shape_str(requested));
    shape[size_t(infer)] = count / known;
  }
  check(numel(shape) == count, "reshape {} -> {}: element counts differ", shape_str(from), shape_str(requested));
  return shape;
}

// Strides that let `shape` view memory laid out as (old_shape, old_strides),
// or nothing when a copy is needed. Old dims are grouped into runs that are
// contiguous with each other; each run must map onto whole new dims.
std::optional<Shape> view_strides(const Shape& old_shape, const Shape& old_strides, const Shape& shape) {
  if (numel(old_shape) == 0 || old_shape.empty()) return contiguous_strides(shape);
  Shape strides(shape.size(), 1);
  int64_t new_d = int64_t(shape.size()) - 1;
  int64_t run_stride = old_strides.back(), run_numel = 1, new_numel = 1;
  for (int64_t d = int64_t(old_shape.size()) - 1; d >= 0; --d) {
    run_numel *= old_shape[size_t(d)];
    bool run_ends = d == 0 || (old_shape[size_t(d) - 1] != 1 && old_strides[size_t(d) - 1] != run_numel * run_stride);
    if (!run_ends) continue;
    while (new_d >= 0 && (new_numel < run_numel || shape[size_t(new_d)] == 1)) {
      strides[size_t(new_d)] = new_numel * run_stride;
      new_numel *= shape[size_t(new_d)];
      --new_d;
    }
    if (new_numel != run_numel) return std::nullopt;
    if (d > 0) {
      run_stride = old_strides[size_t(d) - 1];
      run_numel = new_numel = 1;
    }
  }
  if (new_d != -1) return std::nullopt;
  return strides;
}

Tensor reshape_view(const Tensor& t, const Shape& shape, const Shape& strides) {
  Tensor out = make_view(t, shape, strides, t.offset());
  record(out, "reshape", {t}, [](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    return {g.reshape(n.inputs[0].shape())};
  });
  return out;
}

}  // namespace

Tensor Tensor::view(const Shape& requested) const {
  Shape shape = infer_shape(requested, numel(), this->shape());
  std::optional<Shape> strides = view_strides(this->shape(), this->strides(), shape);
  check(strides.has_value(), "view {} -> {}: the layout needs a copy; use reshape()", shape_str(this->shape()),
        shape_str(shape));
  return reshape_view(*this, shape, *strides);
}

Tensor Tensor::reshape(const Shape& requested) const {
  Shape shape = infer_shape(requested, numel(), this->shape());
  if (shape == this->shape()) return *this;
  if (std::optional<Shape> strides = view_strides(this->shape(), this->strides(), shape))
    return reshape_view(*this, shape, *strides);
  return contiguous().view(shape);
}

Tensor Tensor::permute(const std::vector<int64_t>& dims) const {
  check(int64_t(dims.size()) == dim(), "permute: {} dims given for a tensor of rank {}", dims.size(), dim());
  Shape shape(dims.size()), strides(dims.size());
  std::vector<int64_t> inverse(dims.size(), -1);
  for (size_t i = 0; i < dims.size(); ++i) {
    int64_t d = wrap_dim(dims[i], dim(), "permute");
    check(inverse[size_t(d)] < 0, "permute: dim {} appears twice", d);
    inverse[size_t(d)] = int64_t(i);
    shape[i] = this->shape()[size_t(d)];
    strides[i] = this->strides()[size_t(d)];
  }
  Tensor out = make_view(*this, shape, strides, offset());
  record(out, "permute", {*this}, [inverse](const Tensor& g, const Node&) -> std::vector<Tensor> {
    return {g.permute(inverse)};
  });
  return out;
}

Tensor Tensor::transpose(int64_t d0, int64_t d1) const {
  std::vector<int64_t> dims(static_cast<size_t>(dim()));
  std::iota(dims.begin(), dims.end(), 0);
  std::swap(dims[size_t(wrap_dim(d0, dim(), "transpose"))], dims[size_t(wrap_dim(d1, dim(), "transpose"))]);
  return permute(dims);
}

Tensor Tensor::slice(int64_t d, int64_t start, int64_t end, int64_t step) const {
  d = wrap_dim(d, dim(), "slice");
  const int64_t size = shape()[size_t(d)];
  check(step > 0, "slice: step must be positive, got {}", step);
  // Python-style clamping of negative and out-of-range bounds.
  auto clamp = [size](int64_t i) { return std::clamp<int64_t>(i < 0 ? i + size : i, 0, size); };
  start = clamp(start);
  end = std::max(clamp(end), start);
  Shape shape = this->shape(), strides = this->strides();
  shape[size_t(d)] = (end - start + step - 1) / step;
  strides[size_t(d)] *= step;
  Tensor out = make_view(*this, shape, strides, offset() + start * this->strides()[size_t(d)]);
  record(out, "slice", {*this}, [d, start, end, step](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    Tensor full = Tensor::zeros(n.inputs[0].shape(), g.dtype(), g.device());
    full.slice(d, start, end, step).copy_(g);
    return {full};
  });
  return out;
}

Tensor Tensor::select(int64_t d, int64_t index) const {
  d = wrap_dim(d, dim(), "select");
  const int64_t size = shape()[size_t(d)];
  check(index >= -size && index < size, "select: index {} out of range for dim {} of size {}", index, d, size);
  if (index < 0) index += size;
  return slice(d, index, index + 1).squeeze(d);
}

Tensor Tensor::expand(const Shape& target) const {
  check(target.size() >= shape().size(), "expand {} -> {}: cannot drop dims", shape_str(shape()), shape_str(target));
  View v = detail::broadcast_view(*this, target);
  size_t lead = target.size() - shape().size();
  for (size_t d = 0; d < shape().size(); ++d)
    check(shape()[d] == target[lead + d] || shape()[d] == 1, "expand {} -> {}: dim {} is not 1",
          shape_str(shape()), shape_str(target), d);
  Tensor out = make_view(*this, target, v.strides, offset());
  record(out, "expand", {*this}, [](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    return {sum_to(g, n.inputs[0].shape())};
  });
  return out;
}

Tensor Tensor::unsqueeze(int64_t d) const {
  d = wrap_dim(d, dim() + 1, "unsqueeze");
  Shape shape = this->shape();
  shape.insert(shape.begin() + d, 1);
  return reshape(shape);
}

Tensor Tensor::squeeze(int64_t d) const {
  d = wrap_dim(d, dim(), "squeeze");
  if (shape()[size_t(d)] != 1) return *this;
  Shape shape = this->shape();
  shape.erase(shape.begin() + d);
  return reshape(shape);
}

Tensor Tensor::flatten(int64_t start_dim, int64_t end_dim) const {
  if (dim() == 0) return reshape({1});
  start_dim = wrap_dim(start_dim, dim(), "flatten");
  end_dim = wrap_dim(end_dim, dim(), "flatten");
  Shape shape(this->shape().begin(), this->shape().begin() + start_dim);
  int64_t merged = 1;
  for (int64_t d = start_dim; d <= end_dim; ++d) merged *= this->shape()[size_t(d)];
  shape.push_back(merged);
  shape.insert(shape.end(), this->shape().begin() + end_dim + 1, this->shape().end());
  return reshape(shape);
}

Tensor Tensor::contiguous() const { return is_contiguous() ? *this : clone(); }

Tensor Tensor::clone() const {
  Tensor out = Tensor::empty(shape(), dtype(), device());
  backend_for(device()).copy(view_of(out), view_of(*this));
  record(out, "clone", {*this}, [](const Tensor& g, const Node&) -> std::vector<Tensor> { return {g}; });
  return out;
}

Tensor cat(const std::vector<Tensor>& tensors, int64_t dim) {
  check(!tensors.empty(), "cat: no tensors given");
  const Tensor& first = tensors.front();
  dim = wrap_dim(dim, first.dim(), "cat");
  Shape shape = first.shape();
  shape[size_t(dim)] = 0;
  for (const Tensor& t : tensors) {
    detail::check_compatible(first, t, "cat");
    check(t.dim() == first.dim(), "cat: tensors of rank {} and {}", first.dim(), t.dim());
    for (int64_t d = 0; d < t.dim(); ++d)
      check(d == dim || t.shape()[size_t(d)] == first.shape()[size_t(d)], "cat along dim {}: shapes {} and {}", dim,
            shape_str(first.shape()), shape_str(t.shape()));
    shape[size_t(dim)] += t.shape()[size_t(dim)];
  }
  Tensor out = Tensor::empty(shape, first.dtype(), first.device());
  std::vector<int64_t> offsets;
  {
    NoGradGuard no_grad;
    int64_t offset = 0;
    for (const Tensor& t : tensors) {
      offsets.push_back(offset);
      out.narrow(dim, offset, t.shape()[size_t(dim)]).copy_(t);
      offset += t.shape()[size_t(dim)];
    }
  }
  record(out, "cat", tensors, [dim, offsets](const Tensor& g, const Node& n) -> std::vector<Tensor> {
    std::vector<Tensor> grads;
    for (size_t i = 0; i < n.inputs.size(); ++i)
      grads.push_back(n.needs_grad(i) ? g.narrow(dim, offsets[i], n.inputs[i].shape()[size_t(dim)]) : Tensor());
    return grads;
  });
  return out;
}

std::vector<Tensor> split(const Tensor& a, const std::vector<int64_t>& sizes, int64_t dim) {
  dim = wrap_dim(dim, a.dim(), "split");
  check(std::accumulate(sizes.begin(), sizes.end(), int64_t(0)) == a.shape()[size_t(dim)],
        "split: sizes do not add up to dim {} of shape {}", dim, shape_str(a.shape()));
  std::vector<Tensor> parts;
  int64_t offset = 0;
  for (int64_t size : sizes) {
    parts.push_back(a.narrow(dim, offset, size));
    offset += size;
  }
  return parts;
}

std::vector<Tensor> split(const Tensor& a, int64_t split_size, int64_t dim) {
  check(split_size > 0, "split: split_size must be positive, got {}", split_size);
  int64_t total = a.shape()[size_t(wrap_dim(dim, a.dim(), "split"))];
  std::vector<int64_t> sizes;
  for (int64_t offset = 0; offset < total; offset += split_size) sizes.push_back(std::min(split_size, total - offset));
  return split(a, sizes, dim);
}

}  // namespace engine
