// Cross-entropy over class logits, fused with log-softmax: the forward keeps
// each row's log-sum-exp, and the backward is softmax - onehot per row, scaled
// by that row's upstream gradient. PyTorch's semantics for ignore_index and
// the reductions; bf16 logits (autocast's) are widened to f32 first.
#include "engine/ops/common.h"

#include <algorithm>
#include <limits>

namespace engine {

using detail::backend_of;

Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index, Reduction reduction) {
  if (is_storage_only(logits.dtype()))
    return cross_entropy(logits.to(DType::F32), targets, ignore_index, reduction);
  detail::check_floating(logits, "cross_entropy");
  check(logits.dim() == 2, "cross_entropy: logits must be [N, K], got shape {}", shape_str(logits.shape()));
  check(targets.dtype() == DType::I32 || targets.dtype() == DType::I64,
        "cross_entropy: targets must be i32 or i64, got {}", dtype_name(targets.dtype()));
  check(targets.dim() == 1 && targets.size(0) == logits.size(0),
        "cross_entropy: targets of shape {} for logits of shape {} (want [{}])", shape_str(targets.shape()),
        shape_str(logits.shape()), logits.size(0));
  if (targets.device() != logits.device() && !targets.device().is_cpu())
    fail("cross_entropy: targets on {}, logits on {}", targets.device().str(), logits.device().str());
  const int64_t N = logits.size(0), K = logits.size(1);
  const Tensor x = logits.detach().contiguous();
  // Targets on the host are checked (and, for the mean, counted) there: a GPU loss never waits.
  const detail::CheckedIndices checked =
      detail::checked_indices(targets, x.device(), [&](Backend& backend, const View& ids) {
        backend.check_targets(ids, K, ignore_index, "cross_entropy");
      });
  const Tensor& t = checked.ids;
  const bool copied = checked.copied;

  // Per-row losses, and each row's log-sum-exp for the backward (f32, or f64
  // for f64 logits as layer norm's statistics).
  Tensor row_loss = Tensor::empty({N}, x.dtype(), x.device());
  Tensor lse = Tensor::empty({N}, x.dtype() == DType::F64 ? DType::F64 : DType::F32, x.device());
  if (N > 0) backend_of(x).cross_entropy_forward(view_of(row_loss), view_of(lse), view_of(x), view_of(t), ignore_index);

  // Mean divides by the number of targets that count. When every target is
  // ignored that is 0 / 0, and the loss is NaN, as in PyTorch.
  double row_scale = 1.0;  // d(out) / d(row_loss[i]) for the reductions
  Tensor out;
  if (reduction == Reduction::None) {
    out = row_loss;
  } else if (reduction == Reduction::Sum) {
    out = sum(row_loss);
  } else {
    const std::vector<int64_t> ids = targets.to_vector<int64_t>();
    const auto counted = std::count_if(ids.begin(), ids.end(), [&](int64_t id) { return id != ignore_index; });
    row_scale = counted > 0 ? 1.0 / double(counted) : 0.0;  // ignored rows get zero gradient either way
    out = counted > 0 ? mul(sum(row_loss), row_scale)
                      : Tensor::full({}, std::numeric_limits<double>::quiet_NaN(), x.dtype(), x.device());
  }

  record(out, "cross_entropy", {logits},
         [x, t, copied, lse, ignore_index, reduction, row_scale, N, K](const Tensor& g,
                                                                      const Node&) -> std::vector<Tensor> {
           if (!copied)  // the caller's targets may have been edited since
             backend_of(t).check_targets(view_of(t), K, ignore_index, "cross_entropy_backward");
           const Tensor dloss =
               reduction == Reduction::None ? g.contiguous() : mul(g, row_scale).expand({N}).contiguous();
           Tensor dlogits = Tensor::empty(x.shape(), x.dtype(), x.device());
           if (N > 0)
             backend_of(x).cross_entropy_backward(view_of(dlogits), view_of(dloss), view_of(x), view_of(lse),
                                                  view_of(t), ignore_index);
           return {dlogits};
         });
  return out;
}

}  // namespace engine
