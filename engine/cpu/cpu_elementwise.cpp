// CPU elementwise maps (unary, binary, where) over any strides, and
// reductions over any set of dims.
#include "engine/cpu/cpu_backend.h"

#include "engine/cpu/strided.h"

#include <cmath>
#include <limits>

namespace engine {

namespace {

template <typename T>
T apply_unary(UnaryOp op, T x, T s) {
  switch (op) {
    case UnaryOp::Neg: return -x;
    case UnaryOp::Exp: return std::exp(x);
    case UnaryOp::Log: return std::log(x);
    case UnaryOp::Sqrt: return std::sqrt(x);
    case UnaryOp::Rsqrt: return T(1) / std::sqrt(x);
    case UnaryOp::Tanh: return std::tanh(x);
    case UnaryOp::Abs: return std::abs(x);
    case UnaryOp::Square: return x * x;
    case UnaryOp::Pow: return std::pow(x, s);
    case UnaryOp::AddScalar: return x + s;
    case UnaryOp::MulScalar: return x * s;
    case UnaryOp::Relu: return x > T(0) ? x : T(0);
    case UnaryOp::Sigmoid: return T(1) / (T(1) + std::exp(-x));
  }
  return x;
}

template <typename T>
T apply_binary(BinaryOp op, T a, T b) {
  switch (op) {
    case BinaryOp::Add: return a + b;
    case BinaryOp::Sub: return a - b;
    case BinaryOp::Mul: return a * b;
    case BinaryOp::Div: return a / b;
    case BinaryOp::Maximum: return a >= b ? a : b;
    case BinaryOp::Minimum: return a <= b ? a : b;
    case BinaryOp::Equal: return a == b ? T(1) : T(0);
    case BinaryOp::Greater: return a > b ? T(1) : T(0);
  }
  return a;
}

// Reads element i of a condition tensor of any dtype as a truth value.
bool truth(const View& v, int64_t i) {
  switch (v.dtype) {
    case DType::F32: return v.ptr<float>()[i] != 0;
    case DType::F64: return v.ptr<double>()[i] != 0;
    case DType::I32: return v.ptr<int32_t>()[i] != 0;
    case DType::I64: return v.ptr<int64_t>()[i] != 0;
    case DType::BF16: return (v.ptr<bf16>()[i].bits & 0x7fff) != 0;
    case DType::F16: return (v.ptr<f16>()[i].bits & 0x7fff) != 0;
  }
  return false;
}

}  // namespace

// bf16 and f16 (is_storage_only) are stored, not computed in: an op on them
// runs on f32 copies of its operands (KernelOperands) and rounds its result
// once, as the GPU's kernels compute in f32 on bf16 storage.

void CpuBackend::unary(UnaryOp op, const View& out, const View& in, double scalar) {
  if (is_storage_only(out.dtype)) {
    KernelOperands f32(*this);
    unary(op, f32.out(out, DType::F32), f32.in(in, DType::F32), scalar);
    return f32.finish();
  }
  cpu::dispatch_floating(out.dtype, "unary", [&](auto zero) {
    using T = decltype(zero);
    T* y = out.ptr<T>();
    const T* x = in.ptr<T>();
    const T s = T(scalar);
    cpu::for_each_run<2>(out.shape, {&out.strides, &in.strides}, [&](auto off, int64_t n, auto st) {
      T* yo = y + off[0];
      const T* xo = x + off[1];
      if (st[0] == 1 && st[1] == 1) {  // the contiguous case, written so it vectorises
        for (int64_t i = 0; i < n; ++i) yo[i] = apply_unary(op, xo[i], s);
      } else {
        for (int64_t i = 0; i < n; ++i) yo[i * st[0]] = apply_unary(op, xo[i * st[1]], s);
      }
    });
  });
}

void CpuBackend::binary(BinaryOp op, const View& out, const View& a, const View& b) {
  if (is_storage_only(out.dtype)) {
    KernelOperands f32(*this);
    binary(op, f32.out(out, DType::F32), f32.in(a, DType::F32), f32.in(b, DType::F32));
    return f32.finish();
  }
  if (a.dtype != out.dtype || b.dtype != out.dtype) {  // narrower operands widen (exactly) to the result's dtype
    KernelOperands wide(*this);
    return binary(op, out, wide.in(a, out.dtype), wide.in(b, out.dtype));
  }
  cpu::dispatch_floating(out.dtype, "binary", [&](auto zero) {
    using T = decltype(zero);
    T* y = out.ptr<T>();
    const T* pa = a.ptr<T>();
    const T* pb = b.ptr<T>();
    cpu::for_each_run<3>(out.shape, {&out.strides, &a.strides, &b.strides}, [&](auto off, int64_t n, auto st) {
      T* yo = y + off[0];
      const T* ao = pa + off[1];
      const T* bo = pb + off[2];
      if (st[0] == 1 && st[1] == 1 && st[2] == 1) {
        for (int64_t i = 0; i < n; ++i) yo[i] = apply_binary(op, ao[i], bo[i]);
      } else if (st[0] == 1 && st[1] == 1 && st[2] == 0) {  // tensor op scalar-like broadcast
        for (int64_t i = 0; i < n; ++i) yo[i] = apply_binary(op, ao[i], bo[0]);
      } else {
        for (int64_t i = 0; i < n; ++i) yo[i * st[0]] = apply_binary(op, ao[i * st[1]], bo[i * st[2]]);
      }
    });
  });
}

void CpuBackend::where(const View& out, const View& condition, const View& a, const View& b) {
  if (is_storage_only(out.dtype)) {
    KernelOperands f32(*this);
    where(f32.out(out, DType::F32), condition, f32.in(a, DType::F32), f32.in(b, DType::F32));
    return f32.finish();
  }
  cpu::dispatch_floating(out.dtype, "where", [&](auto zero) {
    using T = decltype(zero);
    T* y = out.ptr<T>();
    const T* pa = a.ptr<T>();
    const T* pb = b.ptr<T>();
    cpu::for_each_run<4>(out.shape, {&out.strides, &condition.strides, &a.strides, &b.strides},
                         [&](auto off, int64_t n, auto st) {
                           for (int64_t i = 0; i < n; ++i)
                             y[off[0] + i * st[0]] =
                                 truth(condition, off[1] + i * st[1]) ? pa[off[2] + i * st[2]] : pb[off[3] + i * st[3]];
                         });
  });
}

void CpuBackend::reduce(ReduceOp op, const View& out, const View& in) {
  if (is_storage_only(out.dtype)) {
    KernelOperands f32(*this);
    reduce(op, f32.out(out, DType::F32), f32.in(in, DType::F32));
    return f32.finish();
  }
  // Reorder `in` as [kept dims..., reduced dims...]: each output element then
  // owns one block of the reduced index space, and outputs run in parallel.
  Shape kept_shape, kept_strides, red_shape, red_strides;
  for (size_t d = 0; d < in.shape.size(); ++d) {
    bool reduced = out.shape[d] == 1 && in.shape[d] != 1;
    (reduced ? red_shape : kept_shape).push_back(in.shape[d]);
    (reduced ? red_strides : kept_strides).push_back(in.strides[d]);
  }
  Shape out_kept_strides;
  for (size_t d = 0; d < in.shape.size(); ++d)
    if (!(out.shape[d] == 1 && in.shape[d] != 1)) out_kept_strides.push_back(out.strides[d]);
  const int64_t outputs = numel(kept_shape), block = numel(red_shape);

  cpu::dispatch_floating(out.dtype, "reduce", [&](auto zero) {
    using T = decltype(zero);
    const T* x = in.ptr<T>();
    T* y = out.ptr<T>();
    cpu::parallel_for(outputs, block, [&](int64_t o) {
      int64_t in_offset = 0, out_offset = 0;
      for (size_t d = kept_shape.size(), rest = size_t(o); d-- > 0;) {
        int64_t index = int64_t(rest % size_t(kept_shape[d]));
        rest /= size_t(kept_shape[d]);
        in_offset += index * kept_strides[d];
        out_offset += index * out_kept_strides[d];
      }
      // Sums accumulate in double: long f32 reductions keep their precision.
      double acc = op == ReduceOp::Sum ? 0.0 : -std::numeric_limits<double>::infinity();
      const int64_t inner = red_shape.empty() ? 1 : red_shape.back();
      const int64_t inner_stride = red_shape.empty() ? 0 : red_strides.back();
      for (int64_t r = 0; r < block / std::max<int64_t>(inner, 1); ++r) {
        int64_t offset = in_offset;
        for (size_t d = red_shape.size() - (red_shape.empty() ? 0 : 1), rest = size_t(r); d-- > 0;) {
          offset += int64_t(rest % size_t(red_shape[d])) * red_strides[d];
          rest /= size_t(red_shape[d]);
        }
        for (int64_t j = 0; j < inner; ++j) {
          double v = double(x[offset + j * inner_stride]);
          acc = op == ReduceOp::Sum ? acc + v : (v > acc || std::isnan(v) ? v : acc);
        }
      }
      y[out_offset] = T(acc);
    });
  });
}

void CpuBackend::argmax_last(const View& out, const View& in) {
  if (is_storage_only(in.dtype)) {
    KernelOperands f32(*this);
    return argmax_last(out, f32.in(in, DType::F32));
  }
  const int64_t cols = in.shape.back(), rows = in.numel() / std::max<int64_t>(cols, 1);
  cpu::dispatch_floating(in.dtype, "argmax", [&](auto zero) {
    using T = decltype(zero);
    const T* x = in.ptr<T>();
    int64_t* y = out.ptr<int64_t>();
    cpu::parallel_for(rows, cols, [&](int64_t r) {
      const T* row = x + r * cols;
      int64_t best = 0;
      for (int64_t c = 1; c < cols; ++c)
        if (row[c] > row[best]) best = c;
      y[r] = best;
    });
  });
}

}  // namespace engine
