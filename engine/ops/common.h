// Small helpers every op file uses: argument checks that name the op, and
// views that present a tensor broadcast to a larger shape (stride 0).
#pragma once

#include "engine/autograd.h"
#include "engine/backend.h"
#include "engine/ops.h"

#include <memory>
#include <optional>

namespace engine::detail {

// Same device (and dtype), or an error naming the op and both sides.
void check_same_device(const Tensor& a, const Tensor& b, const char* op);
void check_compatible(const Tensor& a, const Tensor& b, const char* op);
void check_floating(const Tensor& a, const char* op);

// `t` seen as `shape` under broadcasting: missing leading dims and size-1 dims get stride 0.
View broadcast_view(const Tensor& t, const Shape& shape);

// A new tensor sharing t's storage with the given layout (no autograd).
Tensor make_view(const Tensor& t, const Shape& shape, const Shape& strides, int64_t offset);
// An uninitialised tensor of `shape` whose rows (over the last dim) are `room`
// columns longer in storage, those columns marked spare (TensorImpl::room).
Tensor empty_with_room(const Shape& shape, DType dtype, Device device, int64_t room);

inline Backend& backend_of(const Tensor& t) { return backend_for(t.device()); }

// What dropout_add_layer_norm's two nodes share: the dropout_add's terms, so
// that the layer norm's backward can also drop the gradient it computes for
// x (in the same pass), and that gradient with its dropped copy, which the
// dropout_add's backward takes when the gradient it receives is that very one.
struct DropoutHandoff {
  double p;
  uint64_t seed, offset;
  DType dtype;  // of the dropout_add's input
  Tensor gradient, dropped;
};

// layer_norm's pieces (ops/nn.cpp), for an op that computes a layer norm in
// another op's pass: its checks, which give y's dtype, and the node it records
// for y = layer_norm(x), with x's contiguous values xc and the statistics saved.
DType check_layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, std::optional<DType> out);
void record_layer_norm(Tensor& y, const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& xc,
                       const Tensor& mean, const Tensor& rstd, std::shared_ptr<DropoutHandoff> handoff = nullptr);
DType layer_norm_stats_dtype(DType dtype);

// Indices (or targets) made contiguous, checked by `check(backend, view)` with the backend
// of the device they are on, and brought to `device`. Indices on the host are checked there
// and copied over, so that a GPU op never waits for a check on the device. `copied`: the
// indices are then a private copy that no one can edit before the backward.
struct CheckedIndices {
  Tensor ids;
  bool copied;
};

template <typename Check>
CheckedIndices checked_indices(const Tensor& index, Device device, Check&& check) {
  const Tensor ids = index.detach().contiguous();
  check(backend_of(ids), view_of(ids));
  if (ids.device() == device) return {ids, false};
  return {ids.to(device), true};
}

}  // namespace engine::detail
