// Launchers of the CPU kernels (one header for all ops; each .cpp defines its own).
#pragma once

#include "pyobjectives/params.h"

namespace pyobjectives::cpu {

void two_stream_attention_forward(const AttentionParams& p, const AttentionForward& out);
void two_stream_attention_backward(const AttentionParams& p, const AttentionBackward& grads);

// RTD: one pass over the tokens; fills p's outputs (per-chunk partial sums, reduced by the caller).
void rtd_loss_forward(const RTDParams& p);
// d x for the fused head: dx[t, :] = coef_t * grad_t * head_weight (coef stride 0 = one scalar).
void rtd_loss_head_backward(const RTDParams& p, const float* grad, const float* coef, int64_t coef_stride, void* dx);

// Linear + cross-entropy (+ sampling) over row chunks. With row_coef (per-row gradient coefficient,
// 0 for ignored rows) the gradient is formed in the same sweep: d hidden [N, E] and d weight [V, E]
// (float32, d weight accumulated), d bias [V] (float32) or nullptr.
void linear_cross_entropy_forward(const LinearCEParams& p, const float* row_coef, float* d_hidden, float* d_weight,
                                  float* d_bias);
int64_t linear_cross_entropy_chunk_rows(int64_t V);

}  // namespace pyobjectives::cpu
