// CUDA matrix multiply on cuBLAS (cublasGemmEx / cublasGemmStridedBatchedEx),
// bf16 inputs on tensor cores with f32 accumulation and a bf16 or f32 result.
// GemmArgs are row-major; cuBLAS is column-major. A row-major [r, c] matrix
// with row stride ld is, read column-major, its own transpose [c, r] with
// leading dimension ld. So C = op(A) op(B) is computed as the column-major
// product C^T = op(B)^T op(A)^T: the operands swap places, m and n swap, and
// each keeps its own transpose flag. No data moves. Single f32 and bf16
// products go through cuBLASLt (gemm_lt), whose algorithm choice is asked once
// per shape and whose epilogue takes a bias and a GELU in the pass over C.
#include "engine/cuda/cuda_context.h"

#include "engine/error.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

namespace engine {

namespace {
std::atomic<bool> tf32_allowed{false};
std::atomic<bool> gelu_gemm_tuning{true};
}  // namespace

void set_allow_tf32(bool allow) { tf32_allowed = allow; }
bool allow_tf32() { return tf32_allowed; }
void set_gelu_gemm_tuning(bool on) { gelu_gemm_tuning = on; }
bool gelu_gemm_tuned() { return gelu_gemm_tuning; }

namespace cuda {

namespace {

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

// How cuBLAS reads each dtype: storage type, compute type, and whether
// alpha/beta are passed as double (f64 compute) or float (every other case).
struct GemmTypes {
  cudaDataType_t storage;
  cublasComputeType_t compute;
  bool double_scalars;
};

GemmTypes gemm_types(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return {CUDA_R_32F, allow_tf32() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, false};
    case DType::F64: return {CUDA_R_64F, CUBLAS_COMPUTE_64F, true};
    // 16-bit inputs and output, products accumulated in f32 (as torch does).
    case DType::BF16: return {CUDA_R_16BF, CUBLAS_COMPUTE_32F, false};
    case DType::F16: return {CUDA_R_16F, CUBLAS_COMPUTE_32F, false};
    default: fail("gemm on CUDA: needs f32, f64, bf16 or f16, got {}", dtype_name(dtype));
  }
}

}  // namespace

void gemm(DeviceContext& ctx, const GemmArgs& g) {
  const GemmTypes types = gemm_types(g.dtype);
  const bool mixed = g.dtype == DType::BF16 && g.c_dtype == DType::F32;  // bf16 products, f32 result
  check(g.c_dtype == g.dtype || mixed, "gemm on CUDA: {} inputs cannot write a {} output", dtype_name(g.dtype),
        dtype_name(g.c_dtype));
  const cudaDataType_t c_storage = mixed ? CUDA_R_32F : types.storage;
  check(fits_int(g.m) && fits_int(g.n) && fits_int(g.k) && fits_int(g.lda) && fits_int(g.ldb) && fits_int(g.ldc) &&
            fits_int(g.batch),
        "gemm on CUDA: sizes m {} n {} k {} (lda {} ldb {} ldc {}, batch {}) exceed cuBLAS's 32-bit limits", g.m, g.n,
        g.k, g.lda, g.ldb, g.ldc, g.batch);
  if (g.m == 0 || g.n == 0 || g.batch == 0) return;
  ctx.launch();

  const float alpha_f = float(g.alpha), beta_f = float(g.beta);
  const void* alpha = types.double_scalars ? static_cast<const void*>(&g.alpha) : &alpha_f;
  const void* beta = types.double_scalars ? static_cast<const void*>(&g.beta) : &beta_f;
  // Column-major C^T [n, m] = op(B)^T [n, k] op(A)^T [k, m]; see the file comment.
  const cublasOperation_t op_first = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int m = int(g.n), n = int(g.m), k = int(g.k);
  cublasStatus_t status;
  if (g.batch == 1) {
    status = cublasGemmEx(ctx.cublas(), op_first, op_second, m, n, k, alpha, g.b, types.storage, int(g.ldb), g.a,
                          types.storage, int(g.lda), beta, g.c, c_storage, int(g.ldc), types.compute,
                          CUBLAS_GEMM_DEFAULT);
  } else {
    status = cublasGemmStridedBatchedEx(ctx.cublas(), op_first, op_second, m, n, k, alpha, g.b, types.storage,
                                        int(g.ldb), g.stride_b, g.a, types.storage, int(g.lda), g.stride_a, beta, g.c,
                                        c_storage, int(g.ldc), g.stride_c, int(g.batch), types.compute,
                                        CUBLAS_GEMM_DEFAULT);
  }
  check_cublas(status, ctx.index(), "gemm");
}

namespace {

// cuBLASLt's descriptors, destroyed at scope exit.
struct LtMatmul {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatrixLayout_t addend = nullptr;  // where it is laid out other than as c
  cublasLtMatmulPreference_t preference = nullptr;
  ~LtMatmul() {
    if (preference) cublasLtMatmulPreferenceDestroy(preference);
    for (cublasLtMatrixLayout_t layout : {a, b, c, addend})
      if (layout) cublasLtMatrixLayoutDestroy(layout);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

// What cuBLASLt's heuristic answer depends on: the descriptors, and how the pointers are aligned.
struct LtKey {
  int device;
  cudaDataType_t storage, c_storage;
  cublasComputeType_t compute;
  cublasOperation_t op_first, op_second;
  uint64_t m, n, k;
  int64_t ldb, lda, ldc, ld_addend;
  cublasLtEpilogue_t epilogue;
  bool bias;
  uint32_t align_a, align_b, align_c, align_d;  // bytes, a power of two up to 256
  bool tuned;                                    // the fastest candidate by the clock, not the first
  auto operator<=>(const LtKey&) const = default;
};

// The largest power of two (up to 256, cuBLASLt's default assumption) that divides the address.
uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  return uint32_t(std::min<uintptr_t>(256, address & (~address + 1)));
}

// The heuristic query costs host time on every call, a sizeable share of a small GEMM's launch
// (cublasGemmEx makes one inside every call), and its answer for a given key never changes:
// ask once per key (nullopt: no algorithm fits).
class LtAlgoCache {
 public:
  template <typename Query>
  std::optional<cublasLtMatmulAlgo_t> get(const LtKey& key, Query&& query) {
    std::lock_guard lock(mutex_);
    auto it = algos_.find(key);
    if (it == algos_.end()) it = algos_.emplace(key, query()).first;
    return it->second;
  }

 private:
  std::mutex mutex_;
  std::map<LtKey, std::optional<cublasLtMatmulAlgo_t>> algos_;
};

LtAlgoCache lt_algo_cache;

// Whether an algorithm makes each sum in one pass over k, as the heuristic's
// usual pick does: no split-K, no reduction of partial sums. Such algorithms
// differ in tiles and scheduling, not in the order each sum is added up, so
// they write the same bits (checked for GPT-2's shapes in test_cuda_mixed).
bool one_pass(const cublasLtMatmulAlgo_t& algo) {
  int32_t splits = 1;
  uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_NONE;
  size_t written = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits, sizeof(splits), &written);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &reduction, sizeof(reduction),
                                       &written);
  return splits == 1 && reduction == CUBLASLT_REDUCTION_SCHEME_NONE;
}

// Of the heuristic's one-pass candidates, the fastest by the clock: each runs
// once to warm up, then kReps times between two events. `run` may repeat:
// a GELU epilogue's GEMM only writes C and its aux (beta is 0).
template <typename Run>
cublasLtMatmulAlgo_t fastest(DeviceContext& ctx, const std::vector<cublasLtMatmulHeuristicResult_t>& candidates,
                             Run&& run) {
  constexpr int kReps = 5;
  cudaEvent_t start, stop;
  check_cuda(cudaEventCreate(&start), ctx.index(), "gemm tuning");
  check_cuda(cudaEventCreate(&stop), ctx.index(), "gemm tuning");
  cublasLtMatmulAlgo_t best = candidates[0].algo;
  float best_ms = INFINITY;
  for (const cublasLtMatmulHeuristicResult_t& candidate : candidates) {
    if (!one_pass(candidate.algo) || run(candidate.algo) != CUBLAS_STATUS_SUCCESS) continue;
    check_cuda(cudaEventRecord(start, ctx.stream()), ctx.index(), "gemm tuning");
    for (int r = 0; r < kReps; ++r) run(candidate.algo);
    check_cuda(cudaEventRecord(stop, ctx.stream()), ctx.index(), "gemm tuning");
    check_cuda(cudaEventSynchronize(stop), ctx.index(), "gemm tuning");
    float ms = 0;
    check_cuda(cudaEventElapsedTime(&ms, start, stop), ctx.index(), "gemm tuning");
    if (ms < best_ms) best_ms = ms, best = candidate.algo;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return best;
}

}  // namespace

// The column-major product of gemm() above, C^T = op(B)^T op(A)^T, by
// cuBLASLt, with the epilogue: cuBLASLt adds a bias vector with one entry per
// row of its (column-major) output, which is one per column n of our row-major
// C; its GELU_AUX epilogues also write the GELU's input to an aux matrix laid
// out as C, which DGELU reads back (the aux leading dimension must be a
// multiple of 8). A GELU epilogue needs beta == 0; a plain or biased product
// may accumulate into C, or add an addend (cuBLASLt's C, with our C as its
// separate output D; its rows may lie further apart than D's).
bool gemm_lt(DeviceContext& ctx, const GemmArgs& g) {
  const bool aux = g.gelu || g.gelu_grad;
  const bool epilogue_fits = !aux || (g.beta == 0 && !g.addend && g.ldc % 8 == 0);
  const bool types_fit = (g.dtype == DType::F32 && g.c_dtype == DType::F32) ||
                         (g.dtype == DType::BF16 && (g.c_dtype == DType::F32 || g.c_dtype == DType::BF16));
  const bool fits = g.batch == 1 && types_fit && epilogue_fits && g.m > 0 && g.n > 0 && g.k > 0 && fits_int(g.m) &&
                    fits_int(g.n) && fits_int(g.k);
  if (!fits) return false;
  const GemmTypes types = gemm_types(g.dtype);
  const cudaDataType_t c_storage = g.c_dtype == DType::F32 ? CUDA_R_32F : CUDA_R_16BF;
  const cublasOperation_t op_first = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const uint64_t m = uint64_t(g.n), n = uint64_t(g.m), k = uint64_t(g.k);
  const int index = ctx.index();
  ctx.launch();

  LtMatmul lt;
  check_cublas(cublasLtMatmulDescCreate(&lt.desc, types.compute, CUDA_R_32F), index, "gemm (cuBLASLt)");
  auto set = [&](cublasLtMatmulDescAttributes_t attribute, const auto& value) {
    check_cublas(cublasLtMatmulDescSetAttribute(lt.desc, attribute, &value, sizeof(value)), index,
                 "gemm (cuBLASLt)");
  };
  set(CUBLASLT_MATMUL_DESC_TRANSA, op_first);
  set(CUBLASLT_MATMUL_DESC_TRANSB, op_second);
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  if (g.gelu) epilogue = g.bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
  else if (g.gelu_grad) epilogue = CUBLASLT_EPILOGUE_DGELU;
  else if (g.bias) epilogue = CUBLASLT_EPILOGUE_BIAS;
  set(CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
  if (g.bias) {  // in C's dtype
    set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
    set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, c_storage);
  }
  if (aux) {  // written by GELU_AUX, read by DGELU
    set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, g.pre_gelu);
    set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, int64_t(g.ldc));
  }
  // Layouts as stored: a transposed operand is held with its dims swapped.
  const bool first_n = op_first == CUBLAS_OP_N, second_n = op_second == CUBLAS_OP_N;
  check_cublas(cublasLtMatrixLayoutCreate(&lt.a, types.storage, first_n ? m : k, first_n ? k : m, int64_t(g.ldb)),
               index, "gemm (cuBLASLt)");
  check_cublas(cublasLtMatrixLayoutCreate(&lt.b, types.storage, second_n ? k : n, second_n ? n : k, int64_t(g.lda)),
               index, "gemm (cuBLASLt)");
  check_cublas(cublasLtMatrixLayoutCreate(&lt.c, c_storage, m, n, int64_t(g.ldc)), index, "gemm (cuBLASLt)");
  const int64_t ld_addend = g.addend && g.ld_addend ? g.ld_addend : g.ldc;
  if (ld_addend != g.ldc)
    check_cublas(cublasLtMatrixLayoutCreate(&lt.addend, c_storage, m, n, ld_addend), index, "gemm (cuBLASLt)");
  const cublasLtMatrixLayout_t addend_layout = lt.addend ? lt.addend : lt.c;

  const size_t workspace = DeviceContext::kGemmWorkspaceBytes;
  // A view may start anywhere in its tensor: the algorithm must suit the pointers' alignment.
  const void* addend = g.addend ? g.addend : g.c;
  const float alpha = float(g.alpha), beta = float(g.beta);
  auto run = [&](const cublasLtMatmulAlgo_t& algo) {
    return cublasLtMatmul(ctx.cublas_lt(), lt.desc, &alpha, g.b, lt.a, g.a, lt.b, &beta, addend, addend_layout, g.c,
                          lt.c, &algo, ctx.gemm_workspace(), workspace, ctx.stream());
  };
  // For a GELU epilogue the heuristic's first pick is often not the fastest
  // (gpt2-large's c_proj dX with DGELU: 170 us, its 8th candidate 147), so
  // those GEMMs time the one-pass candidates on first use: speed may then
  // differ from run to run, the results not.
  const bool tune = aux && gelu_gemm_tuned();
  const LtKey key{index, types.storage, c_storage, types.compute, op_first, op_second, m, n, k, g.ldb, g.lda, g.ldc,
                  ld_addend, epilogue, g.bias != nullptr, alignment_of(g.b), alignment_of(g.a), alignment_of(addend),
                  alignment_of(g.c), tune};
  const std::optional<cublasLtMatmulAlgo_t> algo = lt_algo_cache.get(key, [&]() -> std::optional<cublasLtMatmulAlgo_t> {
    check_cublas(cublasLtMatmulPreferenceCreate(&lt.preference), index, "gemm (cuBLASLt)");
    auto prefer = [&](cublasLtMatmulPreferenceAttributes_t attribute, const auto& value) {
      check_cublas(cublasLtMatmulPreferenceSetAttribute(lt.preference, attribute, &value, sizeof(value)), index,
                   "gemm (cuBLASLt)");
    };
    prefer(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, workspace);
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_a);
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_b);
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_c);
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_d);
    std::vector<cublasLtMatmulHeuristicResult_t> candidates(tune ? 8 : 1);
    int found = 0;
    if (cublasLtMatmulAlgoGetHeuristic(ctx.cublas_lt(), lt.desc, lt.a, lt.b, addend_layout, lt.c, lt.preference,
                                       int(candidates.size()), candidates.data(), &found) != CUBLAS_STATUS_SUCCESS ||
        found == 0)
      return std::nullopt;
    candidates.resize(size_t(found));
    if (candidates.size() == 1 || !one_pass(candidates[0].algo)) return candidates[0].algo;
    return fastest(ctx, candidates, run);
  });
  if (!algo) return false;
  const cublasStatus_t status = run(*algo);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED) return false;  // cublasGemmEx takes it
  check_cublas(status, index, "gemm (cuBLASLt)");
  return true;
}

}  // namespace cuda

}  // namespace engine
