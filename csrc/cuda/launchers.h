// Launchers of the CUDA kernels: a params struct in, work queued on `stream`, nothing returned but
// through the params' buffers. No torch headers, so each .cu compiles alone with nvcc; ops.cpp (the
// torch boundary) allocates outputs and workspaces and calls these.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "pyobjectives/params.h"

namespace pyobjectives::cuda {

// ---- two-stream attention (two_stream_attention_*.cu) ----------------------------------------
// Tensor-core kernels (SM80 MMA atoms through CuTe: one code path for sm_80 .. sm_90) for bf16 and
// fp16 with head dim 64 or 128. Everything else is refused by two_stream_attention_unsupported.

// Why these params cannot run here ("" when they can): dtype, head dim, compute capability.
const char* two_stream_attention_unsupported(const AttentionParams& p, int sm_major, int sm_minor);

// Bytes of device scratch the forward / backward need (query-stream chunk lists, per-diagonal and
// per-row-block partial sums), zero-initialisation not required. The caller allocates them.
size_t two_stream_attention_forward_workspace(const AttentionParams& p);
size_t two_stream_attention_backward_workspace(const AttentionParams& p);

// Forward: outputs and the row logsumexp (+inf for rows with no visible key) in f; query-stream
// padding rows (target_pos < 0) get zeros and lse = +inf.
void two_stream_attention_forward(const AttentionParams& p, const AttentionForward& f, void* workspace,
                                  cudaStream_t stream);

// Backward: dq / dq_g in the input dtype; the float32 per-(batch, head) partials of AttentionBackward
// (dk, dv, dr, dbias, dseg, dt5_dist) fully written (the caller sums them over the batch in a fixed
// order). Deterministic: no floating-point atomics.
void two_stream_attention_backward(const AttentionParams& p, const AttentionBackward& g, void* workspace,
                                   cudaStream_t stream);

// ---- RTD loss (rtd_loss.cu) ------------------------------------------------------------------
// Tokens per partial-sum chunk (the rows of p.partials / p.dw_partials the caller allocates):
// 2048 for logits, 128 with the fused head.
int64_t rtd_loss_chunk_tokens(const RTDParams& p);
// Fills p's outputs like the CPU kernel, then reduces the chunks' partials in a fixed order into
// sums [kRTDSums] (float64) and, when dw is given (with p.dw_partials), sum_t grad_t x_t into dw [Dd].
void rtd_loss_forward(const RTDParams& p, double* sums, float* dw, cudaStream_t stream);
// dx[t, :] = coef[t * coef_stride] * grad[t] * head_weight, in p.dtype.
void rtd_loss_head_backward(const RTDParams& p, const float* grad, const float* coef, int64_t coef_stride, void* dx,
                            cudaStream_t stream);

// ---- linear + cross-entropy (linear_cross_entropy.cu) ----------------------------------------
// Extra memory budget of one chunk of float32 logits.
constexpr int64_t kLinearCEChunkBytes = int64_t(64) << 20;
// Rows per chunk: kLinearCEChunkBytes / (4 V), a multiple of 64 when at least 64, at most N.
int64_t linear_cross_entropy_chunk_rows(int64_t N, int64_t V);
// Rows n0 .. n0 + rows - 1 given their float32 logits without bias (logits [rows, V], contiguous):
// writes row_loss, lse and, as p asks, argmax and the Gumbel-max sample. With row_coef [N] (the
// per-row gradient coefficient) the gradient (softmax - onehot) * coef (0 for ignored rows) replaces
// the logits: float32 in place, or for bfloat16 / float16 as a [rows, V] matrix of p.dtype with row
// stride 2V elements starting at logits.
void linear_cross_entropy_chunk(const LinearCEParams& p, float* logits, int64_t n0, int64_t rows,
                                const float* row_coef, cudaStream_t stream);

// ---- test hooks (test_hooks.cu): the shared header on the device ------------------------------
void philox_uniform(uint64_t seed, const int64_t* offsets, int64_t n, float* out, cudaStream_t stream);
// out[i] = uniform at offset *start + i (start read on the device: no host synchronisation)
void philox_uniform_run(uint64_t seed, const int64_t* start, int64_t n, float* out, cudaStream_t stream);
void t5_bucket(const int64_t* relative_position, int64_t n, bool bidirectional, int64_t num_buckets,
               int64_t max_distance, int64_t* out, cudaStream_t stream);

}  // namespace pyobjectives::cuda
