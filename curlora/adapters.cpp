// CurLoRALinear and LoRALinear: factored forwards, merge/unmerge, and the
// Frobenius norm of ΔW from small Gram matrices.
#include "curlora/adapters.h"

#include "engine/error.h"
#include "engine/ops.h"
#include "engine/precision.h"

#include <algorithm>
#include <cmath>
#include <unordered_set>

namespace curlora {

using engine::check;
using engine::DType;
using engine::matmul;
using engine::WeightLayout;

namespace {

Tensor as_f64(const Tensor& t) { return t.detach().to(engine::Device::cpu()).to(DType::F64); }

// ||L M R||_F without forming the product: ||L M R||^2 = tr(LᵀL · M · R Rᵀ · Mᵀ),
// and tr(X Mᵀ) is the sum of X ∘ M. An undefined M stands for the identity.
double product_norm(const Tensor& left, const Tensor& middle, const Tensor& right) {
  engine::NoGradGuard no_grad;
  const Tensor l = as_f64(left), r = as_f64(right);
  const Tensor gram_left = matmul(l.transpose(0, 1), l), gram_right = matmul(r, r.transpose(0, 1));
  double squared;
  if (middle.defined()) {
    const Tensor m = as_f64(middle);
    squared = engine::sum(matmul(matmul(gram_left, m), gram_right) * m).item();
  } else {
    squared = engine::sum(gram_left * gram_right).item();  // both symmetric
  }
  return std::sqrt(std::max(squared, 0.0));  // rounding can leave a tiny negative
}

Tensor scaled(const Tensor& t, double alpha) { return alpha == 1.0 ? t : t * alpha; }

// Trainable adapter weights are f32 master copies even when the frozen base
// weight is stored in bf16 (mixed precision, engine/precision.h).
DType master_dtype(const Tensor& base_weight) { return base_weight.dtype() == DType::F64 ? DType::F64 : DType::F32; }

}  // namespace

// ---- AdapterLinear ----

AdapterLinear::AdapterLinear(std::shared_ptr<Linear> base, double alpha) : alpha_(alpha) {
  check(base != nullptr, "adapter: the base layer is null");
  check(std::isfinite(alpha), "adapter: alpha must be finite, got {}", alpha);
  for (const auto& [name, t] : base->named_parameters()) Tensor(t).set_requires_grad(false);
  register_module("base_layer", std::move(base));
}

Linear& AdapterLinear::base_layer() const { return static_cast<Linear&>(child("base_layer")); }

Tensor AdapterLinear::forward(const Tensor& x) {
  if (capture_) captured_ = x.detach();
  // Under autocast both products read x in bf16: it is rounded once for the two.
  const std::optional<DType> autocast = engine::autocast_dtype_for(x.dtype());
  const Tensor input = autocast && !merged_ ? x.to(*autocast) : x;
  if (merged_) return child("base_layer")(input);
  // x W + b + head(x) tail: W's product with r more inputs. Where x has room
  // for them and the tail is stored after W (CurLoRALinear's R), one GEMM.
  const Linear& base = base_layer();
  const Tensor w = base.layout == WeightLayout::InOut ? base.weight : base.weight.transpose(0, 1);
  return engine::concat_linear(input, update_head(input), w, update_tail(), base.bias);
}

void AdapterLinear::merge() {
  check(!merged_, "{}: already merged", type_name());
  engine::NoGradGuard no_grad;
  Tensor& w = base_layer().weight;
  const DType compute = master_dtype(w);
  w.copy_((w.to(compute) + delta_weight().to(compute)).to(w.dtype()));
  merged_ = true;
}

void AdapterLinear::unmerge() {
  check(merged_, "{}: not merged", type_name());
  engine::NoGradGuard no_grad;
  Tensor& w = base_layer().weight;
  const DType compute = master_dtype(w);
  w.copy_((w.to(compute) - delta_weight().to(compute)).to(w.dtype()));
  merged_ = false;
}

void AdapterLinear::capture_inputs(bool enabled) {
  capture_ = enabled;
  if (!enabled) captured_ = Tensor();
}

// ---- CurLoRALinear ----

CurLoRALinear::CurLoRALinear(std::shared_ptr<Linear> base, CurSelection selection, double alpha)
    : AdapterLinear(base, alpha), selection_(std::move(selection)) {
  const int64_t r = int64_t(selection_.cols.size());
  check(r > 0 && selection_.rows.size() == selection_.cols.size(),
        "CurLoRALinear: need as many rows as columns (> 0), got {} columns and {} rows", selection_.cols.size(),
        selection_.rows.size());
  const Tensor& w = base->weight;
  C = register_buffer("C", gather_columns(w, selection_.cols));
  R = register_buffer("R", gather_rows(w, selection_.rows));
  U = register_parameter("U", Tensor::zeros({r, r}, master_dtype(w), w.device()));
  stack_tail();
}

bool CurLoRALinear::tail_stacked() const { return engine::stacked_after(R, base_layer().weight); }

bool CurLoRALinear::bias_stacked() const { return tail_stacked() && engine::stacked_after(base_layer().bias, R); }

int64_t CurLoRALinear::input_room() const {
  if (merged() || !tail_stacked()) return 0;
  const int64_t k1 = base_layer().weight.size(0);
  return bias_stacked() ? engine::joint_rows(k1, rank()) - k1 : rank();
}

void CurLoRALinear::stack_tail() {
  Tensor &w = base_layer().weight, &b = base_layer().bias;
  const bool stackable = base_layer().layout == WeightLayout::InOut && w.dtype() == R.dtype() &&
                         w.device() == R.device() && w.is_contiguous() && R.is_contiguous();
  if (!stackable) return;
  const bool with_bias = b.defined() && b.dtype() == w.dtype() && b.device() == w.device();
  if (tail_stacked() && bias_stacked() == with_bias) return;  // as it would lay them out already
  const int64_t k1 = w.size(0), r = R.size(0);
  engine::NoGradGuard no_grad;
  // Zeros: concat_linear's GEMM multiplies the rows after the bias by zeros, which NaNs would spoil.
  const Tensor stacked =
      Tensor::zeros({with_bias ? engine::joint_rows(k1, r) : k1 + r, w.size(1)}, w.dtype(), w.device());
  const Tensor w_rows = stacked.narrow(0, 0, k1), r_rows = stacked.narrow(0, k1, r);
  Tensor(w_rows).copy_(w);
  Tensor(r_rows).copy_(R);
  w.set_data(w_rows);  // every handle to W, R and the bias follows
  R.set_data(r_rows);
  if (!with_bias) return;
  const Tensor b_row = stacked.narrow(0, k1 + r, 1).reshape({w.size(1)});
  Tensor(b_row).copy_(b);
  b.set_data(b_row);
}

// x ΔW = (α (x C)) U, then R; or for [out, in] (α (x R^T)) U^T, then C^T.
Tensor CurLoRALinear::update_head(const Tensor& x) const {
  if (base_layer().layout == WeightLayout::InOut) return matmul(scaled(matmul(x, C), alpha()), U);
  return matmul(scaled(matmul(x, R.transpose(0, 1)), alpha()), U.transpose(0, 1));
}

Tensor CurLoRALinear::update_tail() const {
  return base_layer().layout == WeightLayout::InOut ? R : C.transpose(0, 1);
}

Tensor CurLoRALinear::delta_weight() const {
  engine::NoGradGuard no_grad;
  // In U's (master) dtype: C and R may be bf16 copies of a bf16-stored weight.
  return scaled(matmul(matmul(C.to(U.dtype()), U), R.to(U.dtype())), alpha());  // the stored layout in both cases
}

double CurLoRALinear::delta_norm() const { return std::abs(alpha()) * product_norm(C, U, R); }

// ---- LoRALinear ----

LoRALinear::LoRALinear(std::shared_ptr<Linear> base, int64_t rank, double alpha, engine::Generator& gen)
    : AdapterLinear(base, alpha) {
  check(rank > 0, "LoRALinear: rank must be positive, got {}", rank);
  const Tensor& w = base->weight;
  // torch.nn.init.kaiming_uniform_(A, a=sqrt(5)) on A [in, r]: gain sqrt(2/(1+5)),
  // bound = gain * sqrt(3 / fan_in) = 1/sqrt(fan_in), and fan_in is size(1) = r.
  const double bound = 1.0 / std::sqrt(double(rank));
  A = register_parameter("A", Tensor::rand({base->in_features, rank}, gen, -bound, bound, master_dtype(w), w.device()));
  B = register_parameter("B", Tensor::zeros({rank, base->out_features}, master_dtype(w), w.device()));
}

Tensor LoRALinear::update_head(const Tensor& x) const { return scaled(matmul(x, A), alpha()); }

Tensor LoRALinear::delta_weight() const {
  engine::NoGradGuard no_grad;
  Tensor ab = scaled(matmul(A, B), alpha());  // [in, out]
  return base_layer().layout == WeightLayout::InOut ? ab : ab.transpose(0, 1).contiguous();
}

double LoRALinear::delta_norm() const { return std::abs(alpha()) * product_norm(A, Tensor(), B); }

// ---- mixed precision ----

int64_t store_frozen_weights(engine::nn::Module& root, DType dtype) {
  int64_t converted = engine::nn::store_frozen_linear_weights(root, dtype);
  std::unordered_set<const engine::TensorImpl*> factors;
  for (const engine::nn::Module* module : root.self_and_descendants())
    if (auto* cur = dynamic_cast<const CurLoRALinear*>(module))
      for (const Tensor* t : {&cur->C, &cur->R}) factors.insert(&t->impl());
  root.to(dtype, [&](const std::string&, const Tensor& t) {
    const bool chosen = factors.contains(&t.impl()) && t.dtype() != dtype;
    converted += chosen;
    return chosen;
  });
  if (auto* cur = dynamic_cast<CurLoRALinear*>(&root)) cur->stack_tail();  // converted one by one: stacked again
  for (const auto& [name, module] : root.named_modules())
    if (auto* cur = dynamic_cast<CurLoRALinear*>(module.get())) cur->stack_tail();
  return converted;
}

}  // namespace curlora
