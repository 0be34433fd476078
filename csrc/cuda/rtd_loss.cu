// ELECTRA's replaced-token-detection loss on CUDA: one pass over the tokens writes the loss (reduction
// "none"), d loss_t / d z_t and per-chunk partial sums (RTDSum order, as csrc/cpu/rtd_loss.cpp); a
// second small kernel reduces the partials in a fixed order. No atomics, no host synchronisation.
//
// Logits form: a block of 256 threads takes 2048 tokens, 8 per thread, read in 16-byte vectors.
// Fused-head form: z_t = x_t . w + b, one warp per token row (16-byte loads of x, any hidden size),
// 128 tokens per block; with d head_weight wanted, the block then sums grad_t * x_t over its tokens.
#include <cmath>

#include "cuda/cuda_common.cuh"
#include "cuda/launchers.h"

namespace pyobjectives::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kLogitChunk = kThreads * 8;
constexpr int64_t kHeadChunk = 128;
constexpr int kReduceThreads = 128;

// The attention mask read in its own dtype; kNoMask: every token is real.
constexpr int kNoMask = -1;
template <int K>
struct MaskType;
template <>
struct MaskType<int(MaskKind::kBytes)> {
  using type = uint8_t;
};
template <>
struct MaskType<int(MaskKind::kInt32)> {
  using type = int32_t;
};
template <>
struct MaskType<int(MaskKind::kInt64)> {
  using type = int64_t;
};
template <>
struct MaskType<int(MaskKind::kFloat32)> {
  using type = float;
};
template <>
struct MaskType<kNoMask> {
  using type = uint8_t;  // never read
};

template <int K>
__device__ __forceinline__ float real_at(const void* mask, int64_t t) {
  if constexpr (K == kNoMask) {
    return 1.f;
  } else {
    using M = typename MaskType<K>::type;
    return static_cast<const M*>(mask)[t] != M(0) ? 1.f : 0.f;
  }
}

struct Sums {
  float v[kRTDSums];
};

// One token: the loss and gradient as the CPU kernel defines them (softplus / sigmoid through e^{-|z|}).
__device__ __forceinline__ void rtd_token(float x, float y, float m, float& loss, float& g, Sums& s) {
  const float u = expf(-fabsf(x));
  const float softplus = fmaxf(x, 0.f) + log1pf(u);
  const float sigmoid = (x >= 0.f ? 1.f : u) / (1.f + u);
  const float pred = x > 0.f ? 1.f : 0.f;
  loss = m * (softplus - y * x);
  g = m * (sigmoid - y);
  s.v[kLossSum] += loss;
  s.v[kGradSum] += g;
  s.v[kReal] += m;
  s.v[kCorrect] += m * (pred == y ? 1.f : 0.f);
  s.v[kTruePos] += m * pred * y;
  s.v[kPredicted] += m * pred;
  s.v[kReplaced] += m * y;
}

// Block sums of s in a fixed order, written as the block's row of partials (double).
__device__ __forceinline__ void write_partials(Sums& s, double* partials) {
  __shared__ float warp_sums[kWarps][kRTDSums];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < kRTDSums; ++k) s.v[k] = warp_sum(s.v[k]);
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < kRTDSums; ++k) warp_sums[warp][k] = s.v[k];
  __syncthreads();
  if (threadIdx.x < kRTDSums) {
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w][threadIdx.x];
    partials[int64_t(blockIdx.x) * kRTDSums + threadIdx.x] = double(total);
  }
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads) rtd_logits_kernel(RTDParams p, bool vec) {
  using M = typename MaskType<K>::type;
  const T* x = static_cast<const T*>(p.x);
  T* loss_tok = static_cast<T*>(p.loss_tok);
  const int64_t base = int64_t(blockIdx.x) * kLogitChunk + int64_t(threadIdx.x) * 8;
  Sums s = {};
  if (base < p.T) {
    const int n = int(p.T - base < 8 ? p.T - base : 8);
    float z[8], y[8], m[8], loss[8], g[8];
    if (vec && n == 8) {
      T xv[8];
      int64_t c[8], o[8];
      load8(x + base, xv);
      load8(p.corrupted + base, c);
      load8(p.original + base, o);
#pragma unroll
      for (int i = 0; i < 8; ++i) z[i] = to_float(xv[i]), y[i] = c[i] != o[i] ? 1.f : 0.f, m[i] = 1.f;
      if constexpr (K != kNoMask) {
        M mv[8];
        load8(static_cast<const M*>(p.real) + base, mv);
#pragma unroll
        for (int i = 0; i < 8; ++i) m[i] = mv[i] != M(0) ? 1.f : 0.f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) rtd_token(z[i], y[i], m[i], loss[i], g[i], s);
      if (p.grad != nullptr) {
        reinterpret_cast<float4*>(p.grad + base)[0] = make_float4(g[0], g[1], g[2], g[3]);
        reinterpret_cast<float4*>(p.grad + base)[1] = make_float4(g[4], g[5], g[6], g[7]);
      }
      if (loss_tok != nullptr) {
        T lv[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) lv[i] = from_float<T>(loss[i] * p.loss_weight);
        store8(loss_tok + base, lv);
      }
    } else {
      for (int i = 0; i < n; ++i) {
        const int64_t t = base + i;
        rtd_token(to_float(x[t]), p.corrupted[t] != p.original[t] ? 1.f : 0.f, real_at<K>(p.real, t), loss[i], g[i],
                  s);
        if (p.grad != nullptr) p.grad[t] = g[i];
        if (loss_tok != nullptr) loss_tok[t] = from_float<T>(loss[i] * p.loss_weight);
      }
    }
  }
  write_partials(s, p.partials);
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads, 2) rtd_head_kernel(RTDParams p, bool vec) {
  __shared__ float chunk_grad[kHeadChunk];
  const T* x = static_cast<const T*>(p.x);
  T* loss_tok = static_cast<T*>(p.loss_tok);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t0 = int64_t(blockIdx.x) * kHeadChunk;
  const int n = int(p.T - t0 < kHeadChunk ? p.T - t0 : kHeadChunk);
  const int64_t Dd = p.Dd;
  const float* w = p.head_weight;
  const float bias = p.head_bias_dev != nullptr ? *p.head_bias_dev : p.head_bias;
  Sums s = {};
  for (int i = warp; i < n; i += kWarps) {
    const int64_t t = t0 + i;
    const T* xr = x + t * Dd;
    float acc = 0.f;
    if (vec) {  // Dd % 8 == 0, rows and w aligned to 16 bytes
      for (int64_t d = int64_t(lane) * 8; d < Dd; d += 256) {
        float xf[8];
        if constexpr (sizeof(T) == 4) {
          const float4 a = __ldg(reinterpret_cast<const float4*>(xr + d));
          const float4 b = __ldg(reinterpret_cast<const float4*>(xr + d) + 1);
          xf[0] = a.x, xf[1] = a.y, xf[2] = a.z, xf[3] = a.w, xf[4] = b.x, xf[5] = b.y, xf[6] = b.z, xf[7] = b.w;
        } else {
          T xv[8];
          load8(xr + d, xv);
#pragma unroll
          for (int j = 0; j < 8; ++j) xf[j] = to_float(xv[j]);
        }
        const float4 w0 = __ldg(reinterpret_cast<const float4*>(w + d));
        const float4 w1 = __ldg(reinterpret_cast<const float4*>(w + d) + 1);
        acc += xf[0] * w0.x + xf[1] * w0.y + xf[2] * w0.z + xf[3] * w0.w;
        acc += xf[4] * w1.x + xf[5] * w1.y + xf[6] * w1.z + xf[7] * w1.w;
      }
    } else {
      for (int64_t d = lane; d < Dd; d += 32) acc += to_float(xr[d]) * __ldg(w + d);
    }
    const float z = warp_sum(acc) + bias;
    if (lane == 0) {
      float loss, g;
      rtd_token(z, p.corrupted[t] != p.original[t] ? 1.f : 0.f, real_at<K>(p.real, t), loss, g, s);
      if (p.grad != nullptr) p.grad[t] = g;
      if (loss_tok != nullptr) loss_tok[t] = from_float<T>(loss * p.loss_weight);
      chunk_grad[i] = g;
    }
  }
  write_partials(s, p.partials);  // synchronises the block: chunk_grad is complete below
  if (p.dw_partials == nullptr) return;
  for (int64_t d = threadIdx.x; d < Dd; d += kThreads) {
    float acc = 0.f;
    for (int i = 0; i < n; ++i) acc += chunk_grad[i] * to_float(x[(t0 + i) * Dd + d]);
    p.dw_partials[int64_t(blockIdx.x) * Dd + d] = acc;
  }
}

// Block b < kRTDSums sums column b of partials; block kRTDSums + d sums column d of dw_partials.
// Strided per-thread sums, then a fixed tree: the same bits on every run.
__global__ void __launch_bounds__(kReduceThreads) rtd_reduce_kernel(const double* partials, const float* dw_partials,
                                                                     int64_t n_chunks, int64_t Dd, double* sums,
                                                                     float* dw) {
  __shared__ double warp_part[kReduceThreads / 32];
  const int64_t col = blockIdx.x;
  const bool is_dw = col >= kRTDSums;
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < n_chunks; c += kReduceThreads)
    acc += is_dw ? double(dw_partials[c * Dd + (col - kRTDSums)]) : partials[c * kRTDSums + col];
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) warp_part[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x != 0) return;
  double total = 0.0;
  for (int w = 0; w < kReduceThreads / 32; ++w) total += warp_part[w];
  if (is_dw) dw[col - kRTDSums] = float(total);
  else sums[col] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rtd_head_backward_kernel(int64_t T_, int64_t Dd, const float* w,
                                                                      const float* grad, const float* coef,
                                                                      int64_t coef_stride, T* dx, bool vec) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  if (vec) {  // Dd % 8 == 0: a group of 8 never crosses a row
    const int64_t groups = T_ * Dd / 8;
    for (int64_t gi = int64_t(blockIdx.x) * kThreads + threadIdx.x; gi < groups; gi += stride) {
      const int64_t e = gi * 8, t = e / Dd, d = e - t * Dd;
      const float a = coef[t * coef_stride] * grad[t];
      const float4 w0 = __ldg(reinterpret_cast<const float4*>(w + d));
      const float4 w1 = __ldg(reinterpret_cast<const float4*>(w + d) + 1);
      const T out[8] = {from_float<T>(a * w0.x), from_float<T>(a * w0.y), from_float<T>(a * w0.z),
                        from_float<T>(a * w0.w), from_float<T>(a * w1.x), from_float<T>(a * w1.y),
                        from_float<T>(a * w1.z), from_float<T>(a * w1.w)};
      store8(dx + e, out);
    }
  } else {
    for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < T_ * Dd; e += stride) {
      const int64_t t = e / Dd, d = e - t * Dd;
      dx[e] = from_float<T>(coef[t * coef_stride] * grad[t] * w[d]);
    }
  }
}

template <typename F>
void dispatch_mask(const RTDParams& p, F&& f) {
  if (p.real == nullptr) return f(std::integral_constant<int, kNoMask>{});
  switch (p.real_kind) {
    case MaskKind::kBytes: return f(std::integral_constant<int, int(MaskKind::kBytes)>{});
    case MaskKind::kInt32: return f(std::integral_constant<int, int(MaskKind::kInt32)>{});
    case MaskKind::kInt64: return f(std::integral_constant<int, int(MaskKind::kInt64)>{});
    case MaskKind::kFloat32: return f(std::integral_constant<int, int(MaskKind::kFloat32)>{});
  }
}

int64_t grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return blocks < 1 ? 1 : (blocks > 65535 * 16 ? 65535 * 16 : blocks);
}

}  // namespace

int64_t rtd_loss_chunk_tokens(const RTDParams& p) { return p.Dd > 0 ? kHeadChunk : kLogitChunk; }

void rtd_loss_forward(const RTDParams& p, double* sums, float* dw, cudaStream_t stream) {
  const int64_t chunk = rtd_loss_chunk_tokens(p);
  const int64_t n_chunks = (p.T + chunk - 1) / chunk;
  if (n_chunks > 0) {
    dispatch_dtype(p.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      dispatch_mask(p, [&](auto kind) {
        constexpr int K = decltype(kind)::value;
        if (p.Dd == 0) {
          const bool vec = aligned16(p.x) && aligned16(p.corrupted) && aligned16(p.original) &&
                           aligned16(p.grad) && aligned16(p.loss_tok) && (K == kNoMask || aligned16(p.real));
          rtd_logits_kernel<T, K><<<unsigned(n_chunks), kThreads, 0, stream>>>(p, vec);
        } else {
          const bool vec = p.Dd % 8 == 0 && aligned16(p.x) && aligned16(p.head_weight);
          rtd_head_kernel<T, K><<<unsigned(n_chunks), kThreads, 0, stream>>>(p, vec);
        }
      });
    });
  }
  const int64_t dw_cols = dw != nullptr ? p.Dd : 0;
  rtd_reduce_kernel<<<unsigned(kRTDSums + dw_cols), kReduceThreads, 0, stream>>>(p.partials, p.dw_partials, n_chunks,
                                                                                 p.Dd, sums, dw);
}

void rtd_loss_head_backward(const RTDParams& p, const float* grad, const float* coef, int64_t coef_stride, void* dx,
                            cudaStream_t stream) {
  if (p.T == 0 || p.Dd == 0) return;
  const bool vec = p.Dd % 8 == 0 && aligned16(dx) && aligned16(p.head_weight);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t work = vec ? p.T * p.Dd / 8 : p.T * p.Dd;
    rtd_head_backward_kernel<T><<<unsigned(grid_for(work)), kThreads, 0, stream>>>(
        p.T, p.Dd, p.head_weight, grad, coef, coef_stride, static_cast<T*>(dx), vec);
  });
}

}  // namespace pyobjectives::cuda
