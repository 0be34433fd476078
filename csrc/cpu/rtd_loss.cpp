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

// Loss, gradient and statistics of tokens [t0, t0 + n) whose logits are z.
PO_VECTORIZED void rtd_tokens(const RTDParams& p, int64_t t0, int64_t n, const float* z, double* sums, float* grad,
                              float* loss_tok) {
  double loss_sum = 0, grad_sum = 0;
  int64_t real_n = 0, correct = 0, tp = 0, predicted = 0, replaced = 0;
#pragma omp simd reduction(+ : loss_sum, grad_sum, real_n, correct, tp, predicted, replaced)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = t0 + i;
    const float x = z[i];
    const bool label = p.corrupted[t] != p.original[t];
    const bool real = p.real == nullptr || p.real[t] != 0;
    const float u = fast_exp(-std::fabs(x));  // e^{-|z|}: softplus and sigmoid without overflow
    const float softplus = std::fmax(x, 0.f) + fast_log(1.f + u);
    const float sigmoid = x >= 0.f ? 1.f / (1.f + u) : u / (1.f + u);
    const float y = label ? 1.f : 0.f;
    const float loss = real ? softplus - y * x : 0.f;
    const float g = real ? sigmoid - y : 0.f;
    const bool pred = x > 0.f;
    loss_sum += loss;
    grad_sum += g;
    real_n += real;
    correct += real & (pred == label);
    tp += real & pred & label;
    predicted += real & pred;
    replaced += real & label;
    if (grad != nullptr) grad[i] = g;
    if (loss_tok != nullptr) loss_tok[i] = loss * p.loss_weight;
  }
  sums[kLossSum] = loss_sum;
  sums[kGradSum] = grad_sum;
  sums[kReal] = double(real_n);
  sums[kCorrect] = double(correct);
  sums[kTruePos] = double(tp);
  sums[kPredicted] = double(predicted);
  sums[kReplaced] = double(replaced);
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

template <typename T>
void rtd_impl(const RTDParams& p) {
  const int64_t n_chunks = (p.T + kRTDChunk - 1) / kRTDChunk;
  const T* x = static_cast<const T*>(p.x);
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(kRTDChunk), tok(kRTDChunk), row(std::max<int64_t>(p.Dd, 1));
    for (int64_t c = begin; c < end; ++c) {
      const int64_t t0 = c * kRTDChunk, n = std::min(kRTDChunk, p.T - t0);
      for (int64_t i = 0; i < n; ++i) {
        if (p.Dd == 0) {
          z[i] = to_float(x[t0 + i]);
        } else {
          const T* xr = x + (t0 + i) * p.Dd;
          for (int64_t d = 0; d < p.Dd; ++d) row[d] = to_float(xr[d]);
          z[i] = dot(row.data(), p.head_weight, p.Dd) + p.head_bias;
        }
      }
      float* grad = p.grad != nullptr ? p.grad + t0 : nullptr;
      rtd_tokens(p, t0, n, z.data(), p.partials + c * kRTDSums, grad, p.loss_tok != nullptr ? tok.data() : nullptr);
      if (p.loss_tok != nullptr)
        for (int64_t i = 0; i < n; ++i) static_cast<T*>(p.loss_tok)[t0 + i] = from_float<T>(tok[i]);
      if (p.dw_partials != nullptr) {
        // sum_t grad_t x_t for d head_weight; the gradient lives in grad or is recomputed into tok
        float* dw = p.dw_partials + c * p.Dd;
        std::fill(dw, dw + p.Dd, 0.f);
        if (grad == nullptr) {
          double ignored[kRTDSums];
          grad = tok.data();
          RTDParams q = p;
          q.loss_tok = nullptr;
          rtd_tokens(q, t0, n, z.data(), ignored, grad, nullptr);
        }
        for (int64_t i = 0; i < n; ++i) {
          const T* xr = x + (t0 + i) * p.Dd;
          for (int64_t d = 0; d < p.Dd; ++d) row[d] = to_float(xr[d]);
          axpy(grad[i], row.data(), dw, p.Dd);
        }
      }
    }
  });
}

template <typename T>
void head_backward_impl(const RTDParams& p, const float* grad, const float* coef, int64_t coef_stride, void* dx) {
  T* out = static_cast<T*>(dx);
  at::parallel_for(0, p.T, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float a = coef[t * coef_stride] * grad[t];
      for (int64_t d = 0; d < p.Dd; ++d) out[t * p.Dd + d] = from_float<T>(a * p.head_weight[d]);
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
