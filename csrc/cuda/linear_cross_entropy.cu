// Linear + cross-entropy (+ Gumbel-max sampling) on CUDA: the per-chunk row kernel. The binding
// (ops.cpp) computes each chunk's float32 logits H_c W^T with cuBLAS, runs this kernel over the chunk,
// then d hidden = dZ W and d weight += dZ^T H_c with cuBLAS: three GEMM units, nothing recomputed.
//
// One block per row. Pass 1: logits (+ bias, rounded to the input dtype as the reference's are),
// online max / sum of exp, argmax. Pass 2: Gumbel-max sample with the shared Philox noise at offset
// row * V + v (bit-identical uniforms; IEEE division and precise logs, so the same scores as the CPU
// kernel and the reference), and the gradient (softmax - onehot) * coef written over the logits: in
// place as float32, or for bfloat16 / float16 inputs in the input dtype at the start of the row's own
// float32 storage (dZ is then read by cuBLAS as a [rows, V] matrix with row stride 2V elements).
#include <cmath>

#include "cuda/cuda_common.cuh"
#include "cuda/launchers.h"
#include "pyobjectives/device_math.h"

namespace pyobjectives::cuda {
namespace {

constexpr int kRowThreads = 512;
constexpr int kRowWarps = kRowThreads / 32;
// The largest Gumbel noise the reference can draw: -log(-log(u)) at the largest uniform below 1.
constexpr float kMaxGumbel = 16.7f;

template <typename T>
__device__ __forceinline__ float logit(const float* zr, const float* bias, int64_t v) {
  float x = zr[v];
  if (bias != nullptr) x += bias[v];
  return to_float(from_float<T>(x));
}

struct Best {
  float score;
  int64_t index;
};

// Larger score wins, equal scores the smaller index: torch.argmax's first maximum.
__device__ __forceinline__ Best better(Best a, Best b) {
  if (b.score > a.score || (b.score == a.score && b.index < a.index)) return b;
  return a;
}

__device__ __forceinline__ Best warp_best(Best b) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Best other{__shfl_xor_sync(0xffffffffu, b.score, o), __shfl_xor_sync(0xffffffffu, b.index, o)};
    b = better(b, other);
  }
  return b;
}

__device__ __forceinline__ OnlineSoftmax warp_softmax(OnlineSoftmax s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m = __shfl_xor_sync(0xffffffffu, s.max, o), sum = __shfl_xor_sync(0xffffffffu, s.sum, o);
    s.merge(m, sum);
  }
  return s;
}

// Block-wide first maximum (the warps' winners merged in warp order); every thread gets it.
__device__ __forceinline__ Best block_best(Best b, Best* shared) {
  b = warp_best(b);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = b;
  __syncthreads();
  Best total = shared[0];
  for (int w = 1; w < kRowWarps; ++w) total = better(total, shared[w]);
  __syncthreads();
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) lce_row_kernel(LinearCEParams p, float* z, int64_t n0,
                                                              const float* row_coef) {
  __shared__ float warp_max[kRowWarps], warp_sum_exp[kRowWarps];
  __shared__ Best warp_win[kRowWarps];
  __shared__ float target_logit;
  const int64_t V = p.V, i = blockIdx.x, n = n0 + i;
  float* zr = z + i * V;
  const int tid = threadIdx.x;
  const int64_t target = p.targets[n];
  const bool kept = target != p.ignore_index && target >= 0 && target < V;

  // pass 1: running (max, sum of exp) and the first maximum of this thread's logits
  OnlineSoftmax sm;
  Best amax{-INFINITY, V};
  for (int64_t v = tid; v < V; v += kRowThreads) {
    const float x = logit<T>(zr, p.bias, v);
    sm.merge(x, 1.f);
    if (x > amax.score) amax = {x, v};
    if (v == target) target_logit = x;  // read after the barrier below: pass 2 may overwrite the logits
  }
  sm = warp_softmax(sm);
  if (tid % 32 == 0) warp_max[tid / 32] = sm.max, warp_sum_exp[tid / 32] = sm.sum;
  __syncthreads();
  OnlineSoftmax row;
  for (int w = 0; w < kRowWarps; ++w) row.merge(warp_max[w], warp_sum_exp[w]);
  const float lse = row.logsumexp();
  if (p.want_argmax) {
    const Best win = block_best(amax, warp_win);
    if (tid == 0) p.argmax[n] = win.index < V ? win.index : 0;
  }
  if (tid == 0) {
    p.row_loss[n] = kept ? lse - target_logit : 0.f;
    p.lse[n] = lse;
  }
  if (!p.sample && row_coef == nullptr) return;

  // pass 2, in tiles of kRowThreads: a half-precision gradient overwrites float32 logits of earlier
  // tiles only (bytes [2 v0, 2 v0 + 2 kRowThreads) lie below v0 + kRowThreads floats), read before the
  // tile's barrier.
  const bool half_grad = row_coef != nullptr && sizeof(T) == 2;
  const float coef = kept && row_coef != nullptr ? row_coef[n] : 0.f;
  const PhiloxKey key = philox_key(p.seed);
  const uint64_t row_offset = uint64_t(n) * uint64_t(V);
  const int64_t banned = p.disallow != nullptr ? p.disallow[n] : -1;
  const float zmax_t = row.max / p.temperature;
  Best best{-INFINITY, V};
  double threshold = 0.0;  // u below it cannot beat this thread's best score (the CPU kernel's bound)
  for (int64_t v0 = 0; v0 < V; v0 += kRowThreads) {
    const int64_t v = v0 + tid;
    float x = 0.f;
    if (v < V) {
      x = logit<T>(zr, p.bias, v);
      if (p.sample) {
        const float zt = x / p.temperature;
        // no noise lifts this logit over the best score: skip its draw
        if (!(best.score != -INFINITY && zt + kMaxGumbel + 1e-3f * (1.f + fabsf(best.score)) < best.score)) {
          const float u = philox_uniform(key, row_offset + uint64_t(v));
          if (double(u) >= threshold) {
            const float score = v == banned ? -INFINITY : zt + -logf(-logf(u));
            if (score > best.score) {
              best = {score, v};
              const double gap = double(zmax_t) - double(score);
              threshold = exp(-exp(gap + 1e-3 * (1.0 + fabs(double(score)))));
            }
          }
        }
      }
    }
    if (row_coef == nullptr) continue;
    float g = __expf(x - lse) * coef;
    if (kept && v == target) g -= coef;
    if (half_grad) {
      __syncthreads();
      if (v < V) reinterpret_cast<T*>(zr)[v] = from_float<T>(g);
    } else if (v < V) {
      zr[v] = g;
    }
  }
  if (p.sample) {
    const Best win = block_best(best, warp_win);
    if (tid == 0) p.sampled[n] = win.score == -INFINITY ? 0 : win.index;
  }
}

}  // namespace

int64_t linear_cross_entropy_chunk_rows(int64_t N, int64_t V) {
  int64_t rows = kLinearCEChunkBytes / (4 * (V > 0 ? V : 1));
  if (rows >= 64) rows -= rows % 64;  // whole GEMM tiles
  if (rows < 1) rows = 1;
  return rows < N ? rows : (N > 0 ? N : 1);
}

void linear_cross_entropy_chunk(const LinearCEParams& p, float* logits, int64_t n0, int64_t rows,
                                const float* row_coef, cudaStream_t stream) {
  if (rows <= 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    lce_row_kernel<T><<<unsigned(rows), kRowThreads, 0, stream>>>(p, logits, n0, row_coef);
  });
}

}  // namespace pyobjectives::cuda
