// CudaBackend's fused nn ops, attention, dropout and AdamW (the class is in
// cuda_backend_impl.h): checks, layouts and scratch, then the launchers of
// nn.cu, softmax.cu, attention*.cu, random.cu and optim.cu on the stream.
#include "engine/cuda/attention_plan.h"
#include "engine/cuda/cuda_backend_impl.h"
#include "engine/cuda/op_scope.h"

#include <vector>

namespace engine::cuda {

// ---- layer norm, gelu, softmax, cross-entropy ----

void CudaBackend::layer_norm_forward(const View& y, const View& mean, const View& rstd, const View& x,
                                     const View& weight, const View& bias, double eps) {
  OpScope op(ctx_, "layer_norm");
  require_floating(x.dtype, "layer_norm");
  const auto [rows, cols] = rows_of(x);
  ctx_.check_launch(cuda::launch_layer_norm_forward(ctx_.launch(), x.dtype, rows, cols, y.data, y.row_stride(),
                                                    y.dtype == DType::BF16, mean.data, rstd.data, x.data, weight.data,
                                                    bias.data, eps),
                    "layer_norm");
}

void CudaBackend::layer_norm_backward(const View& dx, const View& dweight, const View& dbias, const View& dy,
                                      const View& x, const View& weight, const View& mean, const View& rstd,
                                      const View& residual) {
  OpScope op(ctx_, "layer_norm_backward");
  require_floating(x.dtype, "layer_norm_backward");
  const auto [rows, cols] = rows_of(x);
  const cuda::LaunchContext lc = ctx_.launch();
  const bool dy_bf16 = dy.dtype == DType::BF16;
  if (dx.data)
    ctx_.check_launch(cuda::launch_layer_norm_backward_input(lc, x.dtype, rows, cols, dx.data, dy.data, dy_bf16,
                                                             x.data, weight.data, mean.data, rstd.data,
                                                             residual.data),
                      "layer_norm_backward");
  if (!dweight.data && !dbias.data) return;  // frozen: no column sums at all
  Scratch partials(ctx_, cuda::layer_norm_params_scratch_bytes(lc, x.dtype, rows, cols), "layer_norm partial sums");
  ctx_.check_launch(cuda::launch_layer_norm_backward_params(lc, x.dtype, rows, cols, dweight.data, dbias.data, dy.data,
                                                            dy_bf16, x.data, mean.data, rstd.data, partials.get()),
                    "layer_norm_backward");
}

void CudaBackend::gelu_forward(const View& y, const View& x) {
  OpScope op(ctx_, "gelu");
  require_floating_or_bf16(x.dtype, "gelu");
  ctx_.check_launch(cuda::launch_gelu_forward(ctx_.launch(), x.dtype, x.numel(), y.data, x.data), "gelu");
}

void CudaBackend::gelu_backward(const View& dx, const View& dy, const View& x) {
  OpScope op(ctx_, "gelu_backward");
  require_floating_or_bf16(x.dtype, "gelu_backward");
  ctx_.check_launch(cuda::launch_gelu_backward(ctx_.launch(), x.dtype, x.numel(), dx.data, dy.data, x.data),
                    "gelu_backward");
}

void CudaBackend::softmax_forward(const View& y, const View& x, bool log) {
  OpScope op(ctx_, "softmax");
  require_floating(x.dtype, "softmax");
  const auto [rows, cols] = rows_of(x);
  ctx_.check_launch(cuda::launch_softmax_forward(ctx_.launch(), x.dtype, rows, cols, y.data, x.data, log), "softmax");
}

void CudaBackend::softmax_backward(const View& dx, const View& dy, const View& y, bool log) {
  OpScope op(ctx_, "softmax_backward");
  require_floating(y.dtype, "softmax_backward");
  const auto [rows, cols] = rows_of(y);
  ctx_.check_launch(cuda::launch_softmax_backward(ctx_.launch(), y.dtype, rows, cols, dx.data, dy.data, y.data, log),
                    "softmax_backward");
}

void CudaBackend::cross_entropy_forward(const View& loss, const View& lse, const View& logits, const View& targets,
                                        int64_t ignore_index) {
  OpScope op(ctx_, "cross_entropy");
  require_floating(logits.dtype, "cross_entropy");
  const auto [rows, cols] = rows_of(logits);
  ctx_.check_launch(cuda::launch_cross_entropy_forward(ctx_.launch(), logits.dtype, rows, cols, loss.data, lse.data,
                                                       logits.data, targets.data, targets.dtype, ignore_index),
                    "cross_entropy");
}

void CudaBackend::cross_entropy_backward(const View& dlogits, const View& dloss, const View& logits, const View& lse,
                                         const View& targets, int64_t ignore_index) {
  OpScope op(ctx_, "cross_entropy_backward");
  require_floating(logits.dtype, "cross_entropy_backward");
  const auto [rows, cols] = rows_of(logits);
  ctx_.check_launch(cuda::launch_cross_entropy_backward(ctx_.launch(), logits.dtype, rows, cols, dlogits.data,
                                                        dloss.data, logits.data, lse.data, targets.data,
                                                        targets.dtype, ignore_index),
                    "cross_entropy_backward");
}

// ---- attention ----
// The tensor-core kernels take the operands as they are (attention_plan.h).
// Every other call runs on contiguous operands in the compute dtype (f32, or
// f64): bf16 inputs of larger heads are widened, which the f32 kernels then
// multiply exactly, and a bf16 output is rounded once at the end.

namespace {

DType compute_dtype(const View& q) { return q.dtype == DType::F64 ? DType::F64 : DType::F32; }

}  // namespace

void CudaBackend::attention_forward(const View& out, const View& lse, const View& q, const View& k, const View& v,
                                    const View& key_mask, const AttentionArgs& args) {
  cuda::check_attention_dtypes(q, out, "attention");
  const cuda::AttentionViews views{q, k, v, out};
  if (!cuda::tensor_core_fits(views)) {
    const DType t = compute_dtype(q);
    if (!KernelOperands::fit({&out, &q, &k, &v}, t)) {
      KernelOperands ops(*this);
      attention_forward(ops.out(out, t), lse, ops.in(q, t), ops.in(k, t), ops.in(v, t), key_mask, args);
      return ops.finish();
    }
  }
  const cuda::AttentionShape s = cuda::attention_shape(views, key_mask, args);
  OpScope op(ctx_, "attention_forward", cuda::attention_flops(s, 4));
  ctx_.check_launch(cuda::launch_attention_forward(ctx_.launch(), q.dtype, s, out.data, lse.ptr<float>(), q.data,
                                                   k.data, v.data),
                    "attention_forward");
}

void CudaBackend::attention_backward(const View& dq, const View& dk, const View& dv, const View& dout, const View& q,
                                     const View& k, const View& v, const View& out, const View& lse,
                                     const View& key_mask, const AttentionArgs& args) {
  cuda::check_attention_dtypes(q, out, "attention_backward");
  const cuda::AttentionViews views{q, k, v, out, dout, dq, dk, dv};
  if (!cuda::tensor_core_fits(views)) {
    const DType t = compute_dtype(q);
    if (!KernelOperands::fit({&dq, &dk, &dv, &dout, &q, &k, &v, &out}, t)) {
      KernelOperands ops(*this);
      attention_backward(ops.out(dq, t), ops.out(dk, t), ops.out(dv, t), ops.in(dout, t), ops.in(q, t),
                         ops.in(k, t), ops.in(v, t), ops.in(out, t), lse, key_mask, args);
      return ops.finish();
    }
  }
  const cuda::AttentionShape s = cuda::attention_shape(views, key_mask, args);
  OpScope op(ctx_, "attention_backward", cuda::attention_flops(s, 10));
  const size_t scratch_bytes = cuda::attention_backward_scratch_bytes(q.dtype, s);
  Scratch scratch(ctx_, scratch_bytes, "attention_backward rowsum(dO * O) and score gradients");
  ctx_.check_launch(cuda::launch_attention_backward(ctx_.launch(), q.dtype, s, dq.data, dk.data, dv.data, dout.data,
                                                    q.data, k.data, v.data, out.data, lse.ptr<const float>(),
                                                    scratch.get(), scratch_bytes),
                    "attention_backward");
}

// ---- dropout and AdamW ----

void CudaBackend::dropout_add_layer_norm(const View& r, const View& in, const View& residual, double p,
                                         uint64_t seed, uint64_t offset, const View& y, const View& mean,
                                         const View& rstd, const View& weight, const View& bias, double eps) {
  const auto [rows, cols] = rows_of(r);
  const bool f32 = r.dtype == DType::F32 && residual.dtype == DType::F32 && weight.dtype == DType::F32 &&
                   bias.dtype == DType::F32 && (in.dtype == DType::F32 || in.dtype == DType::BF16);
  const int64_t y_ld = y.row_stride();
  if (!f32 || y_ld % 4 != 0 ||
      !cuda::layer_norm_rows_fit(cols, {r.data, in.data, residual.data, y.data, weight.data, bias.data}))
    return Backend::dropout_add_layer_norm(r, in, residual, p, seed, offset, y, mean, rstd, weight, bias, eps);
  OpScope op(ctx_, "dropout_add_layer_norm");
  ctx_.check_launch(cuda::launch_dropout_add_layer_norm(ctx_.launch(), in.dtype, rows, cols, r.data, in.data,
                                                        residual.data, p, seed, offset, y.data, y_ld,
                                                        y.dtype == DType::BF16, mean.data, rstd.data, weight.data,
                                                        bias.data, eps),
                    "dropout_add_layer_norm");
}

void CudaBackend::layer_norm_backward_dropout(const View& dx, const View& dy, const View& x, const View& weight,
                                              const View& mean, const View& rstd, const View& residual,
                                              const View& dropped, double p, uint64_t seed, uint64_t offset) {
  const auto [rows, cols] = rows_of(x);
  auto f32_or_bf16 = [](DType t) { return t == DType::F32 || t == DType::BF16; };
  const bool f32 = x.dtype == DType::F32 && weight.dtype == DType::F32 && f32_or_bf16(dy.dtype) &&
                   f32_or_bf16(dropped.dtype) && (!residual.data || residual.dtype == DType::F32);
  if (!f32 || !cuda::layer_norm_rows_fit(cols, {dx.data, dy.data, x.data, weight.data, residual.data, dropped.data}))
    return Backend::layer_norm_backward_dropout(dx, dy, x, weight, mean, rstd, residual, dropped, p, seed, offset);
  OpScope op(ctx_, "layer_norm_backward_dropout");
  ctx_.check_launch(cuda::launch_layer_norm_backward_dropout(
                        ctx_.launch(), rows, cols, dx.data, dy.data, dy.dtype == DType::BF16, x.data, weight.data,
                        mean.data, rstd.data, residual.data, dropped.data, dropped.dtype == DType::BF16, p, seed,
                        offset),
                    "layer_norm_backward_dropout");
}

void CudaBackend::dropout(const View& out, const View& in, double p, uint64_t seed, uint64_t offset,
                          const View& residual) {
  OpScope op(ctx_, "dropout");
  require_floating_or_bf16(in.dtype, "dropout");
  ctx_.check_launch(cuda::launch_dropout(ctx_.launch(), in.dtype, out.dtype, in.numel(), out.data, in.data,
                                         residual.data, p, seed, offset),
                    "dropout");
}

// The per-step scalars are formed in double exactly as cpu_optim.cpp forms
// them (this file is also built with -ffp-contract=off); see optim.cu.
void CudaBackend::adamw_step(std::span<const AdamWTensors> tensors, const AdamWArgs& a) {
  OpScope op(ctx_, "adamw");
  if (tensors.empty()) return;
  const DType dtype = tensors[0].param.dtype;
  require_floating(dtype, "adamw_step");
  std::vector<cuda::AdamWBuffers> buffers;
  buffers.reserve(tensors.size());
  for (const AdamWTensors& t : tensors)
    buffers.push_back({t.param.numel(), t.param.data, t.grad.data, t.m.data, t.v.data});
  const double bias_correction1 = 1 - std::pow(a.beta1, double(a.step));
  const double bias_correction2 = 1 - std::pow(a.beta2, double(a.step));
  cuda::AdamWScalars s;
  s.decay = 1 - a.lr * a.weight_decay;
  s.beta1 = a.beta1;
  s.one_minus_beta1 = 1 - a.beta1;
  s.beta2 = a.beta2;
  s.one_minus_beta2 = 1 - a.beta2;
  s.neg_step_size = -(a.lr / bias_correction1);
  s.bias_correction2_sqrt = std::sqrt(bias_correction2);
  s.eps = a.eps;
  ctx_.check_launch(cuda::launch_adamw(ctx_.launch(), dtype, buffers, s), "adamw_step");
}

}  // namespace engine::cuda
