// Tensor: a cheap handle (shared pointer) to a strided view of device memory,
// plus the autograd fields. Copies of a Tensor alias the same data; views
// (reshape, transpose, slice) share storage with their base.
#pragma once

#include "engine/device.h"
#include "engine/dtype.h"
#include "engine/error.h"
#include "engine/shape.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace engine {

class Generator;
struct Node;

// A block of memory on one device. `keepalive` releases it (to the device pool,
// or unmaps a file) when the last tensor that uses it goes away.
struct Storage {
  void* data = nullptr;
  size_t nbytes = 0;
  Device device;
  std::shared_ptr<void> keepalive;

  static std::shared_ptr<Storage> allocate(size_t nbytes, Device device);
};

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  Shape shape;
  Shape strides;       // in elements
  int64_t offset = 0;  // in elements, from storage->data
  DType dtype = DType::F32;
  bool requires_grad = false;
  std::shared_ptr<TensorImpl> grad;  // accumulated by backward() on leaves
  std::shared_ptr<Node> grad_fn;     // the op that produced this tensor, if recorded
  // Columns of storage after each row that no tensor uses: left by the op that
  // made this tensor for a consumer that appends columns (engine::layer_norm's room).
  int64_t room = 0;
};

class Tensor {
 public:
  Tensor() = default;  // an undefined tensor: "no value", e.g. a skipped gradient
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // ---- creation ----
  static Tensor empty(const Shape& shape, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor ones(const Shape& shape, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor full(const Shape& shape, double value, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor arange(int64_t start, int64_t end, int64_t step = 1, DType dtype = DType::I64,
                       Device device = Device::cpu());
  // Uniform in [low, high) and normal(mean, std), drawn from a Philox stream:
  // the same generator state gives the same values on every device.
  static Tensor rand(const Shape& shape, Generator& gen, double low = 0, double high = 1, DType dtype = DType::F32,
                     Device device = Device::cpu());
  static Tensor randn(const Shape& shape, Generator& gen, double mean = 0, double std = 1, DType dtype = DType::F32,
                      Device device = Device::cpu());
  template <typename T>
  static Tensor from_vector(const std::vector<T>& values, const Shape& shape, Device device = Device::cpu());
  // Wraps existing host memory without copying; `keepalive` owns it.
  static Tensor from_blob(void* data, const Shape& shape, DType dtype, std::shared_ptr<void> keepalive);

  // ---- properties ----
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return impl().shape; }
  const Shape& strides() const { return impl().strides; }
  int64_t offset() const { return impl().offset; }
  int64_t dim() const { return int64_t(impl().shape.size()); }
  int64_t size(int64_t d) const;  // d may be negative
  int64_t numel() const { return engine::numel(impl().shape); }
  DType dtype() const { return impl().dtype; }
  Device device() const { return impl().storage->device; }
  bool is_contiguous() const;
  TensorImpl& impl() const;
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  bool same(const Tensor& other) const { return impl_ == other.impl_; }

  // ---- raw data (host tensors) ----
  void* data_ptr() const;  // storage data + offset, on the tensor's device
  template <typename T>
  T* data() const;  // checks the dtype and that the tensor is on the CPU
  template <typename T>
  std::vector<T> to_vector() const;  // any layout, any device; converted to T
  double item() const;               // the single element, as double

  // ---- autograd ----
  bool requires_grad() const { return impl().requires_grad; }
  Tensor& set_requires_grad(bool enabled);  // only on leaves
  bool is_leaf() const { return impl().grad_fn == nullptr; }
  Tensor grad() const;
  void set_grad(const Tensor& grad) const;
  void zero_grad() const { impl().grad.reset(); }
  // Runs reverse-mode autodiff from this tensor. A scalar needs no seed gradient.
  void backward(const Tensor& grad = Tensor(), bool retain_graph = false) const;
  // Same data, cut from the graph.
  Tensor detach() const;
  // Points this tensor at `source`'s data (storage, shape, strides, dtype), as
  // torch's `t.data = source`: every handle to it follows, its autograd
  // fields stay. For moving parameters and buffers in place.
  void set_data(const Tensor& source) const;

  // ---- views and copies (autograd-aware; defined in ops/shape.cpp) ----
  Tensor reshape(const Shape& shape) const;
  Tensor view(const Shape& shape) const;  // like reshape, but never copies
  Tensor transpose(int64_t d0, int64_t d1) const;
  Tensor permute(const std::vector<int64_t>& dims) const;
  Tensor slice(int64_t dim, int64_t start, int64_t end, int64_t step = 1) const;
  Tensor narrow(int64_t dim, int64_t start, int64_t length) const { return slice(dim, start, start + length); }
  Tensor select(int64_t dim, int64_t index) const;
  Tensor expand(const Shape& shape) const;
  Tensor unsqueeze(int64_t dim) const;
  Tensor squeeze(int64_t dim) const;
  Tensor flatten(int64_t start_dim = 0, int64_t end_dim = -1) const;
  Tensor contiguous() const;
  Tensor clone() const;
  Tensor to(Device device) const;
  Tensor to(DType dtype) const;

  // ---- in-place updates: outside autograd only (optimisers, init) ----
  Tensor& copy_(const Tensor& src);
  Tensor& fill_(double value);
  Tensor& zero_() { return fill_(0.0); }

  // A readable printout for debugging: values (abbreviated), shape, dtype, device.
  std::string str() const;

 private:
  std::shared_ptr<TensorImpl> impl_;
};

// ---- NoGradGuard: ops run inside its scope record no graph. ----
bool grad_mode_enabled();
class NoGradGuard {
 public:
  NoGradGuard();
  ~NoGradGuard();
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool previous_;
};

// ---- template definitions ----
template <typename T>
Tensor Tensor::from_vector(const std::vector<T>& values, const Shape& shape, Device device) {
  check(int64_t(values.size()) == engine::numel(shape), "from_vector: {} values do not fill shape {}", values.size(),
        shape_str(shape));
  // Copy into owned host memory, then move to the device.
  auto owned = std::make_shared<std::vector<T>>(values);
  Tensor host = from_blob(owned->data(), shape, dtype_of<T>(), owned);
  return device.is_cpu() ? host.clone() : host.to(device);
}

template <typename T>
T* Tensor::data() const {
  check(dtype() == dtype_of<T>(), "data<{}>() on a {} tensor", dtype_name(dtype_of<T>()), dtype_name(dtype()));
  check(device().is_cpu(), "data<T>() needs a CPU tensor, this one is on {}", device().str());
  return static_cast<T*>(data_ptr());
}

template <typename T>
std::vector<T> Tensor::to_vector() const {
  Tensor t = to(Device::cpu()).to(dtype_of<T>()).contiguous();
  const T* p = t.data<T>();
  return std::vector<T>(p, p + t.numel());
}

}  // namespace engine
