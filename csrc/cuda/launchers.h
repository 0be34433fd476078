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

}  // namespace pyobjectives::cuda
