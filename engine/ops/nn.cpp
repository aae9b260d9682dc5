// Fused neural-network ops: layer norm over the last dim, gelu_new, and
// softmax / log-softmax over any dim. Each is one kernel forward and one
// backward; layer norm skips its weight and bias gradients when they are
// frozen. Layer norm and softmax widen bf16 inputs to f32 and return f32, as
// torch's autocast runs them in f32; gelu_new computes bf16 in f32 and
// returns bf16.
#include "engine/ops/common.h"

namespace engine {

using detail::backend_of;

namespace {

View view_or_none(const Tensor& t) { return t.defined() ? view_of(t) : View{}; }

}  // namespace

// ---- layer norm ----

// Saved statistics are f32 (the backend's contract), or f64 for f64 inputs,
// whose gradient checks need them exact.
DType detail::layer_norm_stats_dtype(DType dtype) { return dtype == DType::F64 ? DType::F64 : DType::F32; }

DType detail::check_layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, std::optional<DType> out) {
  detail::check_floating(x, "layer_norm");
  const DType y_dtype = out.value_or(x.dtype());
  check(y_dtype == x.dtype() || (y_dtype == DType::BF16 && x.dtype() == DType::F32),
        "layer_norm: output dtype {} for a {} input; expected the input's dtype, or bf16 for f32",
        dtype_name(y_dtype), dtype_name(x.dtype()));
  check(x.dim() >= 1, "layer_norm: needs a tensor of rank >= 1, got a scalar");
  check(weight.defined() && bias.defined(), "layer_norm: needs both a weight and a bias");
  detail::check_compatible(x, weight, "layer_norm");
  detail::check_compatible(x, bias, "layer_norm");
  const int64_t C = x.size(-1);
  check(weight.shape() == Shape{C} && bias.shape() == Shape{C},
        "layer_norm: weight {} and bias {} must both be [{}] for input {}", shape_str(weight.shape()),
        shape_str(bias.shape()), C, shape_str(x.shape()));
  return y_dtype;
}

void detail::record_layer_norm(Tensor& y, const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& xc,
                               const Tensor& mean, const Tensor& rstd, std::shared_ptr<DropoutHandoff> handoff) {
  const Tensor w = weight.detach().contiguous();
  record(y, "layer_norm", {x, weight, bias}, [xc, w, mean, rstd, handoff](const Tensor& g, const Node& n) {
    const Tensor dy = g.contiguous();
    const int64_t C = xc.size(-1);
    // x's gradient so far (the residual stream's, in a transformer) is added in the same pass.
    const Tensor so_far = n.needs_grad(0) ? n.take_gradient_so_far(0, xc.dtype()) : Tensor();
    Tensor dx = Tensor::empty(xc.shape(), xc.dtype(), xc.device());
    if (handoff && n.needs_grad(0) && !n.needs_grad(1) && !n.needs_grad(2) && xc.numel() > 0) {
      // Frozen weight and bias: dx, and dx dropped for the dropout_add that made x, in one pass.
      handoff->dropped = Tensor::empty(xc.shape(), handoff->dtype, xc.device());
      backend_of(xc).layer_norm_backward_dropout(view_of(dx), view_of(dy), view_of(xc), view_of(w), view_of(mean),
                                                 view_of(rstd), view_or_none(so_far), view_of(handoff->dropped),
                                                 handoff->p, handoff->seed, handoff->offset);
      handoff->gradient = dx;
      return std::vector<Tensor>{dx, Tensor(), Tensor()};
    }
    // A frozen weight or bias gets no gradient tensor, and the kernel skips its sum.
    Tensor dweight = n.needs_grad(1) ? Tensor::zeros({C}, w.dtype(), w.device()) : Tensor();
    Tensor dbias = n.needs_grad(2) ? Tensor::zeros({C}, w.dtype(), w.device()) : Tensor();
    if (xc.numel() > 0)
      backend_of(xc).layer_norm_backward(view_of(dx), view_or_none(dweight), view_or_none(dbias), view_of(dy),
                                         view_of(xc), view_of(w), view_of(mean), view_of(rstd),
                                         view_or_none(so_far));
    return std::vector<Tensor>{n.needs_grad(0) ? dx : Tensor(), dweight, dbias};
  });
}

Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps, std::optional<DType> out,
                  int64_t room) {
  if (is_storage_only(x.dtype())) return layer_norm(x.to(DType::F32), weight, bias, eps, out, room);
  const DType y_dtype = detail::check_layer_norm(x, weight, bias, out);
  const Tensor xc = x.detach().contiguous(), w = weight.detach().contiguous(), b = bias.detach().contiguous();
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  Tensor y = detail::empty_with_room(x.shape(), y_dtype, x.device(), room);
  Tensor mean = Tensor::empty({rows}, detail::layer_norm_stats_dtype(x.dtype()), x.device());
  Tensor rstd = Tensor::empty({rows}, detail::layer_norm_stats_dtype(x.dtype()), x.device());
  if (x.numel() > 0)
    backend_of(x).layer_norm_forward(view_of(y), view_of(mean), view_of(rstd), view_of(xc), view_of(w), view_of(b),
                                     eps);
  detail::record_layer_norm(y, x, weight, bias, xc, mean, rstd);
  return y;
}

// ---- gelu_new ----

Tensor gelu_new(const Tensor& x) {
  detail::check_floating(x, "gelu_new");
  const Tensor xc = x.detach().contiguous();
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  backend_of(x).gelu_forward(view_of(y), view_of(xc));
  record(y, "gelu_new", {x}, [xc](const Tensor& g, const Node&) -> std::vector<Tensor> {
    const Tensor dy = g.contiguous();
    Tensor dx = Tensor::empty(xc.shape(), xc.dtype(), xc.device());
    backend_of(xc).gelu_backward(view_of(dx), view_of(dy), view_of(xc));
    return {dx};
  });
  return y;
}

// ---- softmax and log-softmax ----

namespace {

// The kernels normalise the last dim of contiguous rows; any other dim is
// swapped to the end, normalised, and swapped back.
Tensor softmax_over(const Tensor& x, int64_t dim, bool log, const char* name) {
  if (is_storage_only(x.dtype())) return softmax_over(x.to(DType::F32), dim, log, name);
  detail::check_floating(x, name);
  if (x.dim() == 0) return softmax_over(x.reshape({1}), dim == -1 ? 0 : dim, log, name).reshape({});
  dim = wrap_dim(dim, x.dim(), name);
  const int64_t last = x.dim() - 1;
  const Tensor rows = dim == last ? x.detach().contiguous() : x.detach().transpose(dim, last).contiguous();
  Tensor y_rows = Tensor::empty(rows.shape(), x.dtype(), x.device());
  if (x.numel() > 0) backend_of(x).softmax_forward(view_of(y_rows), view_of(rows), log);
  Tensor y = dim == last ? y_rows : y_rows.transpose(dim, last).contiguous();

  record(y, name, {x}, [saved = y_rows.detach(), dim, last, log](const Tensor& g, const Node&) -> std::vector<Tensor> {
    const Tensor dy = g.transpose(dim, last).contiguous();
    Tensor dx = Tensor::empty(saved.shape(), saved.dtype(), saved.device());
    if (saved.numel() > 0) backend_of(saved).softmax_backward(view_of(dx), view_of(dy), view_of(saved), log);
    return {dim == last ? dx : dx.transpose(dim, last)};
  });
  return y;
}

}  // namespace

Tensor softmax(const Tensor& x, int64_t dim) { return softmax_over(x, dim, false, "softmax"); }
Tensor log_softmax(const Tensor& x, int64_t dim) { return softmax_over(x, dim, true, "log_softmax"); }

}  // namespace engine
