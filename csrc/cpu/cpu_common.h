// Shared by the CPU kernels: BLAS access, vectorizable math, dtype conversion.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "pyobjectives/device_math.h"
#include "pyobjectives/params.h"

// Reductions in hot loops carry `#pragma omp simd reduction` (built with -fopenmp): the
// summation order is then fixed per instruction set, so results stay deterministic on a machine.
// Hot loops are compiled for AVX-512, AVX2+FMA and a baseline; the loader picks one per machine.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PO_VECTORIZED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PO_VECTORIZED
#endif

namespace pyobjectives::cpu {

// Row-major C[m, n] = alpha * op(A)[m, k] @ op(B)[k, n] + beta * C; lda/ldb/ldc are row strides.
// Calls the BLAS sgemm that torch itself links (MKL or OpenBLAS) when its symbol is exported,
// else a portable blocked loop (slow; `python -m pyobjectives info` says which one is used).
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
const char* blas_name();

// Inside a parallel loop each worker calls BLAS on its own block: keep BLAS from starting threads
// of its own there (oversubscription), for the lifetime of this guard.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_ = 0;
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) to about 2 ulp, branch-free so loops over it vectorize; exp(-inf) and x < -87.3 give 0.
inline float fast_exp(float x) {
  const float lo = x > -87.33654f ? x : -87.33654f;  // ternaries, not fmin/fmax: they vectorize
  const float clamped = lo < 88.37626f ? lo : 88.37626f;
  const float n = std::nearbyint(clamped * 1.44269504088896341f);
  float r = std::fma(n, -0.693359375f, clamped);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.f;
  int32_t bits;
  const int32_t e = (int32_t(n) + 127) << 23;
  std::memcpy(&bits, &p, 4);
  bits += e - (127 << 23);
  float out;
  std::memcpy(&out, &bits, 4);
  out = x < -87.33654f ? 0.f : out;
  return x != x ? x : out;  // NaN in, NaN out
}

// Index of the first NaN in x[0, n) other than x[skip], or -1. The vectorized max reductions drop NaN
// (a NaN never compares greater); callers use this only for rows already known to hold a NaN (their
// sum of exp is NaN) or whose max came out -inf, so ordinary rows never pay for the scan.
inline int64_t first_nan(const float* x, int64_t n, int64_t skip = -1) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] != x[i] && i != skip) return i;
  return -1;
}

// log(x) for x > 0 finite, about 2 ulp, branch-free (Cephes' logf polynomial).
inline float fast_log(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, 4);
  int32_t e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, 4);
  const bool small = m < 0.70710678f;
  e -= small ? 1 : 0;
  m = small ? m + m - 1.f : m - 1.f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = std::fma(y, m, -1.1514610310e-1f);
  y = std::fma(y, m, 1.1676998740e-1f);
  y = std::fma(y, m, -1.2420140846e-1f);
  y = std::fma(y, m, 1.4249322787e-1f);
  y = std::fma(y, m, -1.6668057665e-1f);
  y = std::fma(y, m, 2.0000714765e-1f);
  y = std::fma(y, m, -2.4999993993e-1f);
  y = std::fma(y, m, 3.3333331174e-1f);
  y = y * m * z;
  const float fe = float(e);
  y = std::fma(fe, -2.12194440e-4f, y);
  y = std::fma(-0.5f, z, y);
  return std::fma(fe, 0.693359375f, m + y);
}

// u[i] = philox_uniform(key, offset + i) for i < n (philox.cpp: 16 lanes at a time with AVX-512).
void philox_uniforms(PhiloxKey key, uint64_t offset, int64_t n, float* u);

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
inline T from_float(float x) {
  return static_cast<T>(x);
}

// Run f with the C++ type of a DType.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(c10::BFloat16{}); break;
    case DType::kFloat16: f(c10::Half{}); break;
  }
}

}  // namespace pyobjectives::cpu
