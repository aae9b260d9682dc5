// Inverted dropout; dropout added to a residual in the same pass; and that
// with the layer norm which reads the sum, one pass each way. The
// keep mask is a pure function of (seed, offset, element index) through
// Philox, so no mask is stored: the backward asks the same kernel to drop the
// same elements of the gradient.
#include "engine/ops/common.h"
#include "engine/rng.h"

namespace engine {

using detail::backend_of;

namespace {

// One pass where residual + dropout(x) has the residual's shape and dtype (f32
// or f64, and x's or, for f32, bf16 x); otherwise the two ops (add broadcasts
// and promotes).
bool dropout_add_fits(const Tensor& residual, const Tensor& x) {
  const DType r = residual.dtype(), in = x.dtype();
  return residual.shape() == x.shape() && residual.device() == x.device() && (r == DType::F32 || r == DType::F64) &&
         (in == r || (in == DType::BF16 && r == DType::F32));
}

// The gradient of dropout's input: the output's gradient dropped by the same
// mask, written in the input's dtype.
Tensor dropped_gradient(const Tensor& g, DType dtype, double p, uint64_t seed, uint64_t offset) {
  const Tensor dy = g.contiguous();
  Tensor dx = Tensor::empty(dy.shape(), dtype, dy.device());
  backend_of(dy).dropout(view_of(dx), view_of(dy), p, seed, offset, View{});
  return dx;
}

// handoff: the layer norm that reads out may have dropped out's gradient
// already (dropout_add_layer_norm); taken when g is that gradient itself.
void record_dropout_add(Tensor& out, const Tensor& residual, const Tensor& x, double p, uint64_t seed,
                        uint64_t offset, std::shared_ptr<detail::DropoutHandoff> handoff = nullptr) {
  record(out, "dropout_add", {edge_only(residual), edge_only(x)},
         [p, seed, offset, in = x.dtype(), handoff](const Tensor& g, const Node& n) -> std::vector<Tensor> {
           Tensor dx;
           if (handoff && handoff->gradient.defined() && g.same(handoff->gradient)) dx = handoff->dropped;
           else if (n.needs_grad(1)) dx = dropped_gradient(g, in, p, seed, offset);
           if (handoff) handoff->gradient = handoff->dropped = Tensor();
           return {n.needs_grad(0) ? g : Tensor(), n.needs_grad(1) ? dx : Tensor()};
         });
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
  if (!dropout_add_fits(residual, x)) return add(residual, dropout(x, p, training, gen));
  const Tensor xc = x.detach().contiguous(), rc = residual.detach().contiguous();
  const uint64_t seed = gen.seed(), offset = gen.reserve(uint64_t(x.numel()));  // as dropout(x) draws
  Tensor out = Tensor::empty(x.shape(), residual.dtype(), x.device());
  backend_of(x).dropout(view_of(out), view_of(xc), p, seed, offset, view_of(rc));
  record_dropout_add(out, residual, x, p, seed, offset);
  return out;
}

std::pair<Tensor, Tensor> dropout_add_layer_norm(const Tensor& residual, const Tensor& x, double p, bool training,
                                                 Generator& gen, const Tensor& weight, const Tensor& bias, double eps,
                                                 std::optional<DType> out, int64_t room) {
  check(p >= 0 && p < 1, "dropout_add: p must be in [0, 1), got {}", p);
  detail::check_floating(x, "dropout_add");
  const bool fused = training && p > 0 && dropout_add_fits(residual, x) && residual.numel() > 0;
  if (!fused) {
    const Tensor r = dropout_add(residual, x, p, training, gen);
    return {r, layer_norm(r, weight, bias, eps, out, room)};
  }
  const DType y_dtype = detail::check_layer_norm(residual, weight, bias, out);  // r has the residual's shape and dtype
  const Tensor xc = x.detach().contiguous(), rc = residual.detach().contiguous();
  const Tensor w = weight.detach().contiguous(), b = bias.detach().contiguous();
  const uint64_t seed = gen.seed(), offset = gen.reserve(uint64_t(x.numel()));  // as dropout_add draws
  const int64_t rows = residual.numel() / residual.size(-1);
  const DType stats = detail::layer_norm_stats_dtype(residual.dtype());
  Tensor r = Tensor::empty(x.shape(), residual.dtype(), x.device());
  Tensor y = detail::empty_with_room(x.shape(), y_dtype, x.device(), room);
  Tensor mean = Tensor::empty({rows}, stats, x.device()), rstd = Tensor::empty({rows}, stats, x.device());
  backend_of(x).dropout_add_layer_norm(view_of(r), view_of(xc), view_of(rc), p, seed, offset, view_of(y),
                                       view_of(mean), view_of(rstd), view_of(w), view_of(b), eps);
  auto handoff = std::make_shared<detail::DropoutHandoff>(detail::DropoutHandoff{p, seed, offset, x.dtype(), {}, {}});
  record_dropout_add(r, residual, x, p, seed, offset, handoff);
  detail::record_layer_norm(y, r, weight, bias, r.detach(), mean, rstd, handoff);
  return {r, y};
}

}  // namespace engine
