// Inverted dropout, and dropout added to a residual in the same pass. The
// keep mask is a pure function of (seed, offset, element index) through
// Philox, so no mask is stored: the backward asks the same kernel to drop the
// same elements of the gradient.
#include "engine/ops/common.h"
#include "engine/rng.h"

namespace engine {

using detail::backend_of;

namespace {

// The gradient of dropout's input: the output's gradient dropped by the same
// mask, written in the input's dtype.
Tensor dropped_gradient(const Tensor& g, DType dtype, double p, uint64_t seed, uint64_t offset) {
  const Tensor dy = g.contiguous();
  Tensor dx = Tensor::empty(dy.shape(), dtype, dy.device());
  backend_of(dy).dropout(view_of(dx), view_of(dy), p, seed, offset, View{});
  return dx;
}

}  // namespace

Tensor dropout(const Tensor& x, double p, bool training, Generator& gen) {
  check(p >= 0 && p < 1, "dropout: p must be in [0, 1), got {}", p);
  if (!training || p == 0) return x;
  detail::check_floating(x, "dropout");
  const Tensor xc = x.detach().contiguous();
  const uint64_t seed = gen.seed(), offset = gen.reserve(uint64_t(x.numel()));
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  backend_of(x).dropout(view_of(out), view_of(xc), p, seed, offset, View{});
  record(out, "dropout", {edge_only(x)},
         [p, seed, offset, dtype = x.dtype()](const Tensor& g, const Node&) -> std::vector<Tensor> {
           return {dropped_gradient(g, dtype, p, seed, offset)};
         });
  return out;
}

Tensor dropout_add(const Tensor& residual, const Tensor& x, double p, bool training, Generator& gen) {
  check(p >= 0 && p < 1, "dropout_add: p must be in [0, 1), got {}", p);
  if (!training || p == 0) return add(residual, x);
  detail::check_floating(x, "dropout_add");
  // One pass where the sum has the residual's shape and dtype (f32 or f64, and
  // x's or, for f32, bf16 x); otherwise the two ops (add broadcasts and promotes).
  const DType r = residual.dtype(), in = x.dtype();
  const bool fits = residual.shape() == x.shape() && residual.device() == x.device() &&
                    (r == DType::F32 || r == DType::F64) && (in == r || (in == DType::BF16 && r == DType::F32));
  if (!fits) return add(residual, dropout(x, p, training, gen));
  const Tensor xc = x.detach().contiguous(), rc = residual.detach().contiguous();
  const uint64_t seed = gen.seed(), offset = gen.reserve(uint64_t(x.numel()));  // as dropout(x) draws
  Tensor out = Tensor::empty(x.shape(), r, x.device());
  backend_of(x).dropout(view_of(out), view_of(xc), p, seed, offset, view_of(rc));
  record(out, "dropout_add", {edge_only(residual), edge_only(x)},
         [p, seed, offset, in](const Tensor& g, const Node& n) -> std::vector<Tensor> {
           Tensor dx = n.needs_grad(1) ? dropped_gradient(g, in, p, seed, offset) : Tensor();
           return {n.needs_grad(0) ? g : Tensor(), dx};
         });
  return out;
}

}  // namespace engine
