// Linear + cross-entropy (+ Gumbel-max sampling) on the CPU, over chunks of rows.
//
// Per chunk: the chunk's logits Z = H_c W^T (+ bias) by one BLAS product, then one sweep per row
// (max, logsumexp, target logit, argmax, Gumbel-max sample with the reference's Philox noise, and the
// gradient dZ = (softmax - onehot) * coef written over Z), then d hidden = dZ W and d weight += dZ^T H_c:
// three GEMM units in all, nothing recomputed. Extra memory: one chunk of logits (chunk_rows x V
// float32, chunk_rows chosen so that this is at most kChunkBytes), plus float32 copies of half
// precision weights.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "kernels.h"
#include "pyobjectives/device_math.h"

namespace pyobjectives::cpu {
namespace {

constexpr int64_t kChunkBytes = int64_t(32) << 20;
constexpr int64_t kNoiseBlock = 512;
// The largest Gumbel noise the reference can draw: -log(-log(u)) at the largest uniform below 1
// (1 - 2^-24 in float32) is 16.64.
constexpr float kMaxGumbel = 16.7f;

template <typename T>
PO_VECTORIZED void round_to_dtype(float* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] = float(T(z[i]));
}

PO_VECTORIZED float row_max(const float* z, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

PO_VECTORIZED float row_sum_exp(const float* z, int64_t n, float mx) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += fast_exp(z[i] - mx);
  return s;
}

PO_VECTORIZED void softmax_grad(float* z, int64_t n, float lse, float coef) {
  for (int64_t i = 0; i < n; ++i) z[i] = fast_exp(z[i] - lse) * coef;
}

PO_VECTORIZED void add_bias(float* z, const float* bias, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] += bias[i];
}

PO_VECTORIZED float block_max(const float* u, int64_t n) {
  float m = 0.f;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = u[i] > m ? u[i] : m;
  return m;
}

// Gumbel-max over one row: argmax_v z_v / temperature - log(-log(u_v)), u_v = Philox(seed, row * V + v).
// Every u is drawn, but the two logs are taken only where the sample could still change: g is increasing
// in u, so with the best score so far and zmax = max_v z_v / temperature a vocabulary entry can only win
// if g(u_v) >= best - zmax, i.e. u_v >= exp(-exp(zmax - best)). The threshold keeps a margin, so the
// result is the exact argmax (the same sample as the reference's dense computation).
int64_t gumbel_sample(const float* z, int64_t V, float temperature, float zmax_t, PhiloxKey key, uint64_t row_offset,
                      int64_t banned) {
  float u[kNoiseBlock];
  float best = kNegInf;
  int64_t best_v = 0;
  double threshold = 0.0;
  for (int64_t v0 = 0; v0 < V; v0 += kNoiseBlock) {
    const int64_t n = std::min(kNoiseBlock, V - v0);
    // No noise can lift this block over the best score: skip its draws (trained generators' logits
    // spread far wider than the largest possible Gumbel noise, so most blocks end here).
    if (best != kNegInf && row_max(z + v0, n) / temperature + kMaxGumbel + 1e-3f * (1.f + std::fabs(best)) < best)
      continue;
    philox_uniforms(key, row_offset + uint64_t(v0), n, u);
    if (block_max(u, n) < threshold) continue;  // the usual case once a good sample is known
    for (int64_t i = 0; i < n; ++i) {
      if (double(u[i]) < threshold) continue;
      const int64_t v = v0 + i;
      const float score = v == banned ? kNegInf : z[v] / temperature + -std::log(-std::log(u[i]));
      if (score > best) {  // strict: the first maximum wins, as in torch.argmax
        best = score;
        best_v = v;
        const double gap = double(zmax_t) - double(best);
        threshold = std::exp(-std::exp(gap + 1e-3 * (1.0 + std::fabs(double(best)))));
      }
    }
  }
  return best_v;
}

template <typename T>
const float* as_float(const T* src, int64_t n, std::vector<float>& buf) {
  if (std::is_same<T, float>::value) return reinterpret_cast<const float*>(src);
  buf.resize(n);
  for (int64_t i = 0; i < n; ++i) buf[i] = to_float(src[i]);
  return buf.data();
}

template <typename T>
void lce_impl(const LinearCEParams& p, const float* row_coef, float* d_hidden, float* d_weight, float* d_bias) {
  const int64_t N = p.N, E = p.E, V = p.V;
  const int64_t chunk = linear_cross_entropy_chunk_rows(V);
  std::vector<float> wbuf, hbuf, z(std::min(chunk, std::max<int64_t>(N, 1)) * V);
  const float* W = as_float(static_cast<const T*>(p.weight), V * E, wbuf);
  const PhiloxKey key = philox_key(p.seed);
  const bool grad = row_coef != nullptr;
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t nc = std::min(chunk, N - n0);
    const float* Hc = as_float(static_cast<const T*>(p.hidden) + n0 * E, nc * E, hbuf);
    float* Z = z.data();
    gemm(false, true, nc, V, E, 1.f, Hc, E, W, E, 0.f, Z, V);
    at::parallel_for(0, nc, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = n0 + i;
        float* zr = Z + i * V;
        if (p.bias != nullptr) add_bias(zr, p.bias, V);
        // The reference's logits are in the input dtype: round them alike (loss, samples, argmax).
        if (!std::is_same<T, float>::value) round_to_dtype<T>(zr, V);
        // one sweep: each cached block's max and sum merged into a running (max, sum)
        OnlineSoftmax softmax;
        for (int64_t v0 = 0; v0 < V; v0 += kNoiseBlock) {
          const int64_t len = std::min(kNoiseBlock, V - v0);
          float m = row_max(zr + v0, len);
          if (m == kNegInf && first_nan(zr + v0, len) >= 0) m = NAN;  // row_max drops NaN
          softmax.merge(m, row_sum_exp(zr + v0, len, m));
        }
        const float mx = softmax.max;
        const float lse = softmax.logsumexp();
        const int64_t target = p.targets[n];
        const bool kept = target != p.ignore_index && target >= 0 && target < V;
        p.row_loss[n] = kept ? lse - zr[target] : 0.f;
        p.lse[n] = lse;
        // torch.argmax takes the first NaN: a row with a NaN logit (its lse is NaN) samples and
        // argmaxes to its first NaN, whatever the noise; the disallowed id never wins.
        const bool has_nan = lse != lse;
        if (p.want_argmax) {
          const int64_t nan_v = has_nan ? first_nan(zr, V) : -1;
          p.argmax[n] = nan_v >= 0 ? nan_v : std::max_element(zr, zr + V) - zr;
        }
        if (p.sample) {
          const int64_t banned = p.disallow != nullptr ? p.disallow[n] : -1;
          const int64_t nan_v = has_nan ? first_nan(zr, V, banned) : -1;
          // zmax / temperature bounds every z_v / temperature (division is monotone)
          p.sampled[n] = nan_v >= 0 ? nan_v
                                    : gumbel_sample(zr, V, p.temperature, mx / p.temperature, key,
                                                    uint64_t(n) * uint64_t(V), banned);
        }
        if (grad) {
          const float coef = kept ? row_coef[n] : 0.f;
          softmax_grad(zr, V, lse, coef);
          if (kept) zr[target] -= coef;
        }
      }
    });
    if (!grad) continue;
    gemm(false, false, nc, E, V, 1.f, Z, V, W, E, 0.f, d_hidden + n0 * E, E);
    gemm(true, false, V, E, nc, 1.f, Z, V, Hc, E, 1.f, d_weight, E);
    if (d_bias != nullptr) {
      at::parallel_for(0, V, 2048, [&](int64_t begin, int64_t end) {
        for (int64_t i = 0; i < nc; ++i)
          for (int64_t v = begin; v < end; ++v) d_bias[v] += Z[i * V + v];
      });
    }
  }
}

}  // namespace

int64_t linear_cross_entropy_chunk_rows(int64_t V) {
  return std::max<int64_t>(16, std::min<int64_t>(4096, kChunkBytes / (4 * std::max<int64_t>(V, 1))));
}

void linear_cross_entropy_forward(const LinearCEParams& p, const float* row_coef, float* d_hidden, float* d_weight,
                                  float* d_bias) {
  dispatch_dtype(p.dtype, [&](auto tag) { lce_impl<decltype(tag)>(p, row_coef, d_hidden, d_weight, d_bias); });
}

}  // namespace pyobjectives::cpu
