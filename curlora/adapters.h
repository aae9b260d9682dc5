// Adapter layers that wrap a frozen Linear: y = base(x) + x ΔW, with ΔW kept
// factored while training. CurLoRALinear: ΔW = α C U R (paper §3, only U
// trains). LoRALinear: ΔW = α A B (the reference code's LoRALayer). Both can
// merge ΔW into the base weight for zero-cost inference, and unmerge it.
#pragma once

#include "curlora/cur.h"
#include "engine/nn/layers.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace curlora {

using engine::nn::Linear;

// What CURLoRA and LoRA share: the wrapped layer (child "base_layer", frozen
// by the constructor), the scale α, merging, and ΔW for diagnostics.
class AdapterLinear : public engine::nn::Module {
 public:
  AdapterLinear(std::shared_ptr<Linear> base, double alpha);

  // base(x) + x ΔW; once merged, base(x) alone (ΔW is inside the weight).
  // Merged adapters are for inference: U (or A, B) gets no gradient then.
  // Unmerged, it is engine::concat_linear(x, update_head(x), W, update_tail()).
  Tensor forward(const Tensor& x) override;

  Linear& base_layer() const;
  double alpha() const { return alpha_; }
  virtual int64_t rank() const = 0;
  bool merged() const { return merged_; }

  // W <- W + ΔW and W <- W - ΔW, computed in f32 (at least). Merging twice,
  // or unmerging an unmerged layer, is an error.
  void merge();
  void unmerge();

  // ΔW in the base weight's stored layout ([in, out] for Conv1D). It builds
  // the m x n matrix, so it is for merging and diagnostics, never training.
  virtual Tensor delta_weight() const = 0;
  // ||ΔW||_F from r x r Gram matrices, in f64: no m x n matrix is built.
  virtual double delta_norm() const = 0;
  // x ΔW for an input batch, factored (the change this adapter makes to the
  // output): update_head(x) @ update_tail(), where the tail is the last factor,
  // a plain matrix, so forward() adds the update to the base's output in that
  // GEMM itself (engine::addmm).
  Tensor update(const Tensor& x) const { return engine::matmul(update_head(x), update_tail()); }
  virtual Tensor update_head(const Tensor& x) const = 0;
  virtual Tensor update_tail() const = 0;
  // The trainable tensors by name ("U", or "A" and "B"), for reports.
  virtual std::vector<std::pair<std::string, Tensor>> trainable_tensors() const = 0;

  // While on, forward() keeps (detached) its latest input, for output-shift diagnostics.
  void capture_inputs(bool enabled);
  const Tensor& captured_input() const { return captured_; }

 private:
  double alpha_;
  bool merged_ = false;
  bool capture_ = false;
  Tensor captured_;
};

// CURLoRA: C = W[:, cols] and R = W[rows, :] are fixed buffers taken from the
// weight as stored; U (r x r) starts at zero and is the only parameter.
// For a Conv1D weight [in, out]: x ΔW = α ((x C) U) R, never forming C U R.
// For a torch Linear [out, in] ΔW is applied transposed, as the reference
// does for nn.Linear: x (C U R)^T = α ((x R^T) U^T) C^T. (The reference picks
// the orientation by trying x (C U R)^T first, so on a square Conv1D such as
// attn.c_proj it would transpose too; we follow the layout, not that accident.)
class CurLoRALinear : public AdapterLinear {
 public:
  CurLoRALinear(std::shared_ptr<Linear> base, CurSelection selection, double alpha);

  std::string type_name() const override { return "CurLoRALinear"; }
  int64_t rank() const override { return int64_t(selection_.cols.size()); }
  const CurSelection& selection() const { return selection_; }

  Tensor delta_weight() const override;
  double delta_norm() const override;
  Tensor update_head(const Tensor& x) const override;
  Tensor update_tail() const override;
  std::vector<std::pair<std::string, Tensor>> trainable_tensors() const override { return {{"U", U}}; }
  // The columns of room after x's rows that let the forward's products run
  // as one GEMM (engine::concat_linear), while unmerged and R is stacked: the
  // rank, or with the bias stacked too, up to engine::joint_rows. A model asks
  // the layer norm that feeds this layer for them.
  int64_t input_room() const override;

  Tensor U;     // [r, r], trainable
  Tensor C, R;  // [rows of W, r] and [r, cols of W], buffers

  // Stores R's rows right after the base weight's, in one buffer, so that the
  // forward's one GEMM reads [W; R] (engine::concat_linear), and the bias's
  // after them, then zero rows, where it has W's dtype and device; values,
  // names and dtypes stay. Only for a Conv1D ([in, out]) weight of R's dtype
  // and device; the constructor and store_frozen_weights call it.
  void stack_tail();
  bool tail_stacked() const;  // whether R's rows follow W's
  bool bias_stacked() const;  // and the bias's R's

 private:
  CurSelection selection_;
};

// LoRA as the reference code builds it: A [in, r] from torch's
// kaiming_uniform_(a=sqrt(5)) (fan_in = size(1) = r, so U(-1/sqrt(r), 1/sqrt(r))),
// B [r, out] zeros, and x ΔW = α (x A) B whatever the base's weight layout.
class LoRALinear : public AdapterLinear {
 public:
  LoRALinear(std::shared_ptr<Linear> base, int64_t rank, double alpha, engine::Generator& gen);

  std::string type_name() const override { return "LoRALinear"; }
  int64_t rank() const override { return A.size(1); }

  Tensor delta_weight() const override;
  double delta_norm() const override;
  Tensor update_head(const Tensor& x) const override;
  Tensor update_tail() const override { return B; }
  std::vector<std::pair<std::string, Tensor>> trainable_tensors() const override { return {{"A", A}, {"B", B}}; }

  Tensor A;  // [in, r]
  Tensor B;  // [r, out]
};

// Mixed precision's memory half for a model with adapters: what
// engine::nn::store_frozen_linear_weights converts (every frozen Linear's
// weight and bias), and CURLoRA's frozen factors C and R. In `dtype` they are
// exactly what gathering them from the converted weight gives, and autocast
// then has nothing to round at every call. Returns how many tensors it converted.
int64_t store_frozen_weights(engine::nn::Module& root, engine::DType dtype);

}  // namespace curlora
