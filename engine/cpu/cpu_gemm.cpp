// CPU matrix multiply: row-major (strided-)batched GEMM on OpenBLAS.
#include "engine/cpu/cpu_backend.h"

#include "engine/error.h"
#include "engine/profiler.h"

#include <cblas.h>

namespace engine {

void CpuBackend::gemm(const GemmArgs& g) {
  ProfileScope scope("gemm", 2.0 * double(g.m) * double(g.n) * double(g.k) * double(g.batch));
  const CBLAS_TRANSPOSE ta = g.trans_a ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE tb = g.trans_b ? CblasTrans : CblasNoTrans;
  for (int64_t i = 0; i < g.batch; ++i) {
    if (g.dtype == DType::F32) {
      cblas_sgemm(CblasRowMajor, ta, tb, int(g.m), int(g.n), int(g.k), float(g.alpha),
                  static_cast<const float*>(g.a) + i * g.stride_a, int(g.lda),
                  static_cast<const float*>(g.b) + i * g.stride_b, int(g.ldb), float(g.beta),
                  static_cast<float*>(g.c) + i * g.stride_c, int(g.ldc));
    } else if (g.dtype == DType::F64) {
      cblas_dgemm(CblasRowMajor, ta, tb, int(g.m), int(g.n), int(g.k), g.alpha,
                  static_cast<const double*>(g.a) + i * g.stride_a, int(g.lda),
                  static_cast<const double*>(g.b) + i * g.stride_b, int(g.ldb), g.beta,
                  static_cast<double*>(g.c) + i * g.stride_c, int(g.ldc));
    } else {
      fail("gemm: the CPU computes in f32 or f64, got {}", dtype_name(g.dtype));
    }
  }
}

}  // namespace engine
