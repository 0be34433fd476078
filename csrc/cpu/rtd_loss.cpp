// ELECTRA's replaced-token-detection loss on the CPU: one pass over the tokens computes the loss, its
// gradient d loss_t / d z_t (kept for the backward pass, which only scales it) and the statistics.
// Partial sums are per fixed chunk of kRTDChunk tokens, so results do not depend on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_common.h"
#include "kernels.h"

namespace pyobjectives::cpu {
namespace {

constexpr int64_t kDwBlock = 64;

// Loss, gradient and statistics of n tokens with logits z; real[i] = 1 for a real token. Counts are float
// within a chunk (exact up to kRTDChunk). The loss and gradient sums are float over blocks of kSumBlock
// tokens, added up in double: with logits near 1e4 a float sum over a whole chunk is off by several times
// torch's own sum, while a double accumulator inside the token loop keeps it from vectorizing.
constexpr int64_t kSumBlock = 64;

PO_VECTORIZED void rtd_tokens(int64_t n, const float* __restrict z, const int64_t* __restrict corrupted,
                              const int64_t* __restrict original, const float* __restrict real, float loss_weight,
                              float* __restrict grad, float* __restrict loss_tok, double* sums) {
  double loss_sum = 0.0, grad_sum = 0.0;
  float real_n = 0.f, correct = 0.f, tp = 0.f, predicted = 0.f, replaced = 0.f;
  for (int64_t i0 = 0; i0 < n; i0 += kSumBlock) {
    const int64_t i1 = std::min(n, i0 + kSumBlock);
    float block_loss = 0.f, block_grad = 0.f;
#pragma omp simd reduction(+ : block_loss, block_grad, real_n, correct, tp, predicted, replaced)
    for (int64_t i = i0; i < i1; ++i) {
      const float m = real[i];
      // a padding token's logit (possibly NaN) is replaced, not multiplied by 0: NaN must not reach the sums
      const float x = m != 0.f ? z[i] : 0.f;
      const float y = corrupted[i] != original[i] ? 1.f : 0.f;
      const float u = fast_exp(-std::fabs(x));  // e^{-|z|}: softplus and sigmoid without overflow
      const float softplus = (x > 0.f ? x : 0.f) + fast_log(1.f + u);
      const float sigmoid = (x >= 0.f ? 1.f : u) / (1.f + u);
      const float pred = x > 0.f ? 1.f : 0.f;
      const float loss = m * (softplus - y * x);
      const float g = m * (sigmoid - y);
      block_loss += loss;
      block_grad += g;
      real_n += m;
      correct += m * (pred == y ? 1.f : 0.f);
      tp += m * pred * y;
      predicted += m * pred;
      replaced += m * y;
      grad[i] = g;
      loss_tok[i] = loss * loss_weight;
    }
    loss_sum += block_loss;
    grad_sum += block_grad;
  }
  sums[kLossSum] = loss_sum;
  sums[kGradSum] = grad_sum;
  sums[kReal] = real_n;
  sums[kCorrect] = correct;
  sums[kTruePos] = tp;
  sums[kPredicted] = predicted;
  sums[kReplaced] = replaced;
}

PO_VECTORIZED float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

PO_VECTORIZED void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <typename M>
PO_VECTORIZED void nonzero(const M* mask, int64_t n, float* real) {
  for (int64_t i = 0; i < n; ++i) real[i] = mask[i] != M(0) ? 1.f : 0.f;
}

void real_tokens(const void* mask, MaskKind kind, int64_t t0, int64_t n, float* real) {
  switch (kind) {
    case MaskKind::kBytes: nonzero(static_cast<const uint8_t*>(mask) + t0, n, real); break;
    case MaskKind::kInt32: nonzero(static_cast<const int32_t*>(mask) + t0, n, real); break;
    case MaskKind::kInt64: nonzero(static_cast<const int64_t*>(mask) + t0, n, real); break;
    case MaskKind::kFloat32: nonzero(static_cast<const float*>(mask) + t0, n, real); break;
  }
}

template <typename T>
void rtd_impl(const RTDParams& p) {
  const int64_t n_chunks = (p.T + kRTDChunk - 1) / kRTDChunk;
  const T* x = static_cast<const T*>(p.x);
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(kRTDChunk), tok(kRTDChunk), grad_buf(kRTDChunk), real(kRTDChunk, 1.f);
    std::vector<float> row(std::max<int64_t>(p.Dd, 1)), block(std::max<int64_t>(p.Dd, 1));
    std::vector<double> dw_sum(std::max<int64_t>(p.Dd, 1));
    for (int64_t c = begin; c < end; ++c) {
      const int64_t t0 = c * kRTDChunk, n = std::min(kRTDChunk, p.T - t0);
      for (int64_t i = 0; i < n; ++i) {
        if (p.Dd == 0) {
          z[i] = to_float(x[t0 + i]);
        } else {
          const T* xr = x + (t0 + i) * p.Dd;
          const float* xf = reinterpret_cast<const float*>(xr);
          if (!std::is_same<T, float>::value) {
            for (int64_t d = 0; d < p.Dd; ++d) row[d] = to_float(xr[d]);
            xf = row.data();
          }
          z[i] = dot(xf, p.head_weight, p.Dd) + p.head_bias;
        }
      }
      if (p.real != nullptr) real_tokens(p.real, p.real_kind, t0, n, real.data());
      float* grad = p.grad != nullptr ? p.grad + t0 : grad_buf.data();
      rtd_tokens(n, z.data(), p.corrupted + t0, p.original + t0, real.data(), p.loss_weight, grad, tok.data(),
                 p.partials + c * kRTDSums);
      if (p.loss_tok != nullptr)
        for (int64_t i = 0; i < n; ++i) static_cast<T*>(p.loss_tok)[t0 + i] = from_float<T>(tok[i]);
      if (p.dw_partials != nullptr) {  // sum_t grad_t x_t for d head_weight
        // float sums of kDwBlock tokens, added up in double: a float running sum over a whole chunk
        // drifts by several ulps (seen by the fuzzer at ~1000 tokens)
        std::fill(block.begin(), block.end(), 0.f);
        std::fill(dw_sum.begin(), dw_sum.end(), 0.0);
        for (int64_t i = 0; i < n; ++i) {
          const T* xr = x + (t0 + i) * p.Dd;
          const float* xf = reinterpret_cast<const float*>(xr);
          if (!std::is_same<T, float>::value) {
            for (int64_t d = 0; d < p.Dd; ++d) row[d] = to_float(xr[d]);
            xf = row.data();
          }
          axpy(grad[i], xf, block.data(), p.Dd);
          if ((i + 1) % kDwBlock == 0 || i + 1 == n) {
            for (int64_t d = 0; d < p.Dd; ++d) dw_sum[d] += block[d];
            std::fill(block.begin(), block.end(), 0.f);
          }
        }
        float* dw = p.dw_partials + c * p.Dd;
        for (int64_t d = 0; d < p.Dd; ++d) dw[d] = float(dw_sum[d]);
      }
    }
  });
}

PO_VECTORIZED void scaled_row(float a, const float* w, float* out, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = a * w[d];
}

template <typename T>
void head_backward_impl(const RTDParams& p, const float* grad, const float* coef, int64_t coef_stride, void* dx) {
  T* out = static_cast<T*>(dx);
  at::parallel_for(0, p.T, 1024, [&](int64_t begin, int64_t end) {
    std::vector<float> row(p.Dd);
    for (int64_t t = begin; t < end; ++t) {
      const float a = coef[t * coef_stride] * grad[t];
      if (std::is_same<T, float>::value) {
        scaled_row(a, p.head_weight, reinterpret_cast<float*>(out + t * p.Dd), p.Dd);
      } else {
        scaled_row(a, p.head_weight, row.data(), p.Dd);
        for (int64_t d = 0; d < p.Dd; ++d) out[t * p.Dd + d] = from_float<T>(row[d]);
      }
    }
  });
}

}  // namespace

void rtd_loss_forward(const RTDParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) { rtd_impl<decltype(tag)>(p); });
}

void rtd_loss_head_backward(const RTDParams& p, const float* grad, const float* coef, int64_t coef_stride, void* dx) {
  dispatch_dtype(p.dtype, [&](auto tag) { head_backward_impl<decltype(tag)>(p, grad, coef, coef_stride, dx); });
}

}  // namespace pyobjectives::cpu
