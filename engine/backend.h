// The kernel interface every device implements (engine/cpu now, engine/cuda
// next), in the spirit of ggml's backend vtable and candle's BackendStorage.
// Ops in engine/ops check shapes and dtypes once, allocate outputs, then call
// these kernels; kernels trust their arguments.
#pragma once

#include "engine/device.h"
#include "engine/dtype.h"
#include "engine/shape.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <span>

namespace engine {

class Tensor;

// A tensor as a kernel sees it: a pointer to its first element plus shape and
// strides in elements. Broadcast dims have stride 0.
struct View {
  void* data = nullptr;
  DType dtype = DType::F32;
  Shape shape;
  Shape strides;

  int64_t numel() const { return engine::numel(shape); }
  bool is_contiguous() const;
  // How far apart its rows start, in elements, for a view whose last dim is
  // contiguous and whose other dims fold into rows that far apart (a layer
  // norm's output may leave room after each row: engine::layer_norm); nothing
  // for other views. row_stride() throws for them.
  std::optional<int64_t> even_row_stride() const;
  int64_t row_stride() const;
  template <typename T> T* ptr() const { return static_cast<T*>(data); }
};

View view_of(const Tensor& t);  // the tensor's own view

enum class UnaryOp { Neg, Exp, Log, Sqrt, Rsqrt, Tanh, Abs, Square, Pow, AddScalar, MulScalar, Relu, Sigmoid };
enum class BinaryOp { Add, Sub, Mul, Div, Maximum, Minimum, Equal, Greater };  // comparisons give 1 or 0
enum class ReduceOp { Sum, Max };

// Row-major C[b] = alpha * op(A[b]) @ op(B[b]) + beta * C[b] for b < batch.
// op(X) is X or X^T; lda/ldb/ldc are row strides as stored; stride_* step between batches.
// C has A's and B's dtype, except that bf16 inputs may write an f32 C: the
// products are accumulated in f32 either way, and mixed precision keeps them.
struct GemmArgs {
  DType dtype = DType::F32;    // of A and B
  DType c_dtype = DType::F32;  // of C: dtype, or f32 when dtype is bf16
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  const void* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  void* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
  int64_t batch = 1;
  double alpha = 1, beta = 0;
  // With beta != 0, what beta scales when it is not C's own contents: laid out
  // as C but for its row stride, C = alpha AB + beta addend (addmm writes a new
  // tensor this way). A bias may ride with it, a GELU not.
  const void* addend = nullptr;
  int64_t ld_addend = 0;  // its row stride, 0 for ldc (batches stride_c apart, as C's)
  // Epilogue, applied after the product (and the beta term, for a bias) to the
  // f32 (or f64) sums before C is rounded to its dtype; a GPU applies it in the
  // GEMM's own pass over C where it can:
  const void* bias = nullptr;  // optional [n] vector in C's dtype, added to every row of C
  // GPT-2's GELU (gelu_new, the tanh form) last: C = gelu(AB + bias). Then
  // pre_gelu, laid out as C, must be given: it receives AB + bias, which the backward needs.
  bool gelu = false;
  // Or the GELU's backward (no bias): C = AB * gelu'(pre_gelu), pre_gelu read.
  // The dX GEMM of a layer whose input is a GELU's output then hands back the
  // gradient of the GELU's input, without a pass of its own.
  bool gelu_grad = false;
  void* pre_gelu = nullptr;

  // What a GELU epilogue needs of C (and of pre_gelu, laid out as C): no gaps.
  bool c_is_contiguous() const { return ldc == n && (batch == 1 || stride_c == m * n); }
};

// How attention masks, scales and drops its scores. Query i sees key j when the
// key mask keeps j and, if causal, j <= i + Tk - Tq. With dropout_p > 0 each
// probability P[b, h, i, j] is kept, times 1 / (1 - p), when
// philox_uniform16(dropout_seed, dropout_offset, ((b * H + h) * Tq + i) * Tk + j) >= p:
// a pure function of its index, so the backward and the CPU and CUDA kernels
// all drop the same entries without storing a mask. (16-bit uniforms: eight
// per Philox block, half the generator's work of 24-bit ones.)
struct AttentionArgs {
  bool causal = true;
  double scale = 1;
  double dropout_p = 0;
  uint64_t dropout_seed = 0, dropout_offset = 0;
};

// Hyper-parameters of one AdamW update (torch.optim.AdamW semantics).
struct AdamWArgs {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;
  int64_t step = 1;  // 1-based, after incrementing, for bias correction
};

// One parameter's arrays for AdamW: the parameter, its gradient and moments.
struct AdamWTensors {
  View param, grad, m, v;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;

  // ---- memory ----
  virtual void* allocate(size_t nbytes) = 0;
  virtual void deallocate(void* ptr, size_t nbytes) = 0;
  virtual void copy_from_host(void* dst, const void* host_src, size_t nbytes) = 0;
  virtual void copy_to_host(void* host_dst, const void* src, size_t nbytes) = 0;

  // ---- copies, fills, casts: any strides, dst.dtype may differ from src.dtype ----
  virtual void copy(const View& dst, const View& src) = 0;
  virtual void fill(const View& dst, double value) = 0;
  // Contiguous dst <- Philox stream (seed, offset): uniform [a, b) or normal (mean a, std b).
  virtual void fill_uniform(const View& dst, uint64_t seed, uint64_t offset, double low, double high) = 0;
  virtual void fill_normal(const View& dst, uint64_t seed, uint64_t offset, double mean, double std) = 0;

  // ---- elementwise (any strides; inputs already broadcast to out's shape) ----
  // binary's operands may be narrower floats than out (promotion: bf16 + f32 into f32).
  virtual void unary(UnaryOp op, const View& out, const View& in, double scalar) = 0;
  virtual void binary(BinaryOp op, const View& out, const View& a, const View& b) = 0;
  virtual void where(const View& out, const View& condition, const View& a, const View& b) = 0;  // cond != 0 ? a : b

  // ---- reductions: out has in's rank with 1 in every reduced dim ----
  virtual void reduce(ReduceOp op, const View& out, const View& in) = 0;
  // Index of the max along the last dim of contiguous in [rows, cols] -> out i64 [rows].
  virtual void argmax_last(const View& out, const View& in) = 0;

  // ---- matrix multiply ----
  virtual void gemm(const GemmArgs& args) = 0;

  // ---- index checks ----
  // Throw engine::Error naming `op` when an index lies outside [0, rows), or a target outside
  // [0, classes) is not ignore_index. Ops run them before the kernels that read indices, which
  // trust what they are given. On a GPU the check waits for the device's answer.
  virtual void check_indices(const View& index, int64_t rows, const char* op) = 0;
  virtual void check_targets(const View& targets, int64_t classes, int64_t ignore_index, const char* op) = 0;

  // ---- indexing (contiguous; indices checked) ----
  // out[i, :] = table[index[i], :] ; index is i32 or i64.
  virtual void index_select_rows(const View& out, const View& table, const View& index) = 0;
  // grad_table[index[i], :] += grad_out[i, :]
  virtual void index_add_rows(const View& grad_table, const View& index, const View& grad_out) = 0;

  // ---- fused neural-network kernels (contiguous, rows x cols over the last dim) ----
  // mean/rstd are f32 [rows] (f64 for f64 input), saved for the backward. y has
  // x's dtype, or bf16 for f32 x (rounded once); dy then has y's dtype. The
  // forwards' y rows may start further apart than cols (View::row_stride).
  virtual void layer_norm_forward(const View& y, const View& mean, const View& rstd, const View& x, const View& weight,
                                  const View& bias, double eps) = 0;
  // dweight/dbias may have data == nullptr: then they are not computed (frozen);
  // otherwise they are overwritten, not accumulated. dx = residual + the input's
  // gradient, the residual optional (data == nullptr) and of dx's dtype: the
  // gradient is rounded to dx's dtype, then added, as a separate add would.
  virtual void layer_norm_backward(const View& dx, const View& dweight, const View& dbias, const View& dy,
                                   const View& x, const View& weight, const View& mean, const View& rstd,
                                   const View& residual) = 0;
  virtual void gelu_forward(const View& y, const View& x) = 0;
  virtual void gelu_backward(const View& dx, const View& dy, const View& x) = 0;
  virtual void softmax_forward(const View& y, const View& x, bool log) = 0;
  virtual void softmax_backward(const View& dx, const View& dy, const View& y, bool log) = 0;
  // logits [N, K]; targets i32/i64 [N], checked; loss [N] per row (0 where ignored); lse [N] f32 saved.
  virtual void cross_entropy_forward(const View& loss, const View& lse, const View& logits, const View& targets,
                                     int64_t ignore_index) = 0;
  // dlogits = dloss[i] * (softmax(logits[i]) - onehot(target[i])); dloss [N].
  virtual void cross_entropy_backward(const View& dlogits, const View& dloss, const View& logits, const View& lse,
                                      const View& targets, int64_t ignore_index) = 0;
  // q, out [B, H, Tq, D]; k, v [B, H, Tk, D], each with any strides; key_mask i32 [B, Tk]
  // (nonzero keep, 0 pad) or data == nullptr. q, k, v (and dout) may be bf16 with out and
  // dq, dk, dv each f32 or bf16: mixed precision, products of bf16 values accumulated in
  // f32. lse f32 [B, H, Tq] (contiguous; of the probabilities before dropout) is saved
  // for the backward; rows that see no key give zeros and lse = -inf. In the backward,
  // dq/dk/dv may have data == nullptr (not computed); they are overwritten.
  virtual void attention_forward(const View& out, const View& lse, const View& q, const View& k, const View& v,
                                 const View& key_mask, const AttentionArgs& args) = 0;
  virtual void attention_backward(const View& dq, const View& dk, const View& dv, const View& dout, const View& q,
                                  const View& k, const View& v, const View& out, const View& lse,
                                  const View& key_mask, const AttentionArgs& args) = 0;
  // out = residual + in * keep / (1 - p), keep = philox_uniform(seed, offset, i) >= p, the residual
  // optional (data == nullptr) and of out's dtype; the backward calls it on the gradient. in and out
  // are contiguous, of one dtype or bf16 and f32 either way; the result is rounded to out's once.
  virtual void dropout(const View& out, const View& in, double p, uint64_t seed, uint64_t offset,
                       const View& residual) = 0;
  // r = residual + dropout(in) as dropout() gives it, then layer_norm_forward(y, mean, rstd, r, ...): the
  // residual stream and its layer norm in one pass where a backend has a kernel for it, else the two calls.
  virtual void dropout_add_layer_norm(const View& r, const View& in, const View& residual, double p, uint64_t seed,
                                      uint64_t offset, const View& y, const View& mean, const View& rstd,
                                      const View& weight, const View& bias, double eps);
  // Its backward's half: layer_norm_backward's dx (weight and bias frozen), then dropped = dropout(dx) as
  // dropout() gives it, the gradient the dropout_add hands its input; one pass where a backend can.
  virtual void layer_norm_backward_dropout(const View& dx, const View& dy, const View& x, const View& weight,
                                           const View& mean, const View& rstd, const View& residual,
                                           const View& dropped, double p, uint64_t seed, uint64_t offset);

  // ---- optimiser ----
  // One AdamW update of every listed parameter, in place, with its moments m
  // and v: all arrays contiguous and of one dtype (f32, or f64 for tests), all
  // parameters at the same step. A list, so CUDA updates them in one launch.
  virtual void adamw_step(std::span<const AdamWTensors> tensors, const AdamWArgs& args) = 0;
};

// Operands as a kernel that takes only contiguous data of one dtype wants
// them, behind an interface that allows any strides and more dtypes: in()
// gives the view itself when it already fits, else a converted contiguous
// copy; out() gives a view to write, copied (and converted) back into the
// caller's view by finish(). A view without data (an output not wanted)
// passes through.
class KernelOperands {
 public:
  explicit KernelOperands(Backend& backend) : backend_(backend) {}
  ~KernelOperands();  // frees the copies
  KernelOperands(const KernelOperands&) = delete;
  KernelOperands& operator=(const KernelOperands&) = delete;

  static bool fits(const View& v, DType dtype) { return !v.data || (v.dtype == dtype && v.is_contiguous()); }
  static bool fit(std::initializer_list<const View*> views, DType dtype) {
    return std::all_of(views.begin(), views.end(), [&](const View* v) { return fits(*v, dtype); });
  }
  View in(const View& v, DType dtype);
  View out(const View& v, DType dtype);
  View inout(const View& v, DType dtype);  // read and written: copied in, and back at finish
  void finish();

 private:
  View scratch(const View& like, DType dtype);
  Backend& backend_;
  std::vector<std::pair<void*, size_t>> scratch_;
  std::vector<std::pair<View, View>> results_;  // the caller's view, and the one the kernel writes
};

// The epilogue of a GEMM with a bf16 C, for a backend without a fused kernel
// for the case: the product into f32 scratch, the bias and GELU in f32 there,
// and one rounding into C (and pre_gelu) at the end, as a fused epilogue rounds.
void gemm_with_f32_epilogue(Backend& backend, const GemmArgs& args);

// A GEMM with an addend, for a backend without a kernel that reads it apart
// from C: the addend copied into C, and the args that then accumulate onto it.
GemmArgs addend_into_c(Backend& backend, const GemmArgs& args);

// The backend that owns `device`'s memory. Throws engine::Error for a CUDA
// device when CUDA was not compiled in or no GPU is present.
Backend& backend_for(Device device);

bool cuda_available();  // compiled in and at least one GPU present

}  // namespace engine
