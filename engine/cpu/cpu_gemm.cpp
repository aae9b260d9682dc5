// CPU matrix multiply: row-major (strided-)batched GEMM on OpenBLAS, then the
// epilogue (bias, GELU) as separate passes, in f32 before a bf16 C is
// rounded. bf16 inputs are widened to f32 (exactly: bf16 is the top half of
// an f32) and multiplied in f32, so the CPU computes what a bf16 tensor-core
// GEMM with f32 accumulation computes, up to the order of the sums: the
// reference the mixed-precision tests compare the GPU against.
#include "engine/cpu/cpu_backend.h"

#include "engine/error.h"
#include "engine/profiler.h"

#include <cblas.h>
#include <vector>

namespace engine {

namespace {

// A dense row-major f32 [rows, cols] copy of a bf16 matrix with the given
// strides, through the backend's converting copy.
std::vector<float> widen(CpuBackend& cpu, const void* x, int64_t rows, int64_t cols, const Shape& strides) {
  std::vector<float> out(size_t(rows * cols));
  cpu.copy(View{out.data(), DType::F32, {rows, cols}, {cols, 1}},
           View{const_cast<void*>(x), DType::BF16, {rows, cols}, strides});
  return out;
}

// op(X) of one batch entry, X stored row-major with row stride ld.
Shape op_strides(bool transposed, int64_t ld) { return transposed ? Shape{1, ld} : Shape{ld, 1}; }

void gemm_f32(const GemmArgs& g, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, const float* a, const float* b, float* c,
              int lda, int ldb) {
  cblas_sgemm(CblasRowMajor, ta, tb, int(g.m), int(g.n), int(g.k), float(g.alpha), a, lda, b, ldb, float(g.beta), c,
              int(g.ldc));
}

// One batch entry with bf16 A and B, into an f32 C or (rounded) a bf16 C.
void gemm_bf16(CpuBackend& cpu, const GemmArgs& g, int64_t i) {
  const std::vector<float> a =
      widen(cpu, static_cast<const bf16*>(g.a) + i * g.stride_a, g.m, g.k, op_strides(g.trans_a, g.lda));
  const std::vector<float> b =
      widen(cpu, static_cast<const bf16*>(g.b) + i * g.stride_b, g.k, g.n, op_strides(g.trans_b, g.ldb));
  if (g.c_dtype == DType::F32)
    return gemm_f32(g, CblasNoTrans, CblasNoTrans, a.data(), b.data(), static_cast<float*>(g.c) + i * g.stride_c,
                    int(g.k), int(g.n));
  const View c{static_cast<bf16*>(g.c) + i * g.stride_c, DType::BF16, {g.m, g.n}, {g.ldc, 1}};
  std::vector<float> wide = widen(cpu, c.data, g.m, g.n, c.strides);  // beta may read C
  GemmArgs dense = g;
  dense.ldc = g.n;
  gemm_f32(dense, CblasNoTrans, CblasNoTrans, a.data(), b.data(), wide.data(), int(g.k), int(g.n));
  cpu.copy(c, View{wide.data(), DType::F32, {g.m, g.n}, {g.n, 1}});
}

// C[b][i, :] += bias for every batch entry and row.
template <typename T>
void add_bias(const GemmArgs& g) {
  const T* bias = static_cast<const T*>(g.bias);
  for (int64_t b = 0; b < g.batch; ++b)
    for (int64_t i = 0; i < g.m; ++i) {
      T* row = static_cast<T*>(g.c) + b * g.stride_c + i * g.ldc;
      for (int64_t j = 0; j < g.n; ++j) row[j] += bias[j];
    }
}

}  // namespace

void CpuBackend::gemm(const GemmArgs& g) {
  ProfileScope scope("gemm", 2.0 * double(g.m) * double(g.n) * double(g.k) * double(g.batch));
  const bool mixed = g.dtype == DType::BF16 && g.c_dtype == DType::F32;
  check(g.c_dtype == g.dtype || mixed, "gemm: {} inputs cannot write a {} output", dtype_name(g.dtype),
        dtype_name(g.c_dtype));
  if (g.addend) return gemm(addend_into_c(*this, g));
  check(!g.gelu_grad || (!g.bias && !g.gelu), "gemm: GELU's backward epilogue takes no bias and no GELU");
  if (g.c_dtype == DType::BF16 && (g.bias || g.gelu || g.gelu_grad)) return gemm_with_f32_epilogue(*this, g);
  const CBLAS_TRANSPOSE ta = g.trans_a ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE tb = g.trans_b ? CblasTrans : CblasNoTrans;
  for (int64_t i = 0; i < g.batch; ++i) {
    if (g.dtype == DType::F32) {
      gemm_f32(g, ta, tb, static_cast<const float*>(g.a) + i * g.stride_a,
               static_cast<const float*>(g.b) + i * g.stride_b, static_cast<float*>(g.c) + i * g.stride_c,
               int(g.lda), int(g.ldb));
    } else if (g.dtype == DType::F64) {
      cblas_dgemm(CblasRowMajor, ta, tb, int(g.m), int(g.n), int(g.k), g.alpha,
                  static_cast<const double*>(g.a) + i * g.stride_a, int(g.lda),
                  static_cast<const double*>(g.b) + i * g.stride_b, int(g.ldb), g.beta,
                  static_cast<double*>(g.c) + i * g.stride_c, int(g.ldc));
    } else if (g.dtype == DType::BF16) {
      gemm_bf16(*this, g, i);
    } else {
      fail("gemm: the CPU computes in f32, f64 or bf16, got {}", dtype_name(g.dtype));
    }
  }
  if (!g.bias && !g.gelu && !g.gelu_grad) return;
  if (g.bias && g.c_dtype == DType::F32) add_bias<float>(g);
  if (g.bias && g.c_dtype == DType::F64) add_bias<double>(g);
  if (g.gelu || g.gelu_grad) {
    check(g.pre_gelu && g.c_is_contiguous(), "gemm: a GELU epilogue needs pre_gelu and a contiguous C");
    const Shape shape{g.batch * g.m * g.n};
    const View c{g.c, g.c_dtype, shape, {1}}, pre{g.pre_gelu, g.c_dtype, shape, {1}};
    if (g.gelu_grad) return gelu_backward(c, c, pre);
    copy(pre, c);
    gelu_forward(c, pre);
  }
}

}  // namespace engine
