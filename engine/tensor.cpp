// Tensor creation, properties, device/dtype moves, in-place updates and the
// debugging printer. Views and arithmetic live in engine/ops/.
#include "engine/tensor.h"

#include "engine/autograd.h"
#include "engine/backend.h"
#include "engine/rng.h"

#include <cmath>

namespace engine {

std::shared_ptr<Storage> Storage::allocate(size_t nbytes, Device device) {
  Backend& backend = backend_for(device);
  auto storage = std::make_shared<Storage>();
  storage->data = nbytes ? backend.allocate(nbytes) : nullptr;
  storage->nbytes = nbytes;
  storage->device = device;
  void* data = storage->data;
  storage->keepalive = std::shared_ptr<void>(data, [&backend, nbytes](void* p) {
    if (p) backend.deallocate(p, nbytes);
  });
  return storage;
}

// ---- creation ----

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (int64_t d : shape) check(d >= 0, "tensor shape {} has a negative dim", shape_str(shape));
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = Storage::allocate(size_t(engine::numel(shape)) * dtype_size(dtype), device);
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

Tensor Tensor::full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  return t.fill_(value);
}
Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) { return full(shape, 0.0, dtype, device); }
Tensor Tensor::ones(const Shape& shape, DType dtype, Device device) { return full(shape, 1.0, dtype, device); }

Tensor Tensor::arange(int64_t start, int64_t end, int64_t step, DType dtype, Device device) {
  check(step != 0, "arange: step must be non-zero");
  int64_t n = std::max<int64_t>(0, (end - start + step + (step > 0 ? -1 : 1)) / step);
  std::vector<double> values(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) values[size_t(i)] = double(start + i * step);
  return from_vector(values, {n}).to(dtype).to(device);
}

Tensor Tensor::rand(const Shape& shape, Generator& gen, double low, double high, DType dtype, Device device) {
  check(is_floating(dtype), "rand: dtype {} is not floating", dtype_name(dtype));
  Tensor t = empty(shape, dtype, device);
  uint64_t offset = gen.reserve(uint64_t(t.numel()));
  backend_for(device).fill_uniform(view_of(t), gen.seed(), offset, low, high);
  return t;
}

Tensor Tensor::randn(const Shape& shape, Generator& gen, double mean, double std, DType dtype, Device device) {
  check(is_floating(dtype), "randn: dtype {} is not floating", dtype_name(dtype));
  Tensor t = empty(shape, dtype, device);
  uint64_t offset = gen.reserve(uint64_t(t.numel()));
  backend_for(device).fill_normal(view_of(t), gen.seed(), offset, mean, std);
  return t;
}

Tensor Tensor::from_blob(void* data, const Shape& shape, DType dtype, std::shared_ptr<void> keepalive) {
  auto storage = std::make_shared<Storage>();
  storage->data = data;
  storage->nbytes = size_t(engine::numel(shape)) * dtype_size(dtype);
  storage->device = Device::cpu();
  storage->keepalive = std::move(keepalive);
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::move(storage);
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

// ---- properties ----

TensorImpl& Tensor::impl() const {
  check(impl_ != nullptr, "use of an undefined tensor");
  return *impl_;
}

int64_t Tensor::size(int64_t d) const { return shape()[size_t(wrap_dim(d, dim(), "size"))]; }

bool Tensor::is_contiguous() const { return View{nullptr, dtype(), shape(), strides()}.is_contiguous(); }

void* Tensor::data_ptr() const {
  const TensorImpl& t = impl();
  // Only a tensor with no elements has no data, or a graph edge (edge_only) whose data was not kept.
  check(t.storage->data != nullptr || numel() == 0,
        "a tensor of shape {} has no data: autograd kept only its graph edge (edge_only), since the op's backward "
        "was not meant to read it",
        shape_str(t.shape));
  return static_cast<char*>(t.storage->data) + t.offset * int64_t(dtype_size(t.dtype));
}

double Tensor::item() const {
  check(numel() == 1, "item() needs one element, the tensor has shape {}", shape_str(shape()));
  return to_vector<double>()[0];
}

// ---- autograd ----

Tensor& Tensor::set_requires_grad(bool enabled) {
  if (!is_leaf()) fail("set_requires_grad on a non-leaf tensor (made by '{}'): detach() it first", impl().grad_fn->op);
  check(!enabled || is_floating(dtype()), "only floating tensors can require grad, not {}", dtype_name(dtype()));
  impl().requires_grad = enabled;
  return *this;
}

Tensor Tensor::grad() const { return Tensor(impl().grad); }

void Tensor::set_grad(const Tensor& grad) const {
  if (grad.defined())
    check(grad.shape() == shape(), "set_grad: gradient shape {} for a tensor of shape {}", shape_str(grad.shape()),
          shape_str(shape()));
  impl().grad = grad.impl_ptr();
}

void Tensor::backward(const Tensor& grad, bool retain_graph) const { run_backward(*this, grad, retain_graph); }

void Tensor::set_data(const Tensor& source) const {
  TensorImpl& impl = *impl_;
  const TensorImpl& from = source.impl();
  impl.storage = from.storage;
  impl.shape = from.shape;
  impl.strides = from.strides;
  impl.offset = from.offset;
  impl.dtype = from.dtype;
}

Tensor Tensor::detach() const {
  auto impl = std::make_shared<TensorImpl>(*impl_);
  impl->requires_grad = false;
  impl->grad.reset();
  impl->grad_fn.reset();
  return Tensor(std::move(impl));
}

// ---- moves between devices and dtypes ----

Tensor Tensor::to(Device target) const {
  if (device() == target) return *this;
  Tensor src = contiguous();
  Tensor out = empty(shape(), dtype(), target);
  size_t nbytes = size_t(numel()) * dtype_size(dtype());
  if (nbytes) {
    if (target.is_cpu()) {
      backend_for(src.device()).copy_to_host(out.data_ptr(), src.data_ptr(), nbytes);
    } else if (src.device().is_cpu()) {
      backend_for(target).copy_from_host(out.data_ptr(), src.data_ptr(), nbytes);
    } else {  // between two GPUs, through the host
      return to(Device::cpu()).to(target);
    }
  }
  record(out, "to_device", {*this}, [source = device()](const Tensor& g, const Node&) -> std::vector<Tensor> {
    return {g.to(source)};
  });
  return out;
}

Tensor Tensor::to(DType target) const {
  if (dtype() == target) return *this;
  Tensor out = empty(shape(), target, device());
  backend_for(device()).copy(view_of(out), view_of(*this));
  if (is_floating(target)) {
    record(out, "to_dtype", {edge_only(*this)},
           [source = dtype()](const Tensor& g, const Node&) -> std::vector<Tensor> { return {g.to(source)}; });
  }
  return out;
}

// ---- in-place ----

Tensor& Tensor::copy_(const Tensor& src) {
  check(!grad_mode_enabled() || !requires_grad(), "copy_ into a tensor that requires grad: use NoGradGuard");
  check(src.shape() == shape(), "copy_: source shape {} into shape {}", shape_str(src.shape()), shape_str(shape()));
  Tensor from = src.device() == device() ? src : src.to(device());
  backend_for(device()).copy(view_of(*this), view_of(from));
  return *this;
}

Tensor& Tensor::fill_(double value) {
  check(!grad_mode_enabled() || !requires_grad(), "fill_ on a tensor that requires grad: use NoGradGuard");
  backend_for(device()).fill(view_of(*this), value);
  return *this;
}

// ---- printing ----

namespace {

void print_values(std::string& out, const std::vector<double>& values, const Shape& shape, size_t dim, int64_t& index,
                  bool integral) {
  constexpr int64_t kEdge = 3;  // elements shown at each end of a long dim
  if (dim == shape.size()) {
    out += integral ? fmt::format("{}", int64_t(values[size_t(index)])) : fmt::format("{:.4g}", values[size_t(index)]);
    ++index;
    return;
  }
  int64_t inner = 1;
  for (size_t d = dim + 1; d < shape.size(); ++d) inner *= shape[d];
  out += '[';
  for (int64_t i = 0; i < shape[dim]; ++i) {
    if (shape[dim] > 2 * kEdge && i == kEdge) {
      out += "..., ";
      index += (shape[dim] - 2 * kEdge) * inner;
      i = shape[dim] - kEdge - 1;
      continue;
    }
    print_values(out, values, shape, dim + 1, index, integral);
    if (i + 1 < shape[dim]) out += dim + 1 == shape.size() ? ", " : ",\n" + std::string(dim + 8, ' ');
  }
  out += ']';
}

}  // namespace

std::string Tensor::str() const {
  if (!defined()) return "tensor(undefined)";
  std::vector<double> values = to_vector<double>();
  std::string out = "tensor(";
  int64_t index = 0;
  print_values(out, values, shape(), 0, index, !is_floating(dtype()));
  out += fmt::format(", shape={}, dtype={}, device={}{})", shape_str(shape()), dtype_name(dtype()), device().str(),
                     requires_grad() ? ", requires_grad" : "");
  return out;
}

}  // namespace engine
