// Inverted dropout. The keep mask is a pure function of (seed, offset,
// element index) through Philox, so no mask is stored: the backward asks the
// same kernel to drop the same elements of the gradient.
#include "engine/ops/common.h"
#include "engine/rng.h"

namespace engine {

using detail::backend_of;

Tensor dropout(const Tensor& x, double p, bool training, Generator& gen) {
  check(p >= 0 && p < 1, "dropout: p must be in [0, 1), got {}", p);
  if (!training || p == 0) return x;
  detail::check_floating(x, "dropout");
  const Tensor xc = x.detach().contiguous();
  const uint64_t seed = gen.seed(), offset = gen.reserve(uint64_t(x.numel()));
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  backend_of(x).dropout(view_of(out), view_of(xc), p, seed, offset);

  record(out, "dropout", {edge_only(x)}, [p, seed, offset](const Tensor& g, const Node&) -> std::vector<Tensor> {
    const Tensor dy = g.contiguous();
    Tensor dx = Tensor::empty(dy.shape(), dy.dtype(), dy.device());
    backend_of(dy).dropout(view_of(dx), view_of(dy), p, seed, offset);
    return {dx};
  });
  return out;
}

}  // namespace engine
