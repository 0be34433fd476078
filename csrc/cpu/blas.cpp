// BLAS for the CPU kernels: the sgemm torch links, found without depending on how it was built.
#include <algorithm>
#include <vector>

#include "cpu_common.h"

// Weak: resolved to the Fortran-ABI sgemm_ exported by libtorch_cpu (MKL / OpenBLAS) when present.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

// MKL only: the thread count of BLAS calls made by this thread (0 restores the global setting).
extern "C" int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));

namespace pyobjectives::cpu {

SingleThreadedBlas::SingleThreadedBlas() {
  if (MKL_Set_Num_Threads_Local != nullptr) previous_ = MKL_Set_Num_Threads_Local(1);
}

SingleThreadedBlas::~SingleThreadedBlas() {
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
}

const char* blas_name() { return sgemm_ != nullptr ? "sgemm from torch's BLAS" : "portable loops (no BLAS found)"; }

namespace {

void gemm_loops(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  std::vector<float> row(n);
  for (int64_t i = 0; i < m; ++i) {
    std::fill(row.begin(), row.end(), 0.f);
    for (int64_t p = 0; p < k; ++p) {
      const float av = ta ? a[p * lda + i] : a[i * lda + p];
      if (tb) {
        for (int64_t j = 0; j < n; ++j) row[j] += av * b[j * ldb + p];
      } else {
        const float* bp = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) row[j] += av * bp[j];
      }
    }
    float* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = alpha * row[j] + (beta == 0.f ? 0.f : beta * ci[j]);
  }
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
    return;
  }
  if (sgemm_ == nullptr) {
    gemm_loops(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the flags.
  const char tA = trans_a ? 'T' : 'N', tB = trans_b ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k);
  // Leading dimensions must be >= the stored row length even when there is one row.
  const int LDA = int(std::max<int64_t>(ldb, trans_b ? k : n)), LDB = int(std::max<int64_t>(lda, trans_a ? m : k));
  const int LDC = int(std::max<int64_t>(ldc, n));
  sgemm_(&tB, &tA, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
}

}  // namespace pyobjectives::cpu
